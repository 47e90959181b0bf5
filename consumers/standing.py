"""Standing queries: notify subscribers when indexed content comes to match their query, or goes.

The matcher follows the indexer's change events (a consumer group on the changes topic). For
each applied document it reads the added chunks' vectors from Milvus, scores them against the
query embedding of every subscription of the same tenant, and publishes a notification (keyed
by subscription id) for matches above the subscription's threshold. It remembers which chunks
matched, so a later change or delete that removes one is notified too; unrelated changes cost
one vector read and produce nothing.

Subscriptions come from the compacted subscriptions topic, read from the beginning and followed;
before each batch of changes the matcher catches up on it, so a subscription registered before a
document was published is known when that document's change arrives.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter
from pydantic import ValidationError

from consumers.subscriptions import apply_subscription_record
from headwater.errors import EventError
from headwater.events import ChangeEvent, Hit, Notification, Subscription
from headwater.runtime.batches import BatchLoop
from headwater.runtime.deadletter import skip
from headwater.runtime.outbox import Outbox
from headwater.runtime.reader import Tail
from headwater.settings import Settings
from index.embedder import Embedder
from index.store import ChunkStore, doc_key, safe_id

log = logging.getLogger(__name__)

NOTIFIED = Counter("headwater_notifications_total", "Standing-query notifications published")
CHANGES = Counter("headwater_changes_matched_total", "Change events checked by the matcher")
SEED_LIMIT = 1000  # chunks already indexed that a new subscription starts out matching, at most


@dataclass
class _Standing:
    sub: Subscription
    vector: np.ndarray
    matched: dict[str, Hit] = field(default_factory=dict)  # chunk_id -> its hit


class StandingMatcher:
    """Matches change events against subscriptions; run in a thread with `run(stop)`."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: ChunkStore,
        *,
        producer: Any = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.standing: dict[str, _Standing] = {}
        self._producer = producer  # None: the loop's own
        self._subs: Tail | None = None
        self.loop: BatchLoop[ChangeEvent] | None = None
        self.notified = 0
        self.handled = 0  # change events matched and notified (per instance)
        self.ready = threading.Event()  # set once subscriptions were read and changes assigned

    # -- matching (no Kafka) ---------------------------------------------------------------
    def add(self, sub: Subscription, *, seed: bool = True) -> None:
        """Start matching `sub`; `seed` marks what it already matches in the index as matched."""
        vector = self.embedder.encode([sub.query])[0]
        standing = _Standing(sub, vector)
        if seed:
            standing.matched = self._seed(standing)
        self.standing[sub.subscription_id] = standing
        log.info(
            "standing query %s (%s): %r, %d chunks match already",
            sub.subscription_id,
            sub.tenant,
            sub.query[:60],
            len(standing.matched),
        )

    def remove(self, subscription_id: str) -> None:
        self.standing.pop(subscription_id, None)

    def _seed(self, standing: _Standing) -> dict[str, Hit]:
        sub = standing.sub
        # An empty text makes the store search dense-only, so scores are cosine similarities.
        raw = self.store.search(standing.vector, "", tenant=sub.tenant, limit=SEED_LIMIT)
        raw = [h for h in raw if h.score >= sub.threshold]
        states = self.store.doc_states({doc_key(sub.tenant, h.doc_id) for h in raw})
        matched = {}
        for h in raw:
            state = states.get(doc_key(sub.tenant, h.doc_id))
            if state is None or state.deleted or h.chunk_id not in state.chunk_ids:
                continue
            matched[h.chunk_id] = h.model_copy(update={"version": state.version})
        return matched

    def match(self, change: ChangeEvent) -> list[Notification]:
        """The notifications one applied document change causes (and the new matched sets)."""
        CHANGES.inc()
        subs = [s for s in self.standing.values() if s.sub.tenant == change.tenant]
        if not subs:
            return []
        removed: dict[str, list[Hit]] = {}
        for s in subs:
            gone = [s.matched.pop(c) for c in change.removed_chunk_ids if c in s.matched]
            if gone:
                removed[s.sub.subscription_id] = gone
        added: dict[str, list[Hit]] = {}
        rows = (
            self.store.chunk_rows(change.added_chunk_ids, vectors=True)
            if (change.added_chunk_ids)
            else []
        )
        rows = [r for r in rows if r["tenant"] == change.tenant]
        if rows:
            vectors = np.asarray([r["dense"] for r in rows], dtype=np.float32)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            queries = np.stack([s.vector for s in subs])
            scores = vectors @ queries.T  # (chunks, subscriptions) cosine similarities
            for j, s in enumerate(subs):
                for i, r in enumerate(rows):
                    if scores[i, j] < s.sub.threshold:
                        continue
                    cite = Hit(
                        doc_id=change.doc_id,
                        version=change.version,
                        chunk_id=r["chunk_id"],
                        score=round(float(scores[i, j]), 6),
                        text=r["text"],
                        section=r.get("section") or "",
                    )
                    s.matched[r["chunk_id"]] = cite
                    added.setdefault(s.sub.subscription_id, []).append(cite)
        out = []
        for s in subs:
            sid = s.sub.subscription_id
            if sid in added or sid in removed:
                out.append(
                    Notification(
                        subscription_id=sid,
                        tenant=change.tenant,
                        doc_id=change.doc_id,
                        op=change.op,
                        version=change.version,
                        matched=sorted(added.get(sid, []), key=lambda c: -c.score),
                        removed=removed.get(sid, []),
                    )
                )
        return out

    # -- Kafka -----------------------------------------------------------------------------
    def _open(self) -> None:
        s = self.settings
        self._subs = Tail(s, s.subscriptions_topic, start="beginning",
                          client_id="headwater-standing-subs")  # fmt: skip
        self.loop = BatchLoop(
            s, [s.changes_topic], group=s.standing_group, client_id="headwater-standing",
            decode=decode_change, write=self._write, on_error=skip, producer=self._producer,
            max_records=200, max_wait_ms=100,
        )  # fmt: skip

    def catch_up(self, timeout_s: float = 15.0) -> None:
        """Apply every subscription registered (or cancelled) so far."""
        for record in self._subs.read_to_end(timeout_s):
            self._apply_subscription(record.key, record.value)

    def _apply_subscription(self, key: bytes | None, value: bytes | None) -> None:
        current: dict[str, Subscription] = {k: v.sub for k, v in self.standing.items()}
        apply_subscription_record(current, key, value)
        for sid in set(self.standing) - set(current):
            self.remove(sid)
            log.info("standing query %s cancelled", sid)
        for sid, sub in current.items():
            if sid not in self.standing or self.standing[sid].sub != sub:
                try:
                    self.add(sub)
                except Exception as exc:  # Milvus down: match from now on, without the seed
                    log.warning("could not seed standing query %s: %s", sid, exc)
                    self.add(sub, seed=False)

    def run_once(self, timeout_ms: int = 500) -> int:
        """Handle one batch of change events; returns how many were handled."""
        if self.loop is None:
            self._open()
        assert self.loop is not None
        n = self.loop.run_once()
        self.handled += n
        if not self.ready.is_set() and self.loop.member.assignment():
            self.catch_up()
            self.ready.set()
        return n

    def _write(self, items: list[tuple[ConsumerRecord, ChangeEvent]], out: Outbox) -> list:
        # A subscription registered before a document was published is known by its change.
        self.catch_up()
        # Matched sets change as the batch is matched; a batch that fails is matched again
        # from the same sets, or removals in it would go unnoticed on the retry.
        before = {sid: dict(s.matched) for sid, s in self.standing.items()}
        try:
            for record, change in items:
                for note in self.match(change):
                    out.send(self.settings.notifications_topic, note.to_bytes(),
                             key=note.subscription_id.encode(), origin=record)  # fmt: skip
                    self.notified += 1
                    NOTIFIED.inc()
        except BaseException:
            for sid, matched in before.items():
                if sid in self.standing:
                    self.standing[sid].matched = matched
            raise
        return []

    def run(self, stop: threading.Event) -> None:
        """Match until `stop` is set; every batch is notified before it is committed."""
        log.info("standing-query matcher on %s as %s", self.settings.changes_topic,
                 self.settings.standing_group)  # fmt: skip
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            self.close()

    def close(self) -> None:
        if self._subs is not None:
            self._subs.close()
        if self.loop is not None:
            self.loop.close()
        self.loop = None


def decode_change(record: ConsumerRecord) -> ChangeEvent:
    """A change event whose chunk ids are safe to look up (EventError otherwise)."""
    try:
        change = ChangeEvent.model_validate_json(record.value or b"")
    except ValidationError as exc:
        raise EventError(f"not a change event: {exc.errors()[0]['msg']}") from exc
    for chunk_id in (*change.added_chunk_ids, *change.removed_chunk_ids):
        if not safe_id(chunk_id):
            raise EventError(f"unsafe chunk id {chunk_id[:80]!r}")
    return change
