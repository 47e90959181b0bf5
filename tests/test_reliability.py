"""Reliability on the real stack: crashes, outages, rebalances, hostile event streams.

Every scenario injects real faults (kill -9 of `headwater indexer` subprocesses, a private Kafka
broker or Milvus Lite server stopped and restarted, consumer-group members joining and leaving,
duplicated/reordered/replayed streams, fuzzed events) and ends with the truth checker: the index
equals the latest version of every document on the documents topic (0 missing, stale,
duplicate, leaked, deleted-present and wrong-version rows).

The functions named after scenarios take a `Scale`; the tests here run them small (CI), and
tests/test_soak.py runs them long (`make soak`). Each prints one `RELIABILITY` line with the
faults it injected, which RELIABILITY.md quotes.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.admin import OffsetSpec

from headwater.errors import DeliveryError
from headwater.events import DocumentEvent, Logged
from headwater.progress import Progress
from headwater.runtime import clients
from headwater.runtime.deadletter import DeadLetter
from headwater.settings import Settings
from headwater.topics import ensure_topics
from index.embedder import Embedder
from index.search import Searcher
from index.store import ChunkStore, doc_key
from index.verify import latest_events
from producers.corpus import CorpusRecord, replay, to_event
from producers.publisher import DocumentPublisher
from service.cli import main
from tests.chaos import (
    TRUTH_FIELDS,
    Faults,
    IndexerProcess,
    IndexerThread,
    assert_truth,
    kill_daemon,
    lag,
    private_broker,
    private_lite,
    read_topic,
    settings_env,
    snapshot,
    tldr_slice,
    truth,
    wait_caught_up,
)
from tests.indexing import send


@dataclass(frozen=True)
class Scale:
    """How hard each scenario pushes: CI runs the defaults, `make soak` the SOAK values."""

    kills: int = 2
    kill_docs: int = 30
    kill_events: int = 80
    broker_outages: int = 1
    broker_docs: int = 50
    milvus_outages: int = 1
    milvus_docs: int = 30
    milvus_events: int = 60
    replay_docs: int = 30
    replay_events: int = 90
    replays: int = 2
    group_processes: int = 1
    group_toggles: int = 2
    group_kills: int = 0
    group_docs: int = 30
    group_events: int = 80
    fuzz_examples: int = 3
    fuzz_events: int = 70  # per example
    fuzz_derandomize: bool = True  # CI: the same examples every run; soak: new ones
    fuzz_check_every: int = 1  # examples between full checks (and one at the end)


CI = Scale()
SOAK = Scale(
    kills=30,
    kill_docs=150,
    kill_events=600,
    broker_outages=4,
    broker_docs=300,
    milvus_outages=4,
    milvus_docs=100,
    milvus_events=400,
    replay_docs=150,
    replay_events=600,
    replays=5,
    group_processes=3,
    group_toggles=8,
    group_kills=3,
    group_docs=150,
    group_events=600,
    fuzz_examples=150,
    fuzz_events=100,
    fuzz_check_every=15,
    fuzz_derandomize=False,
)

TENANTS = ["default", "acme", "evil"]


def report_faults(scenario: str, faults: Faults) -> None:
    """Print (and append to $RELIABILITY_LOG, if set) what a scenario injected and survived."""
    line = f"RELIABILITY {scenario}: {faults}"
    print(line)
    if log := os.environ.get("RELIABILITY_LOG"):
        with open(log, "a") as fh:
            fh.write(line + "\n")


def parts(items: list, n: int) -> list[list]:
    """`items` cut into `n` contiguous, nearly equal parts."""
    size = -(-len(items) // n)
    return [items[i * size : (i + 1) * size] for i in range(n)]


def docs_of(records: list[CorpusRecord]) -> int:
    return len({r.doc_id for r in records})


def verify_cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys) -> dict:
    """`headwater verify --json --sample 20`, configured only through HEADWATER_* variables."""
    env = settings_env(settings)
    for name in list(os.environ):
        if name.startswith("HEADWATER_") and name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("HEADWATER_"):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    rc = main(["verify", "--json", "--sample", "20"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert rc == (0 if report["ok"] else 1)
    return report


def assert_cli_truth(report: dict, docs: int) -> None:
    bad = {k: report[k] for k in (*TRUTH_FIELDS, "search_wrong") if report[k]}
    assert not bad, f"{bad}; e.g. {report['examples'][:5]}"
    assert report["ok"] and report["docs"] == docs
    assert report["searched"] > 0


def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_record(r) for r in read_topic(settings, settings.dlq_topic)]


# -- kill -9 during a replay ---------------------------------------------------------------------


def kill_nine_during_replay(
    settings: Settings, tmp_path: Path, monkeypatch, capsys, scale: Scale, seed: int = 1
) -> Faults:
    """Restart `headwater indexer` after kill -9 at random points while the replay goes on."""
    s = settings.model_copy(update={"batch_max_events": 10, "batch_max_ms": 100})
    rng = random.Random(seed)
    records = tldr_slice(scale.kill_docs, scale.kill_docs // 8, scale.kill_events, seed)
    faults = Faults()
    member = IndexerProcess(s, tmp_path / "logs")
    try:
        with DocumentPublisher(s) as pub:
            chunks = parts(records, scale.kills + 1)
            replay(pub, chunks[0])
            for chunk in chunks[1:]:
                member.start()
                member.wait_ready()
                replay(pub, chunk)  # more of the stream arrives while this member works
                time.sleep(rng.uniform(0.2, 3.0))
                behind = lag(s)
                member.kill()
                faults.add("kill -9")
                faults.add("kill -9 with uncommitted events", behind > 0)
        member.start()
        member.wait_ready()
        wait_caught_up(s, 900, alive=member.alive)
        assert member.terminate() == 0, member.tail()
        faults.add("restarts", member.starts - 1)
    finally:
        member.stop_quietly()
    assert dead_letters(s) == [], "a crash must not dead-letter valid events"
    assert_cli_truth(verify_cli(s, monkeypatch, capsys), docs_of(records))
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_kill_nine_of_the_indexer_during_a_replay(settings, tmp_path, monkeypatch, capsys):
    faults = kill_nine_during_replay(settings, tmp_path, monkeypatch, capsys, CI)
    report_faults("kill -9 indexer", faults)
    assert faults.counts["kill -9"] == CI.kills


# -- the broker stops mid-stream -------------------------------------------------------------------


def broker_restarts(
    stack_settings: Settings,
    settings: Settings,
    embedder: Embedder,
    tmp_path: Path,
    scale: Scale,
    seed: int = 2,
) -> Faults:
    """A producer keeps publishing through broker restarts; every acknowledged event is indexed."""
    rng = random.Random(seed)
    faults = Faults()
    pages = [r for r in tldr_slice(scale.broker_docs, 0, 10**6, seed) if r.op == "upsert"]
    last = {r.doc_id: r.text for r in pages}  # the last text of each page
    docs = list(last)[: scale.broker_docs]
    with private_broker(stack_settings, tmp_path / "broker") as (own, broker):
        s = settings.model_copy(
            update={
                "kafka_port": own.kafka_port,
                "kafka_controller_port": own.kafka_controller_port,
                "publish_timeout_s": 3.0,
                "batch_max_events": 10,
            }
        )
        ensure_topics(s)
        acked: dict[str, int] = {}
        failed = Counter[str]()
        done = threading.Event()
        crashed: list[BaseException] = []

        def publish() -> None:
            try:
                with DocumentPublisher(s) as pub:
                    for doc_id in docs:
                        version = int(time.time() * 1e6)  # one version per page, kept on retry
                        while True:
                            try:
                                pub.upsert(doc_id, last[doc_id] or "", version=version)
                            except DeliveryError:
                                failed[doc_id] += 1
                                time.sleep(0.2)
                                continue
                            acked[doc_id] = version
                            break
                        time.sleep(0.02)
            except BaseException as exc:
                crashed.append(exc)
                raise
            finally:
                done.set()

        member = IndexerThread(s, embedder)
        producer = threading.Thread(target=publish, daemon=True)
        producer.start()
        try:
            for i in range(scale.broker_outages):
                target = (i + 1) * len(docs) // (scale.broker_outages + 1)
                deadline = time.monotonic() + 300
                while len(acked) < target and time.monotonic() < deadline:
                    time.sleep(0.05)
                hard = i % 2 == 0  # CI (one outage) gets the harsher kill -9
                if hard:
                    kill_daemon(broker.daemon)
                else:
                    broker.stop()
                faults.add("broker kill -9" if hard else "broker stop")
                time.sleep(rng.uniform(1.0, 4.0))
                broker.start()
            assert done.wait(600), "the producer never got every publish acknowledged"
            assert not crashed, f"the producer died: {crashed[0]!r}"
            wait_caught_up(s, 600, alive=member.alive)
        finally:
            stats = member.close()
        faults.add("publishes refused during outages", sum(failed.values()))
        faults.add("events consumed", stats.consumed)
        # Exactly what was acknowledged is in the index: every page, at its acknowledged version.
        store = ChunkStore(s, embedder.model_id, embedder.dim)
        try:
            states = {st.doc_id: st for st in store.iter_doc_states()}
        finally:
            store.close()
        assert set(states) == set(acked)
        assert {d: st.version for d, st in states.items()} == acked
        assert not any(st.deleted for st in states.values())
        assert dead_letters(s) == []
        assert_truth(truth(s, embedder, sample=10))
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_broker_restarts_lose_nothing_acknowledged(stack_settings, settings, embedder, tmp_path):
    faults = broker_restarts(stack_settings, settings, embedder, tmp_path, CI)
    report_faults("broker restart", faults)


# -- Milvus is down for a while ------------------------------------------------------------------


def milvus_outages(
    stack_settings: Settings,
    settings: Settings,
    embedder: Embedder,
    tmp_path: Path,
    scale: Scale,
    seed: int = 3,
) -> Faults:
    """Milvus Lite stopped (or killed) under a running indexer: no commit while down, then
    the indexer catches up on its own."""
    rng = random.Random(seed)
    faults = Faults()
    records = tldr_slice(scale.milvus_docs, scale.milvus_docs // 8, scale.milvus_events, seed)
    with private_lite(stack_settings, tmp_path / "lite") as (own, lite):
        s = settings.model_copy(update={"milvus_port": own.milvus_port, "batch_max_events": 10})
        chunks = parts(records, scale.milvus_outages + 1)
        member = IndexerThread(s, embedder)
        progress = Progress(s)
        try:
            with DocumentPublisher(s) as pub:
                replay(pub, chunks[0])
                for i, chunk in enumerate(chunks[1:]):
                    wait_caught_up(s, 600, alive=member.alive)
                    before = progress.applied_offsets()
                    retries = member.indexer.stats.store_retries
                    hard = i % 2 == 0
                    if hard:
                        kill_daemon(lite.daemon)
                    else:
                        lite.stop()
                    faults.add("milvus kill -9" if hard else "milvus stop")
                    replay(pub, chunk)
                    deadline = time.monotonic() + 120
                    while member.indexer.stats.store_retries <= retries:
                        assert time.monotonic() < deadline, "the indexer never noticed the outage"
                        time.sleep(0.2)
                    # While Milvus is down nothing may be committed: no offset past unwritten data.
                    for _ in range(int(rng.uniform(3, 8))):
                        assert progress.applied_offsets() == before
                        assert member.alive()
                        time.sleep(0.5)
                    faults.add("offset checks while down")
                    lite.start()
            wait_caught_up(s, 600, alive=member.alive)
        finally:
            progress.close()
            stats = member.close()
        faults.add("batches retried", stats.store_retries)
        assert dead_letters(s) == []
        assert_truth(truth(s, embedder, sample=10))
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_milvus_outage_commits_nothing_and_catches_up(stack_settings, settings, embedder, tmp_path):
    faults = milvus_outages(stack_settings, settings, embedder, tmp_path, CI)
    report_faults("milvus outage", faults)
    assert faults.counts["batches retried"] >= CI.milvus_outages


# -- duplicated, reordered and replayed-from-zero streams -----------------------------------------


def shuffled_within_keys(events: list[DocumentEvent], rng: random.Random) -> list[DocumentEvent]:
    """Each document's events in a random order, in the slots its events held (other keys keep
    their positions): what a producer retrying out of order could do to one key."""
    slots: dict[bytes, list[int]] = {}
    for i, e in enumerate(events):
        slots.setdefault(e.key, []).append(i)
    out = list(events)
    for positions in slots.values():
        mine = [events[i] for i in positions]
        rng.shuffle(mine)
        for i, e in zip(positions, mine, strict=True):
            out[i] = e
    return out


def replayed_streams(settings: Settings, embedder: Embedder, scale: Scale, seed: int = 4) -> Faults:
    """Duplicates and reordering converge; replaying from zero (same group reset, a second
    group, the whole stream again) changes nothing, embeds nothing, announces nothing."""
    rng = random.Random(seed)
    faults = Faults()
    records = tldr_slice(scale.replay_docs, scale.replay_docs // 8, scale.replay_events, seed)
    events = [to_event(r, "default") for r in records]
    stream: list[DocumentEvent] = []
    for e in events:
        stream += [e] * (2 if rng.random() < 0.3 else 1)
    stream = shuffled_within_keys(stream, rng)
    faults.add("duplicates", len(stream) - len(events))
    faults.add("events out of version order", sum(
        1 for i, e in enumerate(stream)
        if any(p.key == e.key and p.version > e.version for p in stream[:i])
    ))  # fmt: skip
    send(settings, stream)

    first = IndexerThread(settings, embedder)
    wait_caught_up(settings, 600, alive=first.alive)
    stats = first.close()
    assert stats.stale + stats.coalesced > 0
    assert_truth(truth(settings, embedder, sample=10))
    before = snapshot(settings, embedder)
    changes = len(read_topic(settings, settings.changes_topic))
    assert changes > 0

    def unchanged(group: str, what: str) -> None:
        s = settings.model_copy(update={"indexer_group": group})
        member = IndexerThread(s, embedder)
        wait_caught_up(s, 600, alive=member.alive)
        again = member.close()
        assert again.embedded == 0 and again.removed == 0, (what, again)
        assert snapshot(settings, embedder) == before, what
        assert len(read_topic(settings, settings.changes_topic)) == changes, what
        faults.add(what)

    for i in range(scale.replays):
        kind = i % 3
        if kind == 0:  # the same group, its offsets reset to the beginning
            admin = clients.admin(settings)
            try:
                parts_ = range(settings.partitions)
                specs = {TopicPartition(settings.documents_topic, p): OffsetSpec.EARLIEST
                         for p in parts_}  # fmt: skip
                admin.reset_group_offsets(settings.indexer_group, specs)
            finally:
                admin.close()
            unchanged(settings.indexer_group, "replay from zero (group reset)")
        elif kind == 1:  # a second group into the same collections
            unchanged(f"{settings.indexer_group}-second-{i}", "replay by a second group")
        else:  # the whole stream published again, reordered differently
            send(settings, shuffled_within_keys(stream, rng))
            unchanged(settings.indexer_group, "whole stream published again")
    assert_truth(truth(settings, embedder, sample=10))
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_duplicated_reordered_and_replayed_streams_change_nothing(settings, embedder):
    faults = replayed_streams(settings, embedder, CI)
    report_faults("duplicate/reorder/replay", faults)


# -- a consumer group with rebalances ------------------------------------------------------------


def group_rebalances(
    settings: Settings, embedder: Embedder, tmp_path: Path, scale: Scale, seed: int = 5
) -> Faults:
    """`headwater indexer` processes plus in-process members joining and leaving (and kill -9
    of processes) during a replay, all writing to one Milvus."""
    s = settings.model_copy(update={"batch_max_events": 10, "batch_max_ms": 100})
    rng = random.Random(seed)
    faults = Faults()
    records = tldr_slice(scale.group_docs, scale.group_docs // 8, scale.group_events, seed)
    procs = [
        IndexerProcess(s, tmp_path / "logs", f"member{i}") for i in range(scale.group_processes)
    ]
    guest: IndexerThread | None = None
    kills_left = scale.group_kills
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(partitions=False)
        with DocumentPublisher(s) as pub:
            for chunk in parts(records, scale.group_toggles + 1):
                replay(pub, chunk)
                time.sleep(rng.uniform(0.5, 3.0))
                if guest is None:
                    guest = IndexerThread(s, embedder)
                    faults.add("member joined")
                else:
                    guest.close()
                    guest = None
                    faults.add("member left")
                if kills_left and len(procs) > 1 and rng.random() < 0.5:
                    victim = rng.choice(procs)
                    victim.kill()
                    faults.add("member kill -9")
                    kills_left -= 1
                    victim.start()  # rejoins ~20 s later: another rebalance
        if guest is not None:
            guest.close()
            guest = None
            faults.add("member left")
        wait_caught_up(s, 900, alive=lambda: all(p.alive() for p in procs))
        for p in procs:
            assert p.terminate() == 0, p.tail()
    finally:
        if guest is not None:
            guest.stop.set()
        for p in procs:
            p.stop_quietly()
    assert dead_letters(s) == []
    assert_truth(truth(s, embedder, sample=10))
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_consumer_group_rebalances_during_a_replay(settings, embedder, tmp_path):
    faults = group_rebalances(settings, embedder, tmp_path, CI)
    report_faults("group rebalances", faults)
    assert faults.counts["member joined"] + faults.counts["member left"] >= CI.group_toggles


def test_a_rebalance_mid_batch_loses_nothing(settings, embedder):
    """A member that joins while the indexer is still filling a batch makes it drop the batch;
    the partitions it keeps must be read again from the dropped records, not after them."""
    s = settings.model_copy(update={"batch_max_ms": 4000, "batch_max_events": 1000})
    send(s, [DocumentEvent(tenant="default", doc_id=f"r{i}.md", op="upsert", version=1,
                           text=f"# r{i}\n\nrebalanced text {i}") for i in range(30)])  # fmt: skip
    member = IndexerThread(s, embedder)
    try:
        deadline = time.monotonic() + 120
        while not member.indexer.pending:  # polled, not yet applied: the batch window is open
            assert time.monotonic() < deadline, "the indexer never polled"
            time.sleep(0.01)
        guest = clients.consumer(s, s.documents_topic, group_id=s.indexer_group)
        guest.poll(timeout_ms=3000)  # joins: everything is revoked, then reassigned
        guest.close(autocommit=False)  # leaves: another rebalance
        wait_caught_up(s, 120, alive=member.alive)
    finally:
        member.close()
    assert_truth(truth(s, embedder))


# -- fuzzed events -------------------------------------------------------------------------------

# Ids that would change a filter expression or a path if anyone spliced them into one.
HOSTILE_IDS = [
    'x" or tenant != "',
    "x' or tenant != '",
    'a\\" || doc_key != "',
    ") or (",
    "a && b",
    'in ["default"]',
    'tenant == "acme"',
    "../../etc/passwd",
    "..\\..\\boot.ini",
    '"',
    "'",
    "\\",
    "%s%n{0}",
    "*",
    "📄🔥.md",
    "עברית/דף.md",
    "ملف.md",
    "a" * 500,
]
UNICODE_TEXTS = [
    "\u202eevil RTL override\u202c and more",
    "zero\u200bwidth\u200djoiner\ufeff",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 flags",
    "nul\x00byte inside",
    "combining e\u0301\u0301\u0301 marks",
    "שלום עולם, مرحبا بالعالم",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "# ",
    "",
]
FUZZ_MAX_TEXT = 50_000


def _valid_doc_id(d: str) -> bool:
    return bool(d) and d == d.strip() and d.isprintable() and len(d.encode()) <= 512


doc_ids = st.one_of(
    st.sampled_from(HOSTILE_IDS),
    st.text(
        alphabet=st.characters(categories=["L", "M", "N", "P", "S"]) | st.just(" "),
        min_size=1,
        max_size=24,
    ).filter(_valid_doc_id),
)
small_texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)
markdown = st.builds(
    lambda t, b: f"# {t}\n\n{b}",
    st.text(max_size=40),
    st.text(alphabet="abcdefgh ijk.\n", max_size=400),
)
# Cheap texts are listed twice: big ones are rarer, embedding them is what costs time.
texts = st.one_of(
    small_texts,
    small_texts,
    st.sampled_from(UNICODE_TEXTS),
    markdown,
    markdown,
    st.integers(1_000, FUZZ_MAX_TEXT).map(lambda n: "x" * n),  # one huge "word"
    st.integers(1_000, 8_000).map(lambda n: "lorem ipsum " * (n // 12)),
)
valid_events = st.builds(
    lambda tenant, doc_id, op, version, text: DocumentEvent(
        tenant=tenant,
        doc_id=doc_id,
        op=op,
        version=version,
        text=text if op == "upsert" else None,
    ),
    st.sampled_from(TENANTS),
    doc_ids,
    st.sampled_from(["upsert", "upsert", "upsert", "delete"]),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),  # a source version, or the log's order
    texts,
)
# A null value under a document's key: the ecosystem's tombstone, a delete.
tombstones = st.builds(
    lambda tenant, doc_id: DocumentEvent(tenant=tenant, doc_id=doc_id, op="delete"),
    st.sampled_from(TENANTS),
    doc_ids,
)


def _raw(e: DocumentEvent, **change: object) -> bytes:
    data = json.loads(e.to_bytes())
    for k, v in change.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    return json.dumps(data).encode()


_DROP = object()

# Each turns a valid event into one the indexer must refuse: (key, value) on the topic.
BREAKERS = [
    lambda e, b: (e.key, e.to_bytes()[: len(e.to_bytes()) // 2]),  # truncated JSON
    lambda e, b: (e.key, b),  # arbitrary bytes (never a JSON object)
    # A null value deletes the document its key names; under a key that names none it is bad.
    lambda e, b: (e.tenant.encode(), None),
    lambda e, b: (e.key, b"[1, 2, 3]"),
    lambda e, b: (e.key, _raw(e, version="seven")),
    lambda e, b: (e.key, _raw(e, version=1.5)),
    lambda e, b: (e.key, _raw(e, version=-1)),
    lambda e, b: (e.key, _raw(e, version=2**63)),  # larger than Milvus' INT64
    lambda e, b: (e.key, _raw(e, tenant=5)),
    lambda e, b: (e.key, _raw(e, doc_id=["list"])),
    lambda e, b: (e.key, _raw(e, metadata="not an object")),
    lambda e, b: (e.key, _raw(e, metadata={"nested": {"no": 1}})),
    lambda e, b: (e.key, _raw(e, op="explode")),
    lambda e, b: (e.key, _raw(e, op="DELETE")),
    lambda e, b: (e.key, _raw(e, surprise=1)),
    lambda e, b: (e.key, _raw(e, version=None, tenant=_DROP)),
    lambda e, b: (b"mallory/" + e.doc_id.encode(), _raw(e, tenant="mallory")),  # unknown tenant
    lambda e, b: (b"x/y", _raw(e, tenant="../acme")),
    lambda e, b: (e.key, _raw(e, doc_id=" lead")),
    lambda e, b: (e.key, _raw(e, doc_id="a\x00b")),
    lambda e, b: (e.key, _raw(e, doc_id="zero\u200bwidth")),
    lambda e, b: (e.key, _raw(e, doc_id="\ud800")),
    lambda e, b: (e.key, _raw(e, doc_id="x" * 600)),
    lambda e, b: (e.key, _raw(e, op="upsert", text="lone \ud800 surrogate")),
    lambda e, b: (e.key, _raw(e, op="upsert", text="x" * (FUZZ_MAX_TEXT + 1))),  # too large
    lambda e, b: (e.key, _raw(e, op="upsert", text=None)),
    lambda e, b: (e.key, _raw(e, op="delete", text="a delete with text")),
    # A valid event under another document's key: a spoofed key must not write anything.
    lambda e, b: (b"acme/\x00victim", e.to_bytes()),
]
invalid_records = st.tuples(
    valid_events,
    st.binary(max_size=40).filter(lambda b: not b.lstrip().startswith(b"{")),
    st.sampled_from(range(len(BREAKERS))),
).map(lambda t: (BREAKERS[t[2]](t[0], t[1]), t[2]))
records = st.one_of(
    valid_events.map(lambda e: ("ok", e)),
    tombstones.map(lambda e: ("tombstone", e)),
    invalid_records.map(lambda r: ("bad", r)),
)


class FuzzRun:
    """One topic, collection set and indexer for a whole hypothesis run: each example appends
    its stream, and the index must equal the truth of everything sent so far."""

    def __init__(
        self, settings: Settings, embedder: Embedder, faults: Faults, check_every: int = 1
    ) -> None:
        tag = f"{settings.topic_prefix}z{uuid.uuid4().hex[:6]}"
        self.settings = settings.model_copy(
            update={
                "topic_prefix": tag, "collection_prefix": tag, "indexer_group": tag,
                "tenants": TENANTS, "max_text_bytes": FUZZ_MAX_TEXT,
            }
        )  # fmt: skip
        ensure_topics(self.settings)
        self.embedder = embedder
        self.faults = faults
        self.sent = 0
        self.examples = 0
        self.check_every = check_every
        self.valid: list[DocumentEvent] = []
        self.invalid: list[bytes] = []
        self.member = IndexerThread(self.settings, embedder)

    def example(self, stream: list) -> None:
        s = self.settings
        records: list[tuple[bytes | None, bytes | None]] = []
        for kind, item in stream:
            if kind == "ok":
                records.append((item.key, item.to_bytes()))
                self.valid.append(item)
            elif kind == "tombstone":
                records.append((item.key, None))
                self.valid.append(item)
            else:
                (key, value), breaker = item
                records.append((key, value))
                self.invalid.append(value or b"")
                self.faults.add(f"invalid #{breaker}")
        self.faults.add("valid events", sum(kind != "bad" for kind, _ in stream))
        self.faults.add("invalid events", sum(kind == "bad" for kind, _ in stream))
        send(s, records)
        self.sent += len(records)
        self.examples += 1
        wait_caught_up(s, 600, alive=self.member.alive)
        if self.examples % self.check_every == 0:
            self.check()

    def check(self) -> None:
        """Everything sent so far: DLQ, truth, and exact per-tenant searches."""
        s = self.settings
        letters = dead_letters(s)
        assert sorted(d.value or b"" for d in letters) == sorted(self.invalid), (
            f"{len(letters)} dead letters for {len(self.invalid)} invalid events"
        )
        assert all(d.error and d.stage == "parse" for d in letters)
        report = truth(s, self.embedder, sample=5)
        assert_truth(report)
        # One document's events share a partition, in the order sent: that order is the log's.
        latest = {
            k: logged.event
            for k, logged in latest_events(
                Logged(e, 0, i) for i, e in enumerate(self.valid)
            ).items()
        }
        assert report.docs == len(latest)

        # Each tenant finds exactly its own live documents (all of them, when k can hold them).
        store = ChunkStore(s, self.embedder.model_id, self.embedder.dim)
        try:
            searcher = Searcher(s, self.embedder, store)
            live = {k: e for k, e in latest.items() if e.op == "upsert"}
            states = store.doc_states(live)
            for tenant in TENANTS:
                mine = {
                    e.doc_id for k, e in live.items() if e.tenant == tenant and states[k].chunk_ids
                }
                chunks = sum(
                    len(states[k].chunk_ids) for k, e in live.items() if e.tenant == tenant
                )
                hits = searcher.search("document text", tenant=tenant, k=100)
                found = {h.doc_id for h in hits}
                assert found <= mine, f"{tenant} saw foreign or dead documents: {found - mine}"
                if chunks <= 100:
                    assert found == mine, f"{tenant} misses {mine - found}"
                for h in hits:
                    version = live[doc_key(tenant, h.doc_id)].version
                    assert version is None or h.version == version
                self.faults.add("tenant searches")
        finally:
            store.close()

    def close(self) -> None:
        stats = self.member.close()
        assert stats.consumed == self.sent


def fuzzed_events(settings: Settings, embedder: Embedder, scale: Scale) -> Faults:
    faults = Faults()
    fuzz = FuzzRun(settings, embedder, faults, scale.fuzz_check_every)

    # Streams of at most ~70 events: hypothesis' per-example data budget keeps bigger ones from
    # being generated well; the soak reaches 10k events with more examples on one growing index.
    @given(stream=st.lists(records, min_size=scale.fuzz_events // 2, max_size=scale.fuzz_events))
    @hsettings(
        max_examples=scale.fuzz_examples,
        deadline=None,
        database=None,
        derandomize=scale.fuzz_derandomize,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(stream: list) -> None:
        fuzz.example(stream)
        faults.add("examples")

    try:
        run()
        if fuzz.examples % fuzz.check_every:  # the last examples were not checked yet
            fuzz.check()
    finally:
        fuzz.close()
    kinds = [k for k in faults.counts if k.startswith("invalid #")]
    faults.counts["kinds of invalid event"] = len(kinds)
    for k in kinds:
        del faults.counts[k]
    return faults


@pytest.mark.slow  # real processes and outages: 20-110 s
def test_fuzzed_events_are_indexed_or_dead_lettered(settings, embedder):
    faults = fuzzed_events(settings, embedder, CI)
    report_faults("fuzzed events", faults)
    assert faults.counts["examples"] == CI.fuzz_examples
    assert faults.counts["valid events"] and faults.counts["invalid events"]
