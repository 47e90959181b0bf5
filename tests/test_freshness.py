"""Read-your-writes: a search with the token a publish returned always sees that write."""

from __future__ import annotations

import threading

import pytest

from consumers.indexer import Indexer
from headwater.errors import FreshnessTimeout, SearchError, UnknownTenantError
from index.search import Searcher
from producers.publisher import DocumentPublisher


@pytest.fixture
def running_indexer(settings, embedder):
    ix = Indexer(settings, embedder=embedder)
    stop = threading.Event()
    thread = threading.Thread(target=ix.run, args=(stop,), daemon=True)
    thread.start()
    yield ix
    stop.set()
    thread.join(60)


def test_search_with_token_sees_the_write(settings, running_indexer):
    searcher = Searcher(settings, running_indexer.embedder, running_indexer.store)
    with DocumentPublisher(settings) as pub:
        for i in range(8):
            word = f"zebracorn{i}"
            token = pub.upsert(f"notes/{i}.md", f"# Note {i}\n\nThe secret word is {word}.")
            hits = searcher.search(f"secret word {word}", tenant="default", k=10, token=str(token))
            assert any(h.doc_id == f"notes/{i}.md" and word in h.text for h in hits), (i, hits)
            # Edit and delete with tokens: the very next search reflects them.
            token = pub.upsert(f"notes/{i}.md", f"# Note {i}\n\nThe word is now quagga{i}.")
            hits = searcher.search(f"word quagga{i}", tenant="default", k=10, token=str(token))
            assert any(h.doc_id == f"notes/{i}.md" and f"quagga{i}" in h.text for h in hits)
            assert all(word not in h.text for h in hits)
        token = pub.delete("notes/0.md")
        hits = searcher.search("secret word quagga0", tenant="default", k=10, token=str(token))
        assert all(h.doc_id != "notes/0.md" for h in hits)


def test_unapplied_or_bad_token_is_a_clear_error(settings, embedder):
    from index.store import ChunkStore

    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    fast = settings.model_copy(update={"freshness_wait_s": 1.0})
    searcher = Searcher(fast, embedder, store)
    with DocumentPublisher(settings) as pub:
        token = pub.upsert("never/indexed.md", "no indexer runs in this test")
    with pytest.raises(FreshnessTimeout, match="has not applied token"):
        searcher.search("anything", tenant="default", token=str(token))
    with pytest.raises(SearchError, match="bad freshness token"):
        searcher.search("anything", tenant="default", token="zero:one")
    with pytest.raises(UnknownTenantError, match="unknown tenant"):
        searcher.search("anything", tenant="intruder")
    with pytest.raises(SearchError, match="k must be"):
        searcher.search("anything", tenant="default", k=0)
