"""The indexer: a consumer-group member that turns document events into index writes.

Loop: poll a micro-batch (bounded by count and time) -> parse (bad events to the DLQ) -> apply to
Milvus -> publish change events -> commit offsets. Offsets are committed only after the batch's
writes succeeded, and writes are idempotent, so at-least-once delivery gives exactly-once index
state. If Milvus is unavailable the partitions are paused and the batch retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from headwater.settings import Settings
from headwater.topics import await_topic, poll
from headwater.topics import consumer as make_consumer
from headwater.topics import producer as make_producer
from index.embedder import Embedder, load_embedder
from index.store import ChunkStore, StoreError
from index.writer import Applied, IndexWriter, check_event
from producers.events import DocumentEvent, EventError, Limits, parse_document

from .deadletter import DeadLetters

log = logging.getLogger(__name__)

CONSUMED = Counter("headwater_events_consumed_total", "Document events consumed")
BATCH_SECONDS = Histogram("headwater_batch_seconds", "Time to apply one indexer batch")
FRESHNESS = Histogram(
    "headwater_freshness_lag_seconds",
    "Publish (Kafka record timestamp) to indexed",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
LAG = Gauge("headwater_consumer_lag", "Events not yet indexed", ["partition"])
STORE_RETRIES = Counter("headwater_store_retries_total", "Batches retried because Milvus failed")
MAX_BACKOFF_S = 5.0


@dataclass
class IndexerStats:
    """Per-instance counts (the prometheus counters are process-wide)."""

    consumed: int = 0
    batches: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    stale: int = 0
    dead_lettered: int = 0
    store_retries: int = 0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.indexer.drop_revoked(revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.indexer.restore_dropped(assigned)
        log.info("indexer assigned %s", sorted(tp.partition for tp in assigned))


class Indexer:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder | None = None,
        store: ChunkStore | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder or load_embedder(settings)
        self.store = store or ChunkStore(settings, self.embedder.model_id, self.embedder.dim)
        self.writer = IndexWriter(settings, self.embedder, self.store)
        self.limits = Limits.from_settings(settings)
        self.stats = IndexerStats()
        self.producer = make_producer(settings, client_id="headwater-indexer")
        self.dead = DeadLetters(settings, self.producer)
        self.consumer = make_consumer(
            settings,
            group_id=settings.indexer_group,
            client_id="headwater-indexer",
            max_poll_records=settings.batch_max_events,
        )
        await_topic(self.consumer, settings.documents_topic)
        self.consumer.subscribe([settings.documents_topic], listener=_Rebalance(self))
        # Polled but not yet committed: every record, and the valid events among them (bad
        # ones were dead-lettered on intake, so a retried batch never dead-letters twice).
        self._pending: list[ConsumerRecord] = []
        self._events: list[tuple[DocumentEvent, ConsumerRecord]] = []
        # First offsets of records dropped at a revoke, per partition (see restore_dropped).
        self._redo: dict[TopicPartition, int] = {}
        self._alias_pointed = False

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Index until `stop` is set; the last batch is finished and committed before returning."""
        log.info("indexer consuming %s as %s", self.settings.documents_topic,
                 self.settings.indexer_group)  # fmt: skip
        try:
            while not stop.is_set():
                try:
                    self.run_once(stop)
                except KafkaError as exc:
                    # The broker is unreachable (dead letters, change events, commit): nothing
                    # of the batch was committed, so take it again once Kafka answers.
                    log.warning("Kafka unavailable, retrying the uncommitted batch: %s", exc)
                    self._rewind()
                    stop.wait(1.0)
        finally:
            self.close()

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Poll one micro-batch and apply it; returns the number of events handled."""
        deadline = time.monotonic() + self.settings.batch_max_ms / 1000
        while len(self._pending) < self.settings.batch_max_events:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            room = self.settings.batch_max_events - len(self._pending)
            polled = poll(self.consumer, timeout_ms=wait_ms or 0, max_records=room)
            batch = [r for records in polled.values() for r in records]
            self._pending += batch  # all of it first: a failing intake rewinds every record
            self._intake(batch)
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
            if not polled and not self._pending:
                deadline = time.monotonic() + self.settings.batch_max_ms / 1000
                if stop is None:
                    break
        return self._flush_with_retry(stop)

    def _flush_with_retry(self, stop: threading.Event | None) -> int:
        backoff = 0.2
        while True:
            try:
                return self.flush()
            except StoreError as exc:
                self.stats.store_retries += 1
                STORE_RETRIES.inc()
                log.warning("Milvus write failed, retrying in %.1fs: %s", backoff, exc)
                assigned = self.consumer.assignment()
                self.consumer.pause(*assigned)
                try:
                    if stop is not None and stop.wait(backoff):
                        return 0
                    if stop is None:
                        time.sleep(backoff)
                    poll(self.consumer, timeout_ms=0)  # stay in the group; may rebalance
                finally:
                    self.consumer.resume(*self.consumer.paused())
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    def _intake(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            try:
                event = parse_document(record.value, self.limits)
                check_event(event, record.key, self.settings)
            except EventError as exc:
                self.dead.send(record, str(exc), "parse")
                self.stats.dead_lettered += 1
                continue
            self._events.append((event, record))

    def flush(self) -> int:
        """Apply the pending records and commit them; StoreError leaves them pending."""
        records = self._pending
        if not records:
            return 0
        t0 = time.monotonic()
        events = [e for e, _ in self._events]
        origin = {id(e): r for e, r in self._events}
        applied: Applied = self.writer.apply(events)  # StoreError propagates: nothing committed
        for event, reason in applied.failed:
            self.dead.send(origin[id(event)], reason, "embed")
            self.stats.dead_lettered += 1
        for change in applied.changes:
            self.producer.send(
                self.settings.changes_topic, key=change.tenant.encode() + b"/" +
                change.doc_id.encode(), value=change.to_bytes(),
            )  # fmt: skip
        self.dead.flush()
        self.producer.flush(timeout=60)
        self._commit(records)
        self._pending, self._events = [], []
        now_ms = time.time() * 1000
        for record in records:
            FRESHNESS.observe(max(0.0, (now_ms - record.timestamp) / 1000))
        s = self.stats
        s.consumed += len(records)
        s.batches += 1
        s.embedded += applied.embedded
        s.reused += applied.reused
        s.removed += applied.removed
        s.stale += applied.stale
        CONSUMED.inc(len(records))
        BATCH_SECONDS.observe(time.monotonic() - t0)
        self._update_lag()
        self._point_alias_when_caught_up()
        return len(records)

    def _point_alias_when_caught_up(self) -> None:
        # A new embedding model fills a new collection; readers of the model-independent alias
        # switch to it only once it holds everything the topic held when we started.
        if self._alias_pointed or not self.consumer.assignment():
            return
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None or self.consumer.position(tp) < high:
                return
        self.store.point_alias()
        self._alias_pointed = True
        log.info("caught up: alias %s -> %s", self.store.alias, self.store.chunks)

    def _commit(self, records: list[ConsumerRecord]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in offsets or offsets[tp].offset <= r.offset:
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # We lost the partitions mid-batch; the new owner re-applies (idempotently).
            log.warning("commit failed after rebalance, events will be redelivered: %s", exc)

    def _rewind(self) -> None:
        """Drop the uncommitted batch and seek back to its first offsets, to poll it again."""
        assigned = self.consumer.assignment()
        for tp, offset in _first_offsets(self._pending).items():
            if tp in assigned:  # a revoked partition restarts from its committed offset anyway
                self.consumer.seek(tp, offset)
        self._pending, self._events = [], []

    def drop_revoked(self, revoked: set[TopicPartition]) -> None:
        """Forget uncommitted records of partitions we lost; their new owner re-applies them.

        kafka-python 3 runs rebalance listeners on its IO thread, where a blocking commit is
        refused, so the batch cannot be committed here. Nothing is lost: the records were not
        committed, and re-applying them is idempotent (equal versions are only re-cleaned).
        """
        gone = {(tp.topic, tp.partition) for tp in revoked}
        kept = [r for r in self._pending if (r.topic, r.partition) not in gone]
        if len(kept) != len(self._pending):
            log.info("rebalance: %d uncommitted events go back to the group",
                     len(self._pending) - len(kept))  # fmt: skip
        dropped = [r for r in self._pending if (r.topic, r.partition) in gone]
        for tp, offset in _first_offsets(dropped).items():
            self._redo[tp] = min(self._redo.get(tp, offset), offset)
        self._pending = kept
        self._events = [(e, r) for e, r in self._events if (r.topic, r.partition) not in gone]

    def restore_dropped(self, assigned: set[TopicPartition]) -> None:
        """Seek partitions we got back to the first record `drop_revoked` forgot.

        kafka-python keeps a retained partition's position across a rebalance, so without the
        seek those records would be skipped: never applied, and committed past by a later batch.
        """
        redo, self._redo = self._redo, {}
        for tp, offset in redo.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                LAG.labels(str(tp.partition)).set(max(0, high - self.consumer.position(tp)))

    def close(self) -> None:
        try:
            if self._pending:
                self.flush()  # once: uncommitted events are redelivered if this fails
        except (StoreError, KafkaError) as exc:
            log.warning("shutting down with an unflushed batch (will be redelivered): %s", exc)
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=10)


def _first_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first
