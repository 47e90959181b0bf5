"""Document-state rows stay within Milvus' limits for the largest document (issue 11.6).

Checked against a Milvus 2.3 standalone server (the `milvus_server` fixture), which enforces
what Lite does not: a JSON field holds at most 65,536 bytes, and only an object at its top
level. A state row keeps its chunk-id list inline up to `INLINE_IDS` ids and in pages beyond.
"""

from __future__ import annotations

import hashlib

import pytest
from pymilvus import MilvusException

from headwater.versions import Stamp
from index.store import INLINE_IDS, ChunkStore, DocState, doc_key, page_keys
from tests.chaos import IndexerThread, assert_truth, truth, wait_caught_up
from tests.indexing import send


def ids(n: int, salt: str = "") -> tuple[str, ...]:
    return tuple(hashlib.sha256(f"{salt}{i}".encode()).hexdigest()[:32] for i in range(n))


def state(key: str, n: int, offset: int, salt: str = "") -> DocState:
    return DocState(key, "default", "big.md", Stamp(None, 0, offset), False, ids(n, salt),
                    {"team": "x"})  # fmt: skip


@pytest.fixture
def server_store(server_settings):
    store = ChunkStore(server_settings, "m", 4)
    yield store
    store.drop()
    store.close()


def test_the_old_layout_is_refused_by_a_server(server_store):
    """Why the layout changed: a list, or an object over 65,536 bytes, fails on the server."""
    row = {"doc_key": "k" * 40, "tenant": "default", "doc_id": "d", "version": -1,
           "log_partition": 0, "log_offset": 0, "deleted": False, "metadata": {},
           "nil": [0.0, 0.0]}  # fmt: skip
    with pytest.raises(MilvusException):
        server_store.client.upsert(server_store.docs, [{**row, "chunk_ids": list(ids(3))}])
    too_long = {"ids": list(ids(2000))}  # ~72 KB of JSON: a 720 KB Markdown file makes as many
    with pytest.raises(MilvusException):
        server_store.client.upsert(server_store.docs, [{**row, "chunk_ids": too_long}])


def test_the_largest_document_fits_inline_or_in_pages(server_store, server_settings):
    store = server_store
    key = doc_key("default", "big.md")
    most = server_settings.max_doc_chunks
    assert most > INLINE_IDS  # the default bound needs pages
    big = state(key, most, offset=10)
    store.write_states([big])
    assert store.doc_states([key])[key] == big
    assert [s for s in store.iter_doc_states() if s.key == key] == [big]
    assert len(store._query_in(store.lists, "doc_key", [key], ["page_key"])) == big.pages

    # A newer state: new pages first, the row, then the old pages go; readers never mix them.
    newer = state(key, INLINE_IDS + 1, offset=11, salt="b")
    store.write_states([newer])
    assert store.doc_states([key])[key] == newer
    store.remove_stale_pages([newer])
    pages = {r["page_key"] for r in store._query_in(store.lists, "doc_key", [key], ["page_key"])}
    assert pages == set(page_keys(key, newer.stamp, newer.pages)) and len(pages) == 2

    small = state(key, 3, offset=12, salt="c")  # back to inline: every page goes
    store.write_states([small])
    store.remove_stale_pages([small])
    assert store.doc_states([key])[key] == small
    assert store._query_in(store.lists, "doc_key", [key], ["page_key"]) == []


def test_a_reader_holding_an_older_row_reads_it_again(server_store):
    """The pages of a state row are keyed by its log position: after a newer state replaced
    them, a reader that fetched the older row finds its pages gone and re-reads the row."""
    store = server_store
    key = doc_key("default", "big.md")
    old = state(key, INLINE_IDS * 2, offset=1)
    store.write_states([old])
    rows = store._query_in(store.docs, "doc_key", [key], ["doc_key", "chunk_ids", "version",
                           "log_partition", "log_offset", "tenant", "doc_id", "deleted",
                           "metadata"])  # fmt: skip
    new = state(key, INLINE_IDS * 2, offset=2, salt="n")
    store.write_states([new])
    store.remove_stale_pages([new])
    assert store._resolve(rows) == {}  # the old row's pages are gone: not a mixed state
    assert store.doc_states([key])[key] == new


@pytest.mark.slow  # the embedder on ~1,600 chunks, and a 2.3 server: 30-90 s
def test_a_document_past_the_inline_list_is_indexed_on_a_server(server_settings, embedder):
    """End to end on the 2.3 server (dense-only there): a document of more chunks than one
    state row can list, then an edit, then a delete; the index equals the topic each time."""
    from headwater.events import DocumentEvent

    s = server_settings.model_copy(update={"chunk_tokens": 16})
    sections = [f"## Part {i}\n\nitem {i} of the long list." for i in range(INLINE_IDS + 100)]
    text = "# A long document\n\n" + "\n\n".join(sections)
    member = IndexerThread(s, embedder)
    try:
        send(s, [DocumentEvent(tenant="default", doc_id="long.md", op="upsert", text=text)])
        wait_caught_up(s, 600, alive=member.alive)
        store = member.indexer.store
        key = doc_key("default", "long.md")
        held = store.doc_states([key])[key]
        assert held.pages >= 1 and len(held.chunk_ids) > INLINE_IDS
        assert not store.hybrid  # Milvus 2.3 has no BM25: the dense-only path
        assert_truth(truth(s, embedder))
        edited = text.replace("item 7 of", "item seven of")
        send(s, [DocumentEvent(tenant="default", doc_id="long.md", op="upsert", text=edited),
                 DocumentEvent(tenant="default", doc_id="long.md", op="delete")])  # fmt: skip
        wait_caught_up(s, 600, alive=member.alive)
        assert store.doc_states([key])[key].deleted
        assert store._query_in(store.lists, "doc_key", [key], ["page_key"]) == []
        assert_truth(truth(s, embedder))
    finally:
        member.close()
