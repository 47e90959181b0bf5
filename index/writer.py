"""Applies document events to the index: embed only new chunks, swap, then clean up.

Order of writes for one document, each step idempotent so a replay after a crash at any point
converges: (1) upsert chunk rows that the index does not hold yet, (2) upsert the document state
(stamp + live chunk ids: the swap; a long id list's pages first), (3) delete the document's rows
(and pages) outside the live set. Search reads through the state, so between (1) and (3)
readers see exactly one version. Which event of a document wins is `headwater.versions`' rule.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from headwater.errors import ChunkerError, EmbedderError, TooManyChunks
from headwater.events import ChangeEvent, DocumentEvent, Logged
from headwater.settings import Settings
from headwater.versions import supersedes
from index.chunker import Chunk, chunk_document
from index.embedder import Embedder
from index.store import INLINE_IDS, ChunkRow, ChunkStore, DocState, doc_key

log = logging.getLogger(__name__)

CHUNKS = Counter("headwater_chunks_total", "Chunks by outcome", ["outcome"])
STALE = Counter("headwater_stale_events_total", "Events older than or equal to the index")
COALESCED = Counter(
    "headwater_coalesced_events_total", "Events superseded by a newer version in the same batch"
)
EMBED_SECONDS = Histogram("headwater_embed_seconds", "Time to embed one batch of chunks")
EMBED_RETRIES = 2
DELETE_IDS_PER_EXPR = 2000
WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'-]{2,30}")


@dataclass
class Applied:
    """Outcome of one batch: what changed and what was refused (per event, with why)."""

    changes: list[tuple[Logged, ChangeEvent]] = field(default_factory=list)  # by cause
    applied: list[Logged] = field(default_factory=list)
    failed: list[tuple[Logged, Exception]] = field(default_factory=list)
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    stale: int = 0
    coalesced: int = 0  # superseded by a newer version of their document in the same batch


@dataclass
class _Plan:
    logged: Logged
    key: str
    previous: DocState | None
    chunks: list[Chunk]
    vector_sum: np.ndarray | None = None

    @property
    def event(self) -> DocumentEvent:
        return self.logged.event


class IndexWriter:
    def __init__(self, settings: Settings, embedder: Embedder, store: ChunkStore) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.max_tokens = max(32, embedder.max_tokens - 2)  # room for [CLS] and [SEP]
        self.target_tokens = min(settings.chunk_tokens, self.max_tokens)

    def chunk(
        self, event: DocumentEvent, budget_s: float | None = None, max_chunks: int | None = None
    ) -> list[Chunk]:
        """The chunks of an upsert; ChunkBudgetExceeded past `budget_s`, TooManyChunks past
        `max_chunks`."""
        return chunk_document(
            event.tenant,
            event.doc_id,
            event.text or "",
            tokenizer=self.embedder,
            target_tokens=self.target_tokens,
            max_tokens=self.max_tokens,
            budget_s=budget_s,
            max_chunks=max_chunks,
        )

    def _bounded_chunks(self, event: DocumentEvent) -> list[Chunk]:
        """The chunks of an event to apply, within the per-document time and count bounds."""
        if event.op != "upsert":
            return []
        try:
            return self.chunk(event, self.settings.chunk_budget_s, self.settings.max_doc_chunks)
        except TooManyChunks as e:  # the operator's knob belongs in the reason
            raise TooManyChunks(f"{e}; the limit is HEADWATER_MAX_DOC_CHUNKS") from None

    def apply(self, items: Sequence[Logged]) -> Applied:
        """Apply events (in log order per document) to the index.

        An event whose document cannot be chunked or embedded is reported in `failed` and the
        document's previous event in the batch (if it would have applied) is tried instead;
        the rest of the batch goes on. Raises StoreError if Milvus fails.
        """
        out = Applied()
        if not items:
            return out
        keys = [doc_key(i.event.tenant, i.event.doc_id) for i in items]
        states = self.store.doc_states(keys)
        # Per document, the events that successively supersede the index's state: the last
        # applies, and each one before it is the fallback should the one after it fail.
        chains: dict[str, list[Logged]] = {}
        recheck: set[str] = set()
        for key, item in zip(keys, items, strict=True):
            chain = chains.get(key)
            current = chain[-1].stamp if chain else getattr(states.get(key), "stamp", None)
            if supersedes(item.stamp, current):
                chains.setdefault(key, []).append(item)
                continue
            out.stale += 1
            if not chain and item.stamp == current:
                # A redelivery of what the index holds: a crash may have stopped its cleanup.
                recheck.add(key)
        # Versions a newer one in the same batch superseded: never embedded unless it fails.
        out.coalesced = sum(len(chain) - 1 for chain in chains.values())
        STALE.inc(out.stale)
        COALESCED.inc(out.coalesced)

        plans: list[_Plan] = []
        todo = list(chains)
        while todo:
            ready = [p for p in (self._plan(k, chains[k], states.get(k), out) for k in todo) if p]
            written, failed = self._embed_and_write(ready, out)
            plans += written
            for plan in failed:
                chains[plan.key].pop()
            todo = [p.key for p in failed if chains[p.key]]

        self.store.write_states([self._state(p) for p in plans])
        cleanup = {p.key: [c.chunk_id for c in p.chunks] for p in plans}
        cleanup_keys = set(cleanup)
        for key in recheck - cleanup_keys:
            state = states[key]
            cleanup[key] = [] if state.deleted else list(state.chunk_ids)
        self._remove_stale(cleanup)
        # Chunk-id pages outlive their state only where one had pages (or after a crash).
        paged = [
            self._state(p)
            for p in plans
            if (p.previous is not None and p.previous.pages) or len(p.chunks) > INLINE_IDS
        ]
        paged += [states[key] for key in recheck - cleanup_keys]  # fmt: skip
        self.store.remove_stale_pages(paged)

        for p in plans:
            out.applied.append(p.logged)
            change = self._change(p)
            if change is not None:
                out.changes.append((p.logged, change))
                out.removed += len(change.removed_chunk_ids)
        CHUNKS.labels("embedded").inc(out.embedded)
        CHUNKS.labels("reused").inc(out.reused)
        CHUNKS.labels("removed").inc(out.removed)
        return out

    # -- steps ---------------------------------------------------------------------------------
    def _plan(
        self, key: str, chain: list[Logged], previous: DocState | None, out: Applied
    ) -> _Plan | None:
        """The plan of the chain's last event that can be chunked (failures are reported)."""
        while chain:
            logged = chain[-1]
            try:
                return _Plan(logged, key, previous, self._bounded_chunks(logged.event))
            except ChunkerError as exc:
                log.warning("cannot chunk %s/%s: %s", logged.event.tenant, logged.event.doc_id,
                            exc)  # fmt: skip
                out.failed.append((logged, exc))
                chain.pop()
        return None

    def _embed_and_write(self, plans: list[_Plan], out: Applied) -> tuple[list[_Plan], list[_Plan]]:
        """Embed the chunks the index lacks and write them; (written plans, failed plans)."""
        wanted = [c.chunk_id for p in plans for c in p.chunks]
        held = self.store.existing_chunks(wanted) if wanted else set()
        todo = [(p, [c for c in p.chunks if c.chunk_id not in held]) for p in plans]
        texts = [c.embed_text for _, new in todo for c in new]
        vectors = self._encode(texts)
        ok: list[_Plan] = []
        failed: list[_Plan] = []
        rows: list[ChunkRow] = []
        cursor = 0
        for plan, new in todo:
            if vectors is None:  # the batch failed: find the document(s) that cannot embed
                try:
                    doc_vectors = self._encode_strict([c.embed_text for c in new])
                except Exception as exc:
                    out.failed.append((plan.logged, EmbedderError(f"embedding failed: {exc}")))
                    failed.append(plan)
                    continue
            else:
                doc_vectors = vectors[cursor : cursor + len(new)]
                cursor += len(new)
            rows += [self._row(plan, c, v) for c, v in zip(new, doc_vectors, strict=True)]
            if len(new):
                plan.vector_sum = np.asarray(doc_vectors).sum(axis=0)
            out.reused += len(plan.chunks) - len(new)
            ok.append(plan)
        out.embedded += len(rows)
        self.store.write_chunks(rows)
        return ok, failed

    def _encode(self, texts: list[str]) -> np.ndarray | None:
        try:
            return self._encode_strict(texts)
        except Exception as exc:
            log.warning("embedding a batch of %d chunks failed: %s", len(texts), exc)
            return None

    def _encode_strict(self, texts: list[str]) -> np.ndarray:
        for attempt in range(EMBED_RETRIES + 1):
            try:
                with EMBED_SECONDS.time():
                    return self.embedder.encode(texts)
            except Exception:
                if attempt == EMBED_RETRIES:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _row(self, plan: _Plan, chunk: Chunk, vector: Sequence[float]) -> ChunkRow:
        e = plan.event
        return ChunkRow(
            chunk.chunk_id, e.tenant, plan.key, e.doc_id, plan.logged.stamp.reported,
            chunk.section, chunk.text, vector,
        )  # fmt: skip

    @staticmethod
    def _state(p: _Plan) -> DocState:
        e = p.event
        return DocState(
            key=p.key,
            tenant=e.tenant,
            doc_id=e.doc_id,
            stamp=p.logged.stamp,
            deleted=e.op == "delete",
            chunk_ids=tuple(c.chunk_id for c in p.chunks),
            metadata=dict(e.metadata),
        )

    def _remove_stale(self, live: dict[str, list[str]]) -> None:
        # Chunk ids embed their document, so one expression can clean many documents at once.
        batch_keys: list[str] = []
        batch_ids: list[str] = []
        for key, ids in live.items():
            if batch_keys and len(batch_ids) + len(ids) > DELETE_IDS_PER_EXPR:
                self.store.remove_stale_chunks(batch_keys, batch_ids)
                batch_keys, batch_ids = [], []
            batch_keys.append(key)
            batch_ids += ids
        if batch_keys:
            self.store.remove_stale_chunks(batch_keys, batch_ids)

    def _change(self, p: _Plan) -> ChangeEvent | None:
        prev = p.previous
        before = set() if prev is None or prev.deleted else set(prev.chunk_ids)
        after = [c.chunk_id for c in p.chunks]
        added = [c for c in after if c not in before]
        removed = sorted(before - set(after))
        e = p.event
        if e.op == "delete":
            if prev is None or prev.deleted:
                return None
            op = "deleted"
        elif prev is None or prev.deleted:
            op = "added"
        elif added or removed:
            op = "changed"
        else:
            return None  # same text under a newer version
        new_chunks = [c for c in p.chunks if c.chunk_id in set(added)]
        terms = sorted({w.lower() for c in new_chunks for w in WORD.findall(c.text)})[:200]
        return ChangeEvent(
            tenant=e.tenant,
            doc_id=e.doc_id,
            op=op,
            version=p.logged.stamp.reported,
            previous_version=None if prev is None else prev.version,
            added_chunk_ids=added,
            removed_chunk_ids=removed,
            kept_chunks=len(after) - len(added),
            embedding_sum=None if p.vector_sum is None else [float(x) for x in p.vector_sum],
            terms=terms,
            event_ts=e.ts,
        )
