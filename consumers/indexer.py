"""The indexer: a consumer-group member that turns document events into index writes.

It runs on the runtime's `BatchLoop`: poll a micro-batch (bounded by count and time) → decode
each record (`Intake`: headwater's events, CloudEvents, null-value deletes, and Debezium change
events from `settings.debezium_topics`; a bad one is dead-lettered with its reason) → apply the
batch to Milvus (`IndexWriter`: embed new chunks, swap, clean up) → publish one change event
per applied document → commit. Offsets are committed only after the Milvus writes, the dead
letters and every change event were acknowledged, and writes are idempotent, so at-least-once
delivery gives exactly-once index state. If Milvus or Kafka is away the partitions are paused
and the failed step retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Histogram

from consumers.intake import Intake
from headwater.errors import NoChange, StoreError
from headwater.events import Logged
from headwater.runtime.batches import Batch, BatchLoop
from headwater.runtime.deadletter import DeadLetters, OnError, skip
from headwater.runtime.outbox import Outbox
from headwater.settings import Settings
from index.embedder import Embedder, load_embedder
from index.store import ChunkStore
from index.writer import IndexWriter

log = logging.getLogger(__name__)

CONSUMED = Counter("headwater_events_consumed_total", "Document events consumed")
BATCH_SECONDS = Histogram("headwater_batch_seconds", "Time to apply one indexer batch")
# Observed per committed batch; the live figures (freshness age, lag per partition) are computed
# at scrape time by headwater.runtime.lag.
INDEXED_AFTER = Histogram(
    "headwater_indexed_after_seconds",
    "Publish (Kafka record timestamp) to indexed and committed",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


@dataclass
class IndexerStats:
    """Per-instance counts (the prometheus counters are process-wide)."""

    consumed: int = 0
    batches: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    stale: int = 0
    coalesced: int = 0
    dead_lettered: int = 0
    store_retries: int = 0


class Indexer:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder | None = None,
        store: ChunkStore | None = None,
        *,
        on_error: OnError | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder or load_embedder(settings)
        self.store = store or ChunkStore(settings, self.embedder.model_id, self.embedder.dim)
        self.writer = IndexWriter(settings, self.embedder, self.store)
        self.stats = IndexerStats()
        dead_letters = on_error or DeadLetters(settings.dlq_topic)

        def counted(exc: Exception, record: ConsumerRecord, out: Outbox) -> None:
            if isinstance(exc, NoChange):
                skip(exc, record, out)  # nothing to apply, nothing wrong
                return
            self.stats.dead_lettered += 1
            dead_letters(exc, record, out)

        self.loop: BatchLoop[Logged] = BatchLoop(
            settings,
            [settings.documents_topic, *settings.debezium_topics],
            group=settings.indexer_group,
            client_id="headwater-indexer",
            decode=Intake(settings),
            write=self._write,
            on_error=counted,
            max_records=settings.batch_max_events,
            backlog_records=settings.batch_max_backlog_events,
            max_wait_ms=settings.batch_max_ms,
            on_committed=self._committed,
        )
        self._alias_pointed = False
        self._t0 = 0.0

    @property
    def consumer(self) -> KafkaConsumer:
        """The group member's KafkaConsumer (for tests and benchmarks)."""
        return self.loop.member.consumer

    @property
    def pending(self) -> int:
        """Records polled and not committed yet."""
        return self.loop.in_hand

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Index until `stop` is set; the last batch is finished and committed before returning."""
        topics = ", ".join([self.settings.documents_topic, *self.settings.debezium_topics])
        log.info("indexer consuming %s as %s", topics, self.settings.indexer_group)
        self.loop.run(stop)

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Poll one micro-batch and apply it; returns the number of records handled."""
        return self.loop.run_once(stop)

    def close(self) -> None:
        self.loop.close()

    # -- the sink ------------------------------------------------------------------------------
    def _write(
        self, items: list[tuple[ConsumerRecord, Logged]], out: Outbox
    ) -> list[tuple[ConsumerRecord, Exception]]:
        self._t0 = time.monotonic()
        origin = {id(logged): record for record, logged in items}
        try:
            applied = self.writer.apply([logged for _, logged in items])
        except StoreError:
            self.stats.store_retries += 1
            raise
        failed = [(origin[id(logged)], exc) for logged, exc in applied.failed]
        for logged, change in applied.changes:
            out.send(self.settings.changes_topic, change.to_bytes(), origin=origin[id(logged)],
                     key=change.tenant.encode() + b"/" + change.doc_id.encode())  # fmt: skip
        s = self.stats
        s.embedded += applied.embedded
        s.reused += applied.reused
        s.removed += applied.removed
        s.stale += applied.stale
        s.coalesced += applied.coalesced
        return failed

    def _committed(self, batch: Batch[Logged]) -> None:
        now_ms = time.time() * 1000
        for record in batch.records:
            INDEXED_AFTER.observe(max(0.0, (now_ms - record.timestamp) / 1000))
        self.stats.consumed += len(batch.records)
        self.stats.batches += 1
        CONSUMED.inc(len(batch.records))
        BATCH_SECONDS.observe(time.monotonic() - self._t0)
        self._point_alias_when_caught_up(self.loop.member.lag())

    def _point_alias_when_caught_up(self, lag: dict) -> None:
        # A new embedding model fills a new collection; readers of the model-independent alias
        # switch to it only once it holds everything the topic held when we started.
        if self._alias_pointed or not lag or any(lag.values()):
            return
        if len(lag) < len(self.loop.member.assignment()):
            return
        self.store.point_alias()
        self._alias_pointed = True
        log.info("caught up: alias %s -> %s", self.store.alias, self.store.chunks)
