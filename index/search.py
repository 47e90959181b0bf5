"""Search over the fresh index: hybrid dense + BM25 within one tenant, live versions only."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from typing import Any

from headwater.errors import FreshnessTimeout, SearchError, UnknownTenantError
from headwater.events import Hit, IndexedDocument
from headwater.settings import Settings
from index.embedder import Embedder
from index.store import ChunkStore, doc_key

MAX_K = 100
ROUNDS = 3  # over-fetch rounds when many hits belong to superseded versions

TokenWaiter = Callable[[str, float], bool]


class Searcher:
    """Embeds the query, searches the tenant's chunks, keeps only live chunks of live documents."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: ChunkStore,
        wait_for_token: TokenWaiter | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self._wait = wait_for_token
        self._progress: Any = None

    def search(self, query: str, *, tenant: str, k: int = 5, token: str | None = None) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise SearchError("the query is empty")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise SearchError(f"k must be an integer from 1 to {MAX_K}")
        if not self.settings.tenant_known(tenant):
            raise UnknownTenantError(f"unknown tenant {tenant!r}")
        if token:
            self.wait(token)
        vector = self.embedder.encode([query])[0]
        limit = max(4 * k, 20)
        hits: list[Hit] = []
        for _ in range(ROUNDS):
            raw = self.store.search(vector, query, tenant=tenant, limit=limit)
            hits = self.live(raw, tenant)
            if len(hits) >= k or len(raw) < limit:
                break
            limit *= 4  # many hits were superseded chunks awaiting cleanup: look deeper
        return hits[:k]

    def documents(
        self, doc_ids: list[str], *, tenant: str, token: str | None = None
    ) -> list[IndexedDocument]:
        """The live documents among `doc_ids` (at most MAX_K), in that order; others are left out.

        The text is rebuilt from the live chunks: exact for a one-chunk document, the chunker's
        normalised text otherwise.
        """
        if len(doc_ids) > MAX_K:
            raise SearchError(f"at most {MAX_K} documents at once")
        if not self.settings.tenant_known(tenant):
            raise UnknownTenantError(f"unknown tenant {tenant!r}")
        if token:
            self.wait(token)
        keys = {d: doc_key(tenant, unicodedata.normalize("NFC", d)) for d in doc_ids}
        states = self.store.doc_states(set(keys.values()))
        live = [states[k] for k in keys.values() if k in states and not states[k].deleted]
        texts = self.store.texts({c for s in live for c in s.chunk_ids})
        out = []
        for doc_id, key in keys.items():
            state = states.get(key)
            if state is None or state.deleted:
                continue
            out.append(
                IndexedDocument(
                    doc_id=doc_id, version=state.version, chunk_ids=list(state.chunk_ids),
                    text="\n\n".join(texts.get(c, "") for c in state.chunk_ids),
                    metadata=state.metadata,
                )
            )  # fmt: skip
        return out

    def check_token(self, token: str) -> None:
        """TokenBeyondLog (422) at once for a token that names no acknowledged write: a caller
        checks it before queuing a search that would wait for it in vain."""
        try:
            self._tracker().check_reachable(token)
        except SearchError:
            raise
        except ValueError as exc:
            raise SearchError(f"bad freshness token: {exc}") from exc

    def _tracker(self) -> Any:
        if self._progress is None:
            from headwater.progress import Progress

            # One admin connection per searcher: connecting per query would dominate the wait.
            self._progress = Progress(self.settings)
        return self._progress

    def wait(self, token: str) -> None:
        """Block (bounded) until the indexer has applied `token`; SearchError if it has not."""
        if self._wait is None:
            progress = self._tracker()
            self._wait = lambda tok, timeout: progress.wait_for_token(tok, timeout)
        waiter = self._wait
        timeout = self.settings.freshness_wait_s
        t0 = time.monotonic()
        try:
            applied = waiter(token, timeout)
        except SearchError:
            raise
        except ValueError as exc:
            raise SearchError(f"bad freshness token: {exc}") from exc
        if not applied:
            raise FreshnessTimeout(
                f"the index has not applied token {token} within {time.monotonic() - t0:.1f}s"
            )

    def live(self, candidates: list[Hit], tenant: str) -> list[Hit]:
        """The candidates that are live chunks, at their document's live version and metadata."""
        keys = {h.doc_id: doc_key(tenant, h.doc_id) for h in candidates}
        states = self.store.doc_states(set(keys.values()))
        live_sets = {k: set(s.chunk_ids) for k, s in states.items() if not s.deleted}
        hits = []
        for h in candidates:
            key = keys[h.doc_id]
            if h.chunk_id not in live_sets.get(key, ()):
                continue  # superseded version, deleted document, or not yet swapped in
            state = states[key]
            hits.append(
                h.model_copy(update={"version": state.version, "score": abs(h.score),
                                     "metadata": state.metadata})
            )  # fmt: skip
        return hits
