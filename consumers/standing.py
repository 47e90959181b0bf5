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
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter
from pydantic import ValidationError

from headwater.settings import Settings
from headwater.topics import await_topic, poll
from headwater.topics import consumer as make_consumer
from headwater.topics import producer as make_producer
from index.embedder import Embedder
from index.store import ChunkStore
from producers.events import ChangeEvent, Citation
from producers.queries import Notification, Subscription, apply_subscription_record

log = logging.getLogger(__name__)

NOTIFIED = Counter("headwater_notifications_total", "Standing-query notifications published")
CHANGES = Counter("headwater_changes_matched_total", "Change events checked by the matcher")
SEED_LIMIT = 1000  # chunks already indexed that a new subscription starts out matching, at most


@dataclass
class _Standing:
    sub: Subscription
    vector: np.ndarray
    matched: dict[str, Citation] = field(default_factory=dict)  # chunk_id -> its citation


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
        self._producer = producer
        self._owns_producer = producer is None
        self._changes: Any = None
        self._subs: Any = None
        self._sub_tps: list[TopicPartition] = []
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

    def _seed(self, standing: _Standing) -> dict[str, Citation]:
        sub = standing.sub
        # An empty text makes the store search dense-only, so scores are cosine similarities.
        raw = self.store.search(standing.vector, "", tenant=sub.tenant, limit=SEED_LIMIT)
        raw = [h for h in raw if h.score >= sub.threshold]
        states = self.store.doc_states({h.doc_key for h in raw})
        matched = {}
        for h in raw:
            state = states.get(h.doc_key)
            if state is None or state.deleted or h.chunk_id not in state.chunk_ids:
                continue
            matched[h.chunk_id] = Citation(
                doc_id=h.doc_id,
                version=state.version,
                chunk_id=h.chunk_id,
                score=h.score,
                text=h.text,
                section=h.section,
            )
        return matched

    def match(self, change: ChangeEvent) -> list[Notification]:
        """The notifications one applied document change causes (and the new matched sets)."""
        CHANGES.inc()
        subs = [s for s in self.standing.values() if s.sub.tenant == change.tenant]
        if not subs:
            return []
        removed: dict[str, list[Citation]] = {}
        for s in subs:
            gone = [s.matched.pop(c) for c in change.removed_chunk_ids if c in s.matched]
            if gone:
                removed[s.sub.subscription_id] = gone
        added: dict[str, list[Citation]] = {}
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
                    cite = Citation(
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
        self._producer = self._producer or make_producer(s, client_id="headwater-standing")
        self._subs = make_consumer(s, group_id=None, client_id="headwater-standing-subs")
        parts = self._subs.partitions_for_topic(s.subscriptions_topic) or {0}
        self._sub_tps = [TopicPartition(s.subscriptions_topic, p) for p in sorted(parts)]
        self._subs.assign(self._sub_tps)
        self._subs.seek_to_beginning(*self._sub_tps)
        self._changes = make_consumer(
            s,
            s.changes_topic,
            group_id=s.standing_group,
            client_id="headwater-standing",
            max_poll_records=200,
        )
        await_topic(self._changes, s.changes_topic)

    def catch_up(self, timeout_s: float = 15.0) -> None:
        """Apply every subscription registered (or cancelled) so far."""
        end = self._subs.end_offsets(self._sub_tps)
        deadline = time.monotonic() + timeout_s
        while any(self._subs.position(tp) < end[tp] for tp in self._sub_tps):
            if time.monotonic() > deadline:
                log.warning("subscriptions topic not read to its end within %.0f s", timeout_s)
                return
            for records in self._subs.poll(timeout_ms=200).values():
                for record in records:
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
        """Handle one poll of change events; returns how many were handled."""
        if self._changes is None:
            self._open()
        polled = poll(self._changes, timeout_ms=timeout_ms)
        if self._changes.assignment():
            if not self.ready.is_set():
                self.catch_up()
            self.ready.set()
        if not polled:
            return 0
        self.catch_up()
        # Matched sets change as the batch is matched; a batch that fails is matched again
        # from the same sets, or removals in it would go unnoticed on the retry.
        before = {sid: dict(s.matched) for sid, s in self.standing.items()}
        try:
            n, offsets = self._match_batch(polled)
            self._producer.flush(timeout=60)
        except BaseException:
            for sid, matched in before.items():
                if sid in self.standing:
                    self.standing[sid].matched = matched
            raise
        self.handled += n
        try:
            self._changes.commit(offsets)
        except KafkaError as exc:
            log.warning("change offsets not committed (%s); they will be redelivered", exc)
        return n

    def _match_batch(self, polled: dict[TopicPartition, list[Any]]) -> tuple[int, dict]:
        n = 0
        offsets = {}
        for tp, records in polled.items():
            for record in records:
                n += 1
                offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
                try:
                    change = ChangeEvent.model_validate_json(record.value or b"")
                except ValidationError as exc:
                    log.warning(
                        "skipping a malformed change event at %s@%d: %s",
                        tp,
                        record.offset,
                        exc.errors()[0]["msg"],
                    )
                    continue
                for note in self.match(change):
                    self._producer.send(
                        self.settings.notifications_topic,
                        key=note.subscription_id.encode(),
                        value=note.to_bytes(),
                    )
                    self.notified += 1
                    NOTIFIED.inc()
        return n, offsets

    def run(self, stop: threading.Event) -> None:
        """Match until `stop` is set; every handled batch is notified before it is committed."""
        log.info(
            "standing-query matcher on %s as %s",
            self.settings.changes_topic,
            self.settings.standing_group,
        )
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                    backoff = 0.5
                except Exception as exc:  # Milvus or broker trouble: retry the batch later
                    log.warning("matcher batch failed, retrying in %.1f s: %s", backoff, exc)
                    self._rewind()
                    stop.wait(backoff)
                    backoff = min(5.0, backoff * 2)
        finally:
            self.close()

    def _rewind(self) -> None:
        """Go back to the last committed offsets so a failed batch is matched again."""
        if self._changes is None:
            return
        for tp in self._changes.assignment():
            committed = self._changes.committed(tp)
            if committed is not None:
                self._changes.seek(tp, committed)
            else:
                self._changes.seek_to_beginning(tp)

    def close(self) -> None:
        for c in (self._changes, self._subs):
            if c is not None:
                c.close(autocommit=False)
        self._changes = self._subs = None
        if self._owns_producer and self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
