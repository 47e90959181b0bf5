"""Applies document events to the index: embed only new chunks, swap, then clean up.

Order of writes for one document, each step idempotent so a replay after a crash at any point
converges: (1) upsert chunk rows that the index does not hold yet, (2) upsert the document state
(live version + live chunk ids: the swap), (3) delete the document's rows outside the live set.
Search reads through the state, so between (1) and (3) readers see exactly one version.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from headwater.events import ChangeEvent, DocumentEvent
from headwater.settings import Settings
from index.chunker import Chunk, chunk_document
from index.embedder import Embedder
from index.store import ChunkRow, ChunkStore, DocState, doc_key

log = logging.getLogger(__name__)

CHUNKS = Counter("headwater_chunks_total", "Chunks by outcome", ["outcome"])
STALE = Counter("headwater_stale_events_total", "Events older than or equal to the index")
EMBED_SECONDS = Histogram("headwater_embed_seconds", "Time to embed one batch of chunks")
EMBED_RETRIES = 2
DELETE_IDS_PER_EXPR = 2000
WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'-]{2,30}")


@dataclass
class Applied:
    """Outcome of one batch: what changed and what was refused."""

    changes: list[tuple[DocumentEvent, ChangeEvent]] = field(default_factory=list)  # by cause
    applied: list[DocumentEvent] = field(default_factory=list)
    failed: list[tuple[DocumentEvent, str]] = field(default_factory=list)
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    stale: int = 0


@dataclass
class _Plan:
    event: DocumentEvent
    key: str
    previous: DocState | None
    chunks: list[Chunk]
    vector_sum: np.ndarray | None = None


class IndexWriter:
    def __init__(self, settings: Settings, embedder: Embedder, store: ChunkStore) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.max_tokens = max(32, embedder.max_tokens - 2)  # room for [CLS] and [SEP]
        self.target_tokens = min(settings.chunk_tokens, self.max_tokens)

    def chunk(self, event: DocumentEvent) -> list[Chunk]:
        return chunk_document(
            event.tenant,
            event.doc_id,
            event.text or "",
            tokenizer=self.embedder,
            target_tokens=self.target_tokens,
            max_tokens=self.max_tokens,
        )

    def apply(self, events: Sequence[DocumentEvent]) -> Applied:
        """Apply events (in arrival order) to the index; raises StoreError if Milvus fails."""
        out = Applied()
        if not events:
            return out
        keys = [doc_key(e.tenant, e.doc_id) for e in events]
        states = self.store.doc_states(keys)
        winners: dict[str, DocumentEvent] = {}
        recheck: set[str] = set()
        for key, event in zip(keys, events, strict=True):
            current = winners.get(key) or states.get(key)
            if current is None or event.version > current.version:
                winners[key] = event
                continue
            out.stale += 1
            if key not in winners and event.version == current.version:
                # A redelivery of what the index holds: a crash may have stopped its cleanup.
                recheck.add(key)
        STALE.inc(out.stale)

        plans = []
        for key, event in winners.items():
            chunks = self.chunk(event) if event.op == "upsert" else []
            plans.append(_Plan(event, key, states.get(key), chunks))
        plans = self._embed_and_write(plans, out)

        self.store.write_states([self._state(p) for p in plans])
        cleanup = {p.key: [c.chunk_id for c in p.chunks] for p in plans}
        for key in recheck - cleanup.keys():
            state = states[key]
            cleanup[key] = [] if state.deleted else list(state.chunk_ids)
        self._remove_stale(cleanup)

        for p in plans:
            out.applied.append(p.event)
            change = self._change(p)
            if change is not None:
                out.changes.append((p.event, change))
                out.removed += len(change.removed_chunk_ids)
        CHUNKS.labels("embedded").inc(out.embedded)
        CHUNKS.labels("reused").inc(out.reused)
        CHUNKS.labels("removed").inc(out.removed)
        return out

    # -- steps ---------------------------------------------------------------------------------
    def _embed_and_write(self, plans: list[_Plan], out: Applied) -> list[_Plan]:
        wanted = [c.chunk_id for p in plans for c in p.chunks]
        held = self.store.existing_chunks(wanted) if wanted else set()
        todo = [(p, [c for c in p.chunks if c.chunk_id not in held]) for p in plans]
        out.reused += len(wanted) - sum(len(new) for _, new in todo)
        texts = [c.embed_text for _, new in todo for c in new]
        vectors = self._encode(texts)
        ok: list[_Plan] = []
        rows: list[ChunkRow] = []
        cursor = 0
        for plan, new in todo:
            if vectors is None:  # the batch failed: find the document(s) that cannot embed
                try:
                    doc_vectors = self._encode_strict([c.embed_text for c in new])
                except Exception as exc:
                    out.failed.append((plan.event, f"embedding failed: {exc}"))
                    continue
            else:
                doc_vectors = vectors[cursor : cursor + len(new)]
                cursor += len(new)
            rows += [self._row(plan, c, v) for c, v in zip(new, doc_vectors, strict=True)]
            if len(new):
                plan.vector_sum = np.asarray(doc_vectors).sum(axis=0)
            ok.append(plan)
        out.embedded += len(rows)
        self.store.write_chunks(rows)
        return ok

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
            chunk.chunk_id, e.tenant, plan.key, e.doc_id, e.version, chunk.section, chunk.text,
            vector,
        )  # fmt: skip

    @staticmethod
    def _state(p: _Plan) -> DocState:
        e = p.event
        return DocState(
            key=p.key,
            tenant=e.tenant,
            doc_id=e.doc_id,
            version=e.version,
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
            version=e.version,
            previous_version=None if prev is None else prev.version,
            added_chunk_ids=added,
            removed_chunk_ids=removed,
            kept_chunks=len(after) - len(added),
            embedding_sum=None if p.vector_sum is None else [float(x) for x in p.vector_sum],
            terms=terms,
            event_ts=e.ts,
        )
