"""The micro-batch loop: poll → decode → write → settle what was produced → commit.

Used by the indexer and the standing-query matcher. A batch is bounded by count and time.
Each record is decoded alone (a failure goes to the error policy, the rest of the batch goes
on); the batch is written as a whole by the sink, which reports per-record failures and sends
derived records through the batch's outbox. Offsets are committed only after the write, the
error policy's dead letters and every produced record were acknowledged. A transient failure
(Milvus or Kafka away) pauses the partitions and retries the step that failed, with backoff,
without re-running the steps that succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from prometheus_client import Counter

from headwater.errors import Cancelled, ProduceFailed
from headwater.runtime import clients
from headwater.runtime.deadletter import OnError
from headwater.runtime.member import GroupMember
from headwater.runtime.outbox import Outbox
from headwater.runtime.retry import DEFAULT_BACKOFF, Backoff, one_line, retrying
from headwater.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

RETRIES = Counter("headwater_retries_total", "Batch steps retried after a transient failure",
                  ["group", "step"])  # fmt: skip

Decode = Callable[[ConsumerRecord], T]
# Writes one batch; returns the records that failed on their own, with why.
Failures = Iterable[tuple[ConsumerRecord, Exception]]
Write = Callable[[list[tuple[ConsumerRecord, T]], Outbox], Failures]


@dataclass
class Batch(Generic[T]):
    records: list[ConsumerRecord]
    items: list[tuple[ConsumerRecord, T]]
    out: Outbox
    written: bool = False


class BatchLoop(Generic[T]):
    """A consumer-group member writing micro-batches; `run(stop)` in a thread of its own."""

    def __init__(
        self,
        settings: Settings,
        topics: Iterable[str],
        *,
        group: str,
        client_id: str,
        decode: Decode[T],
        write: Write[T],
        on_error: OnError,
        producer: KafkaProducer | None = None,
        max_records: int = 500,
        backlog_records: int | None = None,
        max_wait_ms: int = 100,
        backoff: Backoff = DEFAULT_BACKOFF,
        on_committed: Callable[[Batch[T]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.decode, self.write, self.on_error = decode, write, on_error
        self.max_records, self.max_wait_ms = max_records, max_wait_ms
        # While the group lags a batch may grow to this: the records are already waiting, and
        # a sink that coalesces (the indexer: newest version per document) does less per record.
        self.backlog_records = max(max_records, backlog_records or max_records)
        self.cap = max_records  # this batch's bound: max_records, or more while lagging
        self.backoff = backoff
        self.on_committed = on_committed
        self._owns_producer = producer is None
        self.producer = producer or clients.producer(
            settings, idempotent=False, client_id=client_id
        )
        self._lock = threading.Lock()
        self._batch: Batch[T] | None = None
        self.member = GroupMember(
            settings, topics, group=group, client_id=client_id, max_poll_records=max_records,
            on_revoked=self._drop_revoked,
        )  # fmt: skip

    @property
    def in_hand(self) -> int:
        """Records polled and not committed yet."""
        batch = self._batch
        return 0 if batch is None else len(batch.records)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Handle batches until `stop` is set; the batch in hand is finished first if it can be."""
        try:
            while not stop.is_set():
                self.run_once(stop)
        except Cancelled:
            pass  # stopped while a step waited to retry: the batch is redelivered
        finally:
            self.close()

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Fill one batch (bounded by count and time) and handle it; returns its size."""
        stop = stop or threading.Event()
        if self._batch is None:
            self._batch = self._fill(stop)
        batch = self._batch
        if not batch.records:
            self._batch = None
            return 0
        self._step(batch, "write", stop, lambda: self._write(batch))
        self._step(batch, "produce", stop, lambda: self._settle(batch))
        offsets = _next_offsets(batch.records)
        self._step(batch, "commit", stop, lambda: self.member.commit(offsets))
        self._batch = None
        self.cap = self._next_cap(len(batch.records))
        if self.on_committed is not None:
            self.on_committed(batch)
        return len(batch.records)

    def _next_cap(self, taken: int) -> int:
        """The next batch's bound: what is waiting, between the two limits.

        The consumer learns a partition's end only when it fetches from it, so a full batch
        counts as a lag too: there was more than it could take.
        """
        if self.backlog_records == self.max_records:
            return self.max_records
        waiting = sum(self.member.lag().values())  # as last fetched: no broker round trip
        if taken >= self.cap:
            waiting = max(waiting, self.backlog_records)
        return min(self.backlog_records, max(self.max_records, waiting))

    def _fill(self, stop: threading.Event) -> Batch[T]:
        out = Outbox(self.producer)
        batch: Batch[T] = Batch([], [], out)
        self._batch = batch  # in hand from now on: a rebalance while filling drops from it
        deadline = time.monotonic() + self.max_wait_ms / 1000
        cap = self.cap
        grown = cap > self.max_records
        while len(batch.records) < cap and not stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            # A grown batch keeps taking what is waiting after the deadline, until a poll comes
            # back empty: records on partitions not fetched yet need a fetch's wait to arrive.
            wait_ms = max(0, left_ms) if left_ms > 0 or not grown else max(self.max_wait_ms, 20)
            try:
                records = self.member.poll(wait_ms, cap - len(batch.records))
            except KafkaError as exc:
                # kafka-python raises out of poll when the group coordinator's broker dies
                # (ECONNREFUSED finding it again); the next poll rejoins through another one.
                log.warning("%s: poll failed: %s", self.member.group, one_line(exc))
                stop.wait(1.0)
                break
            with self._lock:
                for record in records:
                    batch.records.append(record)
                    try:
                        batch.items.append((record, self.decode(record)))
                    except Exception as exc:
                        self.on_error(exc, record, out)
            if time.monotonic() >= deadline and (not grown or not records):
                break
        return batch

    def _write(self, batch: Batch[T]) -> None:
        if batch.written:
            return
        with self._lock:
            items = list(batch.items)
        for record, exc in self.write(items, batch.out) or ():
            self.on_error(exc, record, batch.out)
        batch.written = True

    def _settle(self, batch: Batch[T]) -> None:
        for origin, refusal in batch.out.settle():
            if origin is None:
                raise ProduceFailed(f"a record was refused: {one_line(refusal)}")
            self.on_error(ProduceFailed(f"a record produced for it was refused: "
                                        f"{one_line(refusal)}"), origin, batch.out)  # fmt: skip
        if batch.out.pending:  # dead letters of the refusals above
            self._settle(batch)

    def _step(self, batch: Batch[T], name: str, stop: threading.Event, call: Callable) -> None:
        def paused_retry(exc: BaseException, delay: float) -> None:
            RETRIES.labels(self.member.group, name).inc()
            self.member.pause()
            try:
                self.member.poll(0)  # stays in the group while it waits; may rebalance
            except KafkaError as err:
                log.warning("%s: poll failed while waiting: %s", self.member.group, one_line(err))

        try:
            retrying(call, stop=stop, what=f"{self.member.group} {name}", backoff=self.backoff,
                     on_retry=paused_retry)  # fmt: skip
        finally:
            self.member.resume()

    # -- rebalance -----------------------------------------------------------------------------
    def _drop_revoked(self, revoked: set[TopicPartition]) -> None:
        """Forget the batch's records of lost partitions; their new owner handles them again."""
        with self._lock:
            batch = self._batch
            if batch is None:
                return
            keep = [r for r in batch.records if TopicPartition(r.topic, r.partition) not in revoked]
            if len(keep) != len(batch.records):
                log.info("%s: %d uncommitted records go back to the group", self.member.group,
                         len(batch.records) - len(keep))  # fmt: skip
            batch.records = keep
            batch.items = [(r, i) for r, i in batch.items
                           if TopicPartition(r.topic, r.partition) not in revoked]  # fmt: skip

    def close(self) -> None:
        self.member.close()
        if self._owns_producer:
            self.producer.close(timeout=10)


def _next_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets
