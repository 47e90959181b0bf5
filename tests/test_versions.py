"""Which write wins: the log orders a document's events, not the producers' clocks (issue 11.3).

On the real broker and Milvus Lite: an acknowledged write is never overridden by one
acknowledged earlier, whatever the clock of the host that published it; sources with their own
versions keep them as a guard against their own stale re-sends; the truth checker folds the
topic with the indexer's rule, so the index equals the topic afterwards.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from headwater.versions import Stamp, supersedes
from index.search import Searcher
from index.store import ChunkStore, doc_key
from producers.publisher import DocumentPublisher
from service.gateway import create_app
from tests.chaos import IndexerThread, assert_truth, truth

# -- the rule (pure) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "current", "wins"),
    [
        (Stamp(None, 0, 5), None, True),  # nothing indexed yet
        (Stamp(None, 0, 6), Stamp(None, 0, 5), True),  # later in the log
        (Stamp(None, 0, 4), Stamp(None, 0, 5), False),  # a redelivered older record
        (Stamp(None, 0, 5), Stamp(None, 0, 5), False),  # the same record again
        (Stamp(3, 0, 6), Stamp(7, 0, 5), False),  # the source re-sent an older version
        (Stamp(7, 0, 6), Stamp(7, 0, 5), True),  # the same source version sent again, later
        (Stamp(9, 0, 4), Stamp(7, 0, 5), False),  # earlier in the log, whatever its version
        (Stamp(1, 0, 6), Stamp(None, 0, 5), True),  # versioned after unversioned: the log
        (Stamp(None, 0, 6), Stamp(10**18, 0, 5), True),  # unversioned after versioned: the log
        (Stamp(None, 2, 1), Stamp(None, 1, 9), True),  # a repartitioned topic: arrival order
    ],
)
def test_the_rule(new: Stamp, current: Stamp | None, wins: bool) -> None:
    assert supersedes(new, current) is wins


def test_readers_see_the_source_version_else_the_offset() -> None:
    assert Stamp(42, 3, 7).reported == 42
    assert Stamp(None, 3, 7).reported == 7


# -- on the real stack -----------------------------------------------------------------------------


@pytest.fixture
def hosts(settings, embedder):
    """Two gateway "hosts" (each with its own publisher) in front of one indexer."""
    member = IndexerThread(settings, embedder)
    member.wait_assigned()
    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    searcher = Searcher(settings, embedder, store)
    publishers = [DocumentPublisher(settings), DocumentPublisher(settings)]
    clients = [
        TestClient(create_app(settings, searcher=searcher, publisher=p, query_client=None))
        for p in publishers
    ]
    yield SimpleNamespace(
        a=clients[0], b=clients[1], store=store, settings=settings, embedder=embedder
    )
    member.close()
    for p in publishers:
        p.close()
    store.close()


def _search(client: TestClient, q: str, token: str) -> list[str]:
    r = client.get("/v1/search", params={"q": q, "k": 10, "token": token})
    assert r.status_code == 200, r.text
    return [h["doc_id"] for h in r.json()["hits"]]


def test_a_delete_after_an_upsert_from_a_host_whose_clock_is_ahead_wins(
    hosts, monkeypatch: pytest.MonkeyPatch
):
    """The measured bug: host A's clock runs an hour ahead; A upserts, then B deletes. Both get
    a 200; the delete was acknowledged last, so the document must be gone."""
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 3600 * 10**9)
    r = hosts.a.post("/v1/documents", json={"doc_id": "plan.md", "text": "# Plan\n\nlaunch day"})
    assert r.status_code == 200, r.text
    monkeypatch.setattr(time, "time_ns", real)
    r = hosts.b.delete("/v1/documents/plan.md")
    assert r.status_code == 200, r.text
    assert _search(hosts.b, "launch day plan", r.json()["token"]) == []
    state = hosts.store.doc_states([doc_key("default", "plan.md")])[doc_key("default", "plan.md")]
    assert state.deleted
    assert_truth(truth(hosts.settings, hosts.embedder))


def test_source_versions_and_unversioned_writes_mix_in_log_order(hosts):
    """A corpus (versions = seq + 1) and API edits without a version, on one document."""
    key = doc_key("default", "guide.md")
    with DocumentPublisher(hosts.settings) as pub:
        pub.upsert("guide.md", "# Guide\n\ncorpus text five", version=5, source="corpus")
        pub.upsert("guide.md", "# Guide\n\nan API edit without a version")
        # Later in the log: the corpus' next edit applies (a clock version would outrank it).
        token = pub.upsert("guide.md", "# Guide\n\ncorpus text six", version=6, source="corpus")
        assert "guide.md" in _search(hosts.a, "corpus text six", str(token))
        state = hosts.store.doc_states([key])[key]
        assert (state.stamp.version, state.version) == (6, 6)
        # The corpus re-sends an older version: stale, even though it is later in the log.
        token = pub.upsert("guide.md", "# Guide\n\ncorpus text four", version=4, source="corpus")
        _search(hosts.a, "corpus", str(token))
        assert hosts.store.doc_states([key])[key].stamp.version == 6
        # An unversioned delete is later in the log than everything: it wins.
        token = pub.delete("guide.md")
        assert _search(hosts.a, "corpus text six", str(token)) == []
    hits_state = hosts.store.doc_states([key])[key]
    assert hits_state.deleted and hits_state.stamp.version is None
    assert hits_state.version == hits_state.stamp.offset  # readers see the offset
    assert_truth(truth(hosts.settings, hosts.embedder))
