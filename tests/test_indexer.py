"""The freshness pipeline on the real broker and Milvus Lite: publish -> index -> search."""

from __future__ import annotations

import json
import random
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumers.indexer import Indexer
from headwater.errors import StoreError
from headwater.events import DocumentEvent
from headwater.runtime.clients import consumer
from headwater.runtime.deadletter import DeadLetter
from headwater.topics import ensure_topics
from index.search import Searcher
from tests.indexing import CORPORA, check_truth, corpus_event, corpus_records, drain, send


def doc(doc_id: str, version: int, text: str | None, tenant: str = "default") -> DocumentEvent:
    op = "upsert" if text is not None else "delete"
    return DocumentEvent(tenant=tenant, doc_id=doc_id, op=op, version=version, text=text)


@pytest.fixture
def indexer(settings, embedder):
    ix = Indexer(settings, embedder=embedder)
    yield ix
    ix.close()


def texts(searcher: Searcher, query: str, k: int = 5) -> list[tuple[str, int, str]]:
    return [(h.doc_id, h.version, h.text) for h in searcher.search(query, tenant="default", k=k)]


def test_publish_edit_delete_visible_in_search(settings, indexer):
    s = Searcher(settings, indexer.embedder, indexer.store)
    send(settings, [
        doc("pages/tar.md", 1, "# tar\n\n> Archiving utility.\n\n- Extract an archive: `tar xf a`"),
        doc("pages/git.md", 1, "# git\n\n> Distributed version control.\n\n- Commit: `git commit`"),
    ])  # fmt: skip
    drain(indexer)
    hits = texts(s, "extract an archive")
    assert hits[0][:2] == ("pages/tar.md", 1)

    send(
        settings,
        [doc("pages/tar.md", 2, "# tar\n\n> Tape archiver.\n\n- Unpack gzip: `tar xzf a.tgz`")],
    )
    drain(indexer)
    hits = texts(s, "tape archiver unpack gzip")
    tar = [h for h in hits if h[0] == "pages/tar.md"]
    assert tar and all(v == 2 for _, v, _ in tar)
    assert not any("Archiving utility" in t for _, _, t in hits)

    send(settings, [doc("pages/tar.md", 3, None)])
    drain(indexer)
    assert all(h[0] != "pages/tar.md" for h in texts(s, "tape archiver unpack gzip", k=10))
    # A late, older upsert cannot resurrect the deleted document (the tombstone wins).
    send(settings, [doc("pages/tar.md", 2, "# tar\n\nresurrected text")])
    drain(indexer)
    assert all(h[0] != "pages/tar.md" for h in texts(s, "resurrected text", k=10))
    assert indexer.stats.stale >= 1
    assert check_truth(indexer).ok
    # Caught up: the model-independent alias now names this model's collection; an engine
    # without aliases (milvus-lite) says so instead of failing the indexer.
    if indexer.store.engine.aliases:
        alias = indexer.store.client.describe_alias(indexer.store.alias)
        assert alias["collection_name"] == indexer.store.chunks
    else:
        assert indexer.store.point_alias() is False


@pytest.mark.skipif(not (CORPORA / "rust-book").exists(), reason="shared corpora absent")
def test_one_paragraph_edit_embeds_only_its_chunks(settings, indexer):
    chapter = max(
        (r for r in corpus_records("rust-book", 105) if r["op"] == "upsert"),
        key=lambda r: len(r["text"]),
    )
    text = chapter["text"]
    send(settings, [doc(chapter["doc_id"], 1, text)])
    drain(indexer)
    total = indexer.stats.embedded
    assert total >= 30, "a long chapter should have many chunks"

    paragraphs = text.split("\n\n")
    i = next(
        j for j in range(len(paragraphs) // 2, len(paragraphs))
        if len(paragraphs[j]) > 200 and not paragraphs[j].startswith(("#", "```", "<"))
    )  # fmt: skip
    paragraphs[i] = paragraphs[i].replace(" the ", " THE EDITED ", 1)
    send(settings, [doc(chapter["doc_id"], 2, "\n\n".join(paragraphs))])
    drain(indexer)
    embedded_for_edit = indexer.stats.embedded - total
    assert 1 <= embedded_for_edit <= 2, f"edit re-embedded {embedded_for_edit} of {total} chunks"
    assert indexer.stats.reused >= total - 2
    report = check_truth(indexer)
    assert report.ok, report.to_dict()


@pytest.mark.skipif(not (CORPORA / "tldr").exists(), reason="shared corpora absent")
def test_duplicated_and_reordered_replay_equals_latest_versions(settings, indexer):
    records = list(corpus_records("tldr"))
    snapshot = [r for r in records if r["seq"] < 5425][:150]
    names = {r["doc_id"] for r in snapshot}
    # The history of those pages, so that edits, deletes and re-adds are exercised.
    history = [r for r in records if r["seq"] >= 5425 and r["doc_id"] in names][:250]
    events = [corpus_event(r) for r in snapshot + history]
    rng = random.Random(7)
    stream: list[DocumentEvent] = []
    for e in events:
        stream.append(e)
        if rng.random() < 0.3:
            stream.append(e)  # duplicate delivery
    # Reorder within small windows: an older version of a key may now arrive after a newer one.
    for start in range(0, len(stream), 8):
        window = stream[start : start + 8]
        rng.shuffle(window)
        stream[start : start + 8] = window
    send(settings, stream)
    drain(indexer)
    report = check_truth(indexer)
    assert report.ok, report.to_dict()
    assert report.docs == len({(e.tenant, e.doc_id) for e in events})
    assert indexer.stats.stale + indexer.stats.coalesced > 0


def test_malformed_events_are_dead_lettered_and_good_ones_indexed(settings, indexer):
    bad = [
        (b"default/x", b"{not json"),
        (b"default/x", b"[1, 2]"),
        (b"default/x", b'{"tenant": "default", "doc_id": "x", "op": "upsert", "version": 1}'),
        (b"default/y", b'{"tenant": "default", "doc_id": "y", "op": "explode", "version": 1}'),
        (b"nobody/z", doc("z", 1, "text", tenant="nobody").to_bytes()),
        (b"default/w", b'{"tenant": "default", "doc_id": "w", "op": "delete", "version": -4}'),
        # A null value deletes the document its key names (test_change_data); this key names none.
        (b"default", None),
    ]
    good = [doc(f"good-{i}", 1, f"# Good {i}\n\nreliable content number {i}") for i in range(5)]
    stream: list = []
    for g, b in zip(good, bad, strict=False):
        stream += [g, b]
    stream += bad[len(good) :]
    send(settings, stream)
    drain(indexer)

    dlq = consumer(settings, settings.dlq_topic, group_id=None, consumer_timeout_ms=3000)
    letters = [DeadLetter.from_record(r) for r in dlq]
    dlq.close()
    assert len(letters) == len(bad)
    assert all(letter.error and letter.offset >= 0 for letter in letters)
    assert {letter.value for letter in letters} == {v for _, v in bad}
    s = Searcher(settings, indexer.embedder, indexer.store)
    found = {h.doc_id for h in s.search("reliable content number", tenant="default", k=10)}
    assert found == {g.doc_id for g in good}


def _valid(i: int) -> dict:
    return {"tenant": "default", "doc_id": f"fz-{i}", "op": "upsert", "version": 1, "text": "ok"}


# Each strategy breaks a valid event in one way that the schema must refuse.
MUTATIONS = st.one_of(
    st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{")),
    st.sampled_from(["version", "tenant", "doc_id", "op"]).map(lambda f: {**_valid(0), f: [1]}),
    st.text(min_size=1, max_size=12)
    .filter(lambda t: t not in ("upsert", "delete"))
    .map(lambda op: {**_valid(0), "op": op}),
    st.sampled_from(["tenant", "doc_id", "op"]).map(
        lambda f: {k: v for k, v in _valid(0).items() if k != f}
    ),
    st.text(min_size=1, max_size=8).map(lambda k: {**_valid(0), "x_" + k: 1}),
    st.text(alphabet="/\\\"' =()[]", min_size=1, max_size=10).map(
        lambda t: {**_valid(0), "tenant": t}
    ),
    st.sampled_from(["a\x00b", "\n", " lead", "x" * 600, "a\u0007"]).map(
        lambda d: {**_valid(0), "doc_id": d}
    ),
    st.integers(max_value=-1).map(lambda v: {**_valid(0), "version": v}),
    st.integers(min_value=2_001, max_value=4_000).map(lambda n: {**_valid(0), "text": "é" * n}),
)


@given(payloads=st.lists(MUTATIONS, min_size=3, max_size=12))
@hsettings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzzed_malformed_events_all_reach_the_dlq(settings, embedder, payloads):
    # hypothesis seeds `random`, so the per-example topic prefix comes from uuid.
    prefix = f"{settings.topic_prefix}f{uuid.uuid4().hex[:6]}"
    small = settings.model_copy(
        update={"max_text_bytes": 4_000, "topic_prefix": prefix, "indexer_group": prefix}
    )
    ensure_topics(small)
    raw = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in payloads]
    good = [doc(f"ok-{i}", 1, f"fine document {i}") for i in range(3)]
    stream: list = list(good)
    for i, value in enumerate(raw):
        stream.insert(min(len(stream), 2 * i), (b"default/fz", value))
    send(small, stream)
    ix = Indexer(small, embedder=embedder)
    try:
        drain(ix)
        dlq = consumer(small, small.dlq_topic, group_id=None, consumer_timeout_ms=3000)
        letters = [DeadLetter.from_record(r) for r in dlq]
        dlq.close()
        assert sorted(letter.value for letter in letters) == sorted(raw)
        assert all(letter.error for letter in letters)
        assert check_truth(ix).ok
        assert ix.stats.consumed == len(stream)
    finally:
        ix.close()


class FlakyStore:
    """The real store whose writes fail `failures` times (Milvus unavailable for a while)."""

    def __init__(self, store, failures: int) -> None:
        self._store = store
        self.failures = failures

    def write_chunks(self, rows):
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("injected: Milvus unavailable")
        return self._store.write_chunks(rows)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_milvus_outage_commits_nothing_then_catches_up(settings, indexer):
    from kafka import TopicPartition

    flaky = FlakyStore(indexer.store, failures=3)
    indexer.writer.store = flaky
    send(settings, [doc(f"o-{i}", 1, f"# outage {i}\n\nsurvives outage {i}") for i in range(6)])
    committed_during_outage = []

    def committed() -> int:
        parts = [TopicPartition(settings.documents_topic, p) for p in range(settings.partitions)]
        return sum(indexer.consumer.committed(tp) or 0 for tp in parts)

    original = indexer.consumer.pause

    def watch_pause(*tps):
        committed_during_outage.append(committed())
        return original(*tps)

    indexer.consumer.pause = watch_pause
    drain(indexer)
    assert indexer.stats.store_retries == 3
    assert committed_during_outage and all(c == 0 for c in committed_during_outage)
    assert committed() == 6
    assert check_truth(indexer).ok


class RecordingEmbedder:
    """The real embedder, recording every text it is asked to embed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts += texts
        return self.inner.encode(texts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_backlog_embeds_only_the_newest_version_of_each_document(settings, embedder):
    """Five versions of one document wait in the topic: the batch that takes them embeds the
    newest version's chunks only, and the index holds exactly that version."""
    versions = [
        doc("pages/multi.md", v, f"# Multi\n\nrevision {v} says {f'word{v} ' * (20 + v)}")
        for v in range(1, 6)
    ]
    other = doc("pages/other.md", 1, "# Other\n\nan unrelated page about rivers")
    send(settings, [*versions, other])
    recording = RecordingEmbedder(embedder)
    ix = Indexer(settings, embedder=recording)
    try:
        drain(ix)
        newest = [c.embed_text for c in ix.writer.chunk(versions[-1])]
        expected = newest + [c.embed_text for c in ix.writer.chunk(other)]
        assert sorted(recording.texts) == sorted(expected)  # nothing of revisions 1-4
        assert ix.stats.coalesced == 4 and ix.stats.stale == 0
        hits = Searcher(settings, embedder, ix.store).search("revision says", tenant="default")
        multi = [h for h in hits if h.doc_id == "pages/multi.md"]
        assert multi and all(h.version == 5 and "revision 5" in h.text for h in multi)
        assert check_truth(ix).ok
    finally:
        ix.close()


def test_batches_grow_while_the_group_lags(settings, embedder):
    """With 60 events waiting and batches of 6, the second batch takes everything that is
    left (up to the backlog bound), so the second versions coalesce with the first."""
    s = settings.model_copy(update={"batch_max_events": 6, "batch_max_backlog_events": 100})
    first = [doc(f"lag/{i}.md", 1, f"# Page {i}\n\nfirst text of page {i}") for i in range(30)]
    second = [doc(f"lag/{i}.md", 2, f"# Page {i}\n\nsecond text of page {i}") for i in range(30)]
    send(s, first + second)
    ix = Indexer(s, embedder=embedder)
    try:
        drain(ix)
        assert ix.stats.consumed == 60
        assert ix.stats.batches == 2, "a lagging group should take its backlog in one batch"
        # Only pages whose first version fell into the first batch were embedded twice.
        assert ix.stats.coalesced >= 30 - 6
        assert ix.stats.embedded <= 30 + 6
        assert check_truth(ix).ok
    finally:
        ix.close()


def test_search_answers_when_no_indexed_row_has_any_text(settings, indexer):
    """milvus-lite 2.5 refuses a BM25 query over rows that hold no term (NaN scores): the
    search answers from the dense side instead of failing."""
    send(settings, [doc("pages/empty.md", 1, "")])
    drain(indexer)
    hits = Searcher(settings, indexer.embedder, indexer.store).search("anything", tenant="default")
    assert all(h.doc_id == "pages/empty.md" for h in hits)
