"""Reading replayable corpora and replaying them through the publisher (real broker)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from headwater.errors import CorpusError
from headwater.events import parse_document
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from producers import corpus as corpus_module
from producers.corpus import count_records, default_corpus_dir, read_corpus, replay, to_event
from producers.publisher import DocumentPublisher
from service.cli import build_parser

SAMPLE = corpus_module.SAMPLE_DIR / "tldr-sample.jsonl.gz"
SNAPSHOT_END = 5425  # first event seq of the tldr corpus


def write_corpus(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


def rec(seq: int, doc_id: str, op: str = "upsert", text: str | None = "text") -> dict:
    return {
        "seq": seq, "ts": "2025-01-02T03:04:05+00:00", "commit": f"c{seq}", "op": op,
        "doc_id": doc_id, "text": text if op == "upsert" else None,
    }  # fmt: skip


def read_events(settings: Settings) -> list:
    consumer = KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(settings.documents_topic, p) for p in range(settings.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < end[tp] for tp in parts):
            assert time.monotonic() < deadline, "timed out reading the documents topic"
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


# -- reading ----------------------------------------------------------------------------------


def test_bundled_sample_is_snapshot_first_in_seq_order() -> None:
    records = list(read_corpus(SAMPLE))
    assert len(records) == count_records(SAMPLE) == 500
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    snapshot = [r for r in records if r.seq < SNAPSHOT_END]
    assert len(snapshot) == 300 and records[:300] == snapshot
    assert all(r.op == "upsert" and r.text for r in snapshot)
    assert {r.op for r in records[300:]} == {"upsert", "delete"}
    assert all(r.doc_id.startswith("pages/") for r in records)
    assert SAMPLE.stat().st_size < 300_000
    assert "CC BY 4.0" in (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    assert [r.seq for r in read_corpus(SAMPLE, limit=7)] == seqs[:7]


def test_folder_files_are_merged_by_seq(tmp_path: Path) -> None:
    # "events" sorts before "snapshot": order must come from seq, not file names.
    write_corpus(tmp_path / "events.jsonl.gz", [rec(3, "b.md"), rec(5, "a.md", "delete")])
    write_corpus(tmp_path / "snapshot.jsonl.gz", [rec(0, "a.md"), rec(1, "b.md"), rec(2, "c.md")])
    (tmp_path / "notes.txt").write_text("not a corpus file")
    records = list(read_corpus(tmp_path))
    assert [(r.seq, r.doc_id, r.op) for r in records] == [
        (0, "a.md", "upsert"), (1, "b.md", "upsert"), (2, "c.md", "upsert"),
        (3, "b.md", "upsert"), (5, "a.md", "delete"),
    ]  # fmt: skip
    assert [r.seq for r in read_corpus(tmp_path, limit=4)] == [0, 1, 2, 3]
    assert records[-1].text is None and records[0].commit == "c0"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "bad.jsonl.gz:2: not JSON"),
        (json.dumps({**rec(9, "x.md"), "op": "rename"}), "op must be upsert or delete"),
        (json.dumps({k: v for k, v in rec(9, "x.md").items() if k != "doc_id"}), "'doc_id'"),
        (json.dumps(rec(0, "x.md")), "seq 0 after 1"),
        (json.dumps({**rec(9, "x.md"), "text": None}), "upsert with no text"),
        (json.dumps({**rec(9, "x.md"), "ts": "yesterday"}), "bad ts"),
    ],
)
def test_bad_corpus_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(rec(1, "ok.md")) + "\n" + line + "\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl\.gz:2") as info:
        list(read_corpus(path))
    assert message in str(info.value)


def test_missing_corpus_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_corpus(tmp_path / "nope"))
    with pytest.raises(CorpusError, match=r"no \*\.jsonl\.gz"):
        list(read_corpus(tmp_path))
    # Without the shared corpora next to the repo, the bundled sample stands in for tldr.
    monkeypatch.setattr(corpus_module, "REPO", tmp_path / "repo")
    assert default_corpus_dir("tldr") == SAMPLE
    with pytest.raises(CorpusError, match="no corpus named 'rust-book'"):
        default_corpus_dir("rust-book")


def test_to_event_keeps_doc_id_and_derives_versions_from_seq() -> None:
    first, *_, last = read_corpus(SAMPLE)
    event = to_event(first, "acme", "corpus:tldr")
    assert (event.doc_id, event.op, event.text) == (first.doc_id, "upsert", first.text)
    assert (event.tenant, event.source, event.version) == ("acme", "corpus:tldr", first.seq + 1)
    assert event.metadata == {"commit": first.commit, "ts": first.ts.isoformat()}
    assert to_event(last, "acme").version > event.version
    parse_document(event.to_bytes())  # what the indexer will accept


# -- replaying --------------------------------------------------------------------------------


def test_replay_limit_publishes_exactly_n_snapshot_first(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 320  # all 300 snapshot pages and the first 20 events
    args = build_parser().parse_args(["replay", str(SAMPLE), "--limit", str(n), "--json"])
    assert args.func(settings, args) == 0
    token = FreshnessToken.parse(json.loads(capsys.readouterr().out)["token"])

    expected = list(read_corpus(SAMPLE, limit=n))
    records = read_events(settings)
    events = [parse_document(r.value) for r in records]
    assert len(events) == n
    assert sorted((e.version, e.doc_id, e.op) for e in events) == [
        (r.seq + 1, r.doc_id, r.op) for r in expected
    ]
    assert all(e.tenant == settings.default_tenant for e in events)
    # Within each partition records are in publish order: snapshot versions before events'.
    for partition in range(settings.partitions):
        versions = [
            e.version for r, e in zip(records, events, strict=True) if r.partition == partition
        ]
        assert versions == sorted(versions)
    last = {}
    for r in records:
        last[r.partition] = max(r.offset, last.get(r.partition, -1))
    assert dict(token) == last


def test_replay_rate_limits_and_reports_progress(settings: Settings) -> None:
    records = list(read_corpus(SAMPLE, limit=30))
    progress: list[int] = []
    with DocumentPublisher(settings) as pub:
        started = time.monotonic()
        token = replay(pub, records, rate=100, on_progress=progress.append, tenant="default")
        elapsed = time.monotonic() - started
    assert sum(progress) == 30 and sum(token.values()) + len(token) == 30
    # 30 events at 100/s: the last batch is due 0.25 s after the first. Lower bound only.
    assert elapsed >= 0.2
    with pytest.raises(ValueError, match="rate must be > 0"):
        replay(DocumentPublisher(settings), records, rate=0)


def test_replay_cli_rejects_bad_input(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in (
        (["replay", "no-such-corpus"], "no corpus named 'no-such-corpus'"),
        (["replay", str(SAMPLE), "--tenant", "ghost"], "unknown tenant 'ghost'"),
        (["replay", str(SAMPLE), "--rate", "0"], "--rate must be > 0"),
    ):
        args = build_parser().parse_args(argv)
        assert args.func(settings, args) == 2
        err = capsys.readouterr().err
        assert err.startswith("headwater: ") and message in err
    assert read_events(settings) == []
