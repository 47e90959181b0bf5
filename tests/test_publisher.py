"""DocumentPublisher and FreshnessToken: validation, versions, tokens against the real broker."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from headwater.errors import (
    DeliveryError,
    DocumentTooLargeError,
    HeadwaterError,
    InvalidDocumentError,
    UnknownTenantError,
)
from headwater.events import DocumentEvent, parse_document
from headwater.progress import Progress
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from producers import publisher as publisher_module
from producers.publisher import DocumentPublisher
from service.cli import build_parser


def read_topic(settings: Settings) -> list:
    """Every record on the documents topic, in partition/offset order."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False)
    try:
        parts = [
            TopicPartition(settings.documents_topic, p)
            for p in sorted(consumer.partitions_for_topic(settings.documents_topic))
        ]
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


# -- tokens (pure) ----------------------------------------------------------------------------


def test_token_string_round_trip_and_merge() -> None:
    token = FreshnessToken({3: 7, 0: 15})
    assert str(token) == "0:15,3:7"
    assert FreshnessToken.parse("0:15,3:7") == token
    assert FreshnessToken.parse(" 3:7 , 0:15 ") == token
    merged = token.merge(FreshnessToken({0: 9, 1: 2, 3: 8}))
    assert dict(merged) == {0: 15, 1: 2, 3: 8}
    assert str(FreshnessToken()) == "" and not FreshnessToken.parse("")
    assert FreshnessToken().merge(token) == token


@pytest.mark.parametrize(
    "garbage", ["0:", ":1", "a:1", "0:1,", "0:1;1:2", "0:-1", "0:1,0:2", "0:1:2", "x"]
)
def test_token_parse_rejects_garbage(garbage: str) -> None:
    with pytest.raises(ValueError, match="freshness token"):
        FreshnessToken.parse(garbage)


@given(st.dictionaries(st.integers(0, 10_000), st.integers(0, 2**62), max_size=20))
def test_token_round_trips_any_offsets(offsets: dict[int, int]) -> None:
    token = FreshnessToken(offsets)
    assert FreshnessToken.parse(str(token)) == token
    assert dict(token.merge(token)) == offsets


# -- validation: nothing is sent --------------------------------------------------------------


def test_invalid_documents_raise_clear_errors_and_send_nothing(settings: Settings) -> None:
    small = settings.model_copy(update={"max_text_bytes": 100})
    with DocumentPublisher(small) as pub:
        with pytest.raises(UnknownTenantError, match="unknown tenant 'nobody'"):
            pub.upsert("a.md", "text", tenant="nobody")
        with pytest.raises(DocumentTooLargeError, match="larger than the limit of 100 bytes"):
            pub.upsert("a.md", "é" * 51)
        for bad_id in ("", " a.md", "a\x00b", "x" * 600):
            with pytest.raises(InvalidDocumentError, match="doc_id"):
                pub.upsert(bad_id, "text")
        with pytest.raises(InvalidDocumentError, match=r"metadata\['tags'\] must be a string"):
            pub.upsert("a.md", "text", metadata={"tags": ["a"]})
        with pytest.raises(InvalidDocumentError, match="version"):
            pub.upsert("a.md", "text", version=-1)
        good = pub.build("upsert", "ok.md", text="fine")
        foreign = good.model_copy(update={"tenant": "elsewhere"})
        with pytest.raises(UnknownTenantError):
            pub.publish_many([good, foreign])  # one bad event: the good one is not sent either
        # Every error is a one-line ValueError.
        with pytest.raises(ValueError) as info:
            pub.upsert("a.md", "x" * 200)
        assert isinstance(info.value, HeadwaterError) and "\n" not in str(info.value)
        assert pub._producer is None  # never even connected
    with Progress(settings) as progress:
        assert sum(progress.end_offsets().values()) == 0


def test_the_publisher_asks_no_clock_for_versions(settings: Settings) -> None:
    """Only a source's own version is sent; everything else is ordered by the log."""
    with DocumentPublisher(settings) as pub:
        assert pub.build("upsert", "a.md", text="v0").version is None
        pub.upsert("a.md", "explicit", version=5_000)
        pub.delete("a.md")
        pub.upsert("a.md", "again", version=(1 << 63) - 1)  # the largest Milvus can store
        for too_big in (1 << 63, 1 << 64):
            with pytest.raises(InvalidDocumentError, match="version"):
                pub.upsert("a.md", "text", version=too_big)
    events = [parse_document(r.value) for r in read_topic(settings)]
    assert [(e.op, e.version) for e in events] == [
        ("upsert", 5_000),
        ("delete", None),
        ("upsert", (1 << 63) - 1),
    ]


def test_doc_ids_are_one_document_in_nfc_and_nfd(settings: Settings) -> None:
    nfc, nfd = "caf\u00e9.md", "cafe\u0301.md"
    with DocumentPublisher(settings) as pub:
        first = pub.upsert(nfc, "one")
        second = pub.upsert(nfd, "two")
        assert pub.build("delete", nfd).key == f"default/{nfc}".encode()
    assert set(first) == set(second)  # one key, one partition: one order
    events = [parse_document(r.value) for r in read_topic(settings)]
    assert [e.doc_id for e in events] == [nfc, nfc]


# -- publishing against the broker ------------------------------------------------------------


def test_token_offsets_match_what_a_consumer_reads(settings: Settings) -> None:
    docs = {f"docs/page-{i}.md": f"# Page {i}\n\nbody {i}" for i in range(8)}
    tokens = {}
    with DocumentPublisher(settings) as pub:
        for doc_id, text in docs.items():
            tokens[doc_id] = pub.upsert(doc_id, text, metadata={"n": len(text)})
        batch_token = pub.publish_many(
            [pub.build("upsert", d, text=t + " v2") for d, t in docs.items()]
        )
    records = read_topic(settings)
    assert len(records) == 2 * len(docs)
    by_position = {(r.partition, r.offset): r for r in records}
    for doc_id, token in tokens.items():
        ((partition, offset),) = token.items()  # one write: one partition
        record = by_position[(partition, offset)]
        event = parse_document(record.value)
        assert record.key == f"{settings.default_tenant}/{doc_id}".encode() == event.key
        assert (event.doc_id, event.text, event.op) == (doc_id, docs[doc_id], "upsert")
        assert event.metadata == {"n": len(docs[doc_id])}
    # The batch token holds the last offset written on every partition.
    last = {}
    for r in records:
        last[r.partition] = max(r.offset, last.get(r.partition, -1))
    assert dict(batch_token) == last


def test_same_key_always_lands_on_the_same_partition(settings: Settings) -> None:
    with DocumentPublisher(settings) as pub:
        tokens = [pub.upsert("same.md", f"edit {i}") for i in range(6)]
        tokens.append(pub.delete("same.md"))
        other_tenant_key = pub.build("upsert", "same.md", text="x").key
    partitions = {p for t in tokens for p in t}
    assert len(partitions) == 1
    offsets = [next(iter(t.values())) for t in tokens]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert other_tenant_key == b"default/same.md"
    events = [parse_document(r.value) for r in read_topic(settings)]
    assert [e.op for e in events] == ["upsert"] * 6 + ["delete"]


def test_publish_accepts_a_prebuilt_event(settings: Settings) -> None:
    event = DocumentEvent(tenant="default", doc_id="x.md", op="upsert", version=7, text="t")
    with DocumentPublisher(settings) as pub:
        token = pub.publish(event)
    (record,) = read_topic(settings)
    assert (record.partition, record.offset) == next(iter(token.items()))
    assert parse_document(record.value).event_id == event.event_id


def test_unreachable_broker_is_a_delivery_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "CONNECT_TIMEOUT_MS", 1_000)
    nowhere = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    with DocumentPublisher(nowhere) as pub, pytest.raises(DeliveryError, match="cannot reach"):
        pub.upsert("a.md", "text")


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(settings: Settings, argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(settings, args)


def test_cli_publish_and_delete_print_json_tokens(
    settings: Settings, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nsome text\n", encoding="utf-8")
    argv = ["publish", "--doc-id", "p.md", "--file", str(page), "--metadata", '{"lang": "en"}']
    assert run_cli(settings, [*argv, "--json"]) == 0
    published = FreshnessToken.parse(json.loads(capsys.readouterr().out)["token"])
    assert run_cli(settings, ["delete", "--doc-id", "p.md", "--json"]) == 0
    deleted = FreshnessToken.parse(json.loads(capsys.readouterr().out)["token"])
    assert set(published) == set(deleted) and len(published) == 1
    first, second = read_topic(settings)
    assert parse_document(first.value).text == page.read_text(encoding="utf-8")
    assert parse_document(first.value).metadata == {"lang": "en"}
    assert parse_document(second.value).op == "delete"
    assert run_cli(settings, ["publish", "--doc-id", "q.md", "--text", "hi"]) == 0
    assert "published default/q.md; token " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "t", "--metadata", "{nope"], "--metadata is not valid JSON"),
        (["--text", "t", "--metadata", "[1]"], "--metadata must be a JSON object"),
        (["--text", "t", "--tenant", "ghost"], "unknown tenant 'ghost'"),
        (["--file", "/no/such/file.md"], "cannot read /no/such/file.md"),
        (["--text", "x" * 101], "larger than the limit of 100 bytes"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    # No broker at all: bad input must be rejected before anything connects.
    offline = Settings(kafka_bootstrap="127.0.0.1:1", max_text_bytes=100)
    assert run_cli(offline, ["publish", "--doc-id", "a.md", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("headwater: ") and message in captured.err
    assert captured.err.count("\n") == 1
