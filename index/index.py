"""The index of one embedding model as a whole: embedder → store → searcher, wired once."""

from __future__ import annotations

from dataclasses import dataclass

from headwater.settings import Settings
from index.embedder import Embedder, load_embedder
from index.search import Searcher, TokenWaiter
from index.store import ChunkStore
from index.writer import IndexWriter


@dataclass
class Index:
    """An embedder, its Milvus collections and a searcher over them; `close()` when done."""

    settings: Settings
    embedder: Embedder
    store: ChunkStore
    searcher: Searcher

    def writer(self) -> IndexWriter:
        return IndexWriter(self.settings, self.embedder, self.store)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_index(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    wait_for_token: TokenWaiter | None = None,
) -> Index:
    """The index the settings describe; pass a loaded `embedder` to share it between loops.

    Each call opens its own Milvus connection, as a separate process would.
    """
    embedder = embedder or load_embedder(settings)
    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    return Index(settings, embedder, store, Searcher(settings, embedder, store, wait_for_token))
