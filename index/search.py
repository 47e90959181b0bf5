"""Search over the fresh index: hybrid dense + BM25 within one tenant, live versions only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from headwater.settings import Settings
from index.embedder import Embedder
from index.store import ChunkStore, RawHit

MAX_K = 100
ROUNDS = 3  # over-fetch rounds when many hits belong to superseded versions


class SearchError(ValueError):
    """A search that cannot be run as asked (bad argument, unknown tenant, stale token)."""


@dataclass(frozen=True)
class Hit:
    doc_id: str
    version: int
    chunk_id: str
    score: float
    text: str
    section: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FreshnessTimeout(SearchError):
    """The indexer has not applied the freshness token within the bounded wait."""


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

    def search(self, query: str, *, tenant: str, k: int = 5, token: str | None = None) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise SearchError("the query is empty")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise SearchError(f"k must be an integer from 1 to {MAX_K}")
        if not self.settings.tenant_known(tenant):
            raise SearchError(f"unknown tenant {tenant!r}")
        if token:
            self.wait(token)
        vector = self.embedder.encode([query])[0]
        limit = max(4 * k, 20)
        hits: list[Hit] = []
        for _ in range(ROUNDS):
            raw = self.store.search(vector, query, tenant=tenant, limit=limit)
            hits = self._live(raw)
            if len(hits) >= k or len(raw) < limit:
                break
            limit *= 4  # many hits were superseded chunks awaiting cleanup: look deeper
        return hits[:k]

    def wait(self, token: str) -> None:
        """Block (bounded) until the indexer has applied `token`; SearchError if it has not."""
        if self._wait is None:
            from consumers.progress import Progress

            # One admin connection per searcher: connecting per query would dominate the wait.
            progress = Progress(self.settings)
            self._wait = lambda tok, timeout: progress.wait_for_token(tok, timeout)
        waiter = self._wait
        timeout = self.settings.freshness_wait_s
        t0 = time.monotonic()
        try:
            applied = waiter(token, timeout)
        except ValueError as exc:
            raise SearchError(f"bad freshness token: {exc}") from exc
        if not applied:
            raise FreshnessTimeout(
                f"the index has not applied token {token} within {time.monotonic() - t0:.1f}s"
            )

    def _live(self, raw: list[RawHit]) -> list[Hit]:
        states = self.store.doc_states({h.doc_key for h in raw})
        live_sets = {k: set(s.chunk_ids) for k, s in states.items() if not s.deleted}
        hits = []
        for h in raw:
            live = live_sets.get(h.doc_key)
            if live is None or h.chunk_id not in live:
                continue  # superseded version, deleted document, or not yet swapped in
            state = states[h.doc_key]
            hits.append(
                Hit(h.doc_id, state.version, h.chunk_id, abs(h.score), h.text, h.section,
                    state.metadata)
            )  # fmt: skip
        return hits
