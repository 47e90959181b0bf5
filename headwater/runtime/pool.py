"""The concurrent loop: each record is handled on its own by a pool of worker threads.

Used by the query consumer, where one record (a query) takes seconds and records are
independent. A partition's offset is committed only past records whose handling finished and
whose produced records were all acknowledged; a record cancelled by shutdown is never
committed past, so the group's next owner handles it again. When every worker is busy the
member pauses its partitions (and keeps polling, so it stays in the group) instead of buffering.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from headwater.errors import Cancelled, ProduceFailed
from headwater.runtime import clients
from headwater.runtime.deadletter import OnError
from headwater.runtime.member import GroupMember
from headwater.runtime.outbox import Outbox
from headwater.runtime.retry import DEFAULT_BACKOFF, Backoff, one_line, retrying, transient
from headwater.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

POLL_MS = 200
GRACE_S = 5.0  # how long shutdown waits for records in hand before cancelling them

Decode = Callable[[ConsumerRecord], T]
# Handles one record; `cancel` is set when the loop stops (a handler should give up promptly).
Handle = Callable[[T, ConsumerRecord, Outbox, threading.Event], None]


class PoolLoop(Generic[T]):
    """A consumer-group member handling records concurrently; `run(stop)` in its own thread."""

    def __init__(
        self,
        settings: Settings,
        topics: Iterable[str],
        *,
        group: str,
        client_id: str,
        decode: Decode[T],
        handle: Handle[T],
        on_error: OnError,
        workers: int,
        producer: KafkaProducer | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        on_assigned: Callable[[set[TopicPartition]], None] | None = None,
    ) -> None:
        self.decode, self.handle, self.on_error = decode, handle, on_error
        self.workers = workers
        self.backoff = backoff
        self._owns_producer = producer is None
        self.producer = producer or clients.producer(
            settings, idempotent=False, client_id=client_id
        )
        self.offsets = Offsets()
        self._finished: queue.SimpleQueue[tuple[TopicPartition, int, bool]] = queue.SimpleQueue()
        self._cancel = threading.Event()
        # Records being handled, across rebalances (Offsets forgets a revoked partition's).
        self._running: set[tuple[TopicPartition, int]] = set()
        self._lock = threading.Lock()
        self.member = GroupMember(
            settings, topics, group=group, client_id=client_id, max_poll_records=workers,
            on_revoked=self.offsets.forget, on_assigned=on_assigned,
        )  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        """Handle records until `stop` is set; then finish (or cancel) what is in hand."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"{self.member.group}-worker")
        paused = False
        try:
            while not stop.is_set():
                room = 2 * self.workers - self.offsets.in_flight
                if room > 0 and paused:
                    self.member.resume()
                    paused = False
                elif room <= 0 and not paused:
                    self.member.pause()  # every worker busy: stop fetching, keep the membership
                    paused = True
                try:
                    records = self.member.poll(POLL_MS if room > 0 else 20, max(room, 1))
                except Exception as exc:  # the broker is away: keep trying, never die
                    log.warning("%s: poll failed: %s", self.member.group, one_line(exc))
                    stop.wait(1.0)
                    continue
                for record in records:
                    tp = TopicPartition(record.topic, record.partition)
                    self.offsets.start(tp, record.offset)
                    with self._lock:
                        if (tp, record.offset) in self._running:
                            continue  # polled again after a rebalance gave it back: in hand
                        self._running.add((tp, record.offset))
                    pool.submit(self._work, record, stop)
                self._commit()
            pool.shutdown(wait=False)
            self._drain(GRACE_S)
        finally:
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._commit()
            self.member.close()
            if self._owns_producer:
                self.producer.close(timeout=10)

    def _drain(self, grace_s: float) -> None:
        deadline = threading.Event()
        timer = threading.Timer(grace_s, deadline.set)
        timer.start()
        try:
            while self.offsets.in_flight and not deadline.is_set():
                self._commit()
                deadline.wait(0.05)
        finally:
            timer.cancel()

    def _work(self, record: ConsumerRecord, stop: threading.Event) -> None:
        tp = TopicPartition(record.topic, record.partition)
        out = Outbox(self.producer)
        done = False
        try:
            try:
                item = self.decode(record)
            except Exception as exc:
                self.on_error(exc, record, out)
            else:
                retrying(lambda: self._handle(item, record, out), stop=self._cancel,
                         what=f"{self.member.group} record {tp.partition}@{record.offset}",
                         backoff=self.backoff)  # fmt: skip
            retrying(lambda: self._settle(record, out), stop=self._cancel,
                     what=f"{self.member.group} produce", backoff=self.backoff)  # fmt: skip
            done = True
        except Cancelled:
            log.info("%s: %s@%d cancelled by shutdown; redelivered", self.member.group, tp,
                     record.offset)  # fmt: skip
        except Exception:  # a bug in a handler: never commit past its record
            log.exception("%s: handling %s@%d failed", self.member.group, tp, record.offset)
        finally:
            with self._lock:
                self._running.discard((tp, record.offset))
            self._finished.put((tp, record.offset, done))

    def _handle(self, item: T, record: ConsumerRecord, out: Outbox) -> None:
        try:
            self.handle(item, record, out, self._cancel)
        except Cancelled:
            raise
        except Exception as exc:
            if transient(exc):
                raise
            self.on_error(exc, record, out)

    def _settle(self, record: ConsumerRecord, out: Outbox) -> None:
        for _, refusal in out.settle():
            self.on_error(ProduceFailed(f"a record produced for it was refused: "
                                        f"{one_line(refusal)}"), record, out)  # fmt: skip
        if out.pending:
            self._settle(record, out)

    def _commit(self) -> None:
        changed = False
        while True:
            try:
                tp, offset, done = self._finished.get_nowait()
            except queue.Empty:
                break
            self.offsets.finish(tp, offset, done)
            changed = True
        commit = self.offsets.committable() if changed else {}
        if not commit:
            return
        try:
            if self.member.commit(commit):
                self.offsets.committed(commit)
        except Exception as exc:  # broker away: the same offsets are committed next time
            log.warning("%s: commit failed: %s", self.member.group, one_line(exc))


class Offsets:
    """Per partition: records in hand, and the offset below which all are handled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[TopicPartition, set[int]] = {}
        self._high: dict[TopicPartition, int] = {}  # next offset after the highest finished
        self._done: dict[TopicPartition, int] = {}  # last committed
        self._lost: dict[TopicPartition, int] = {}  # lowest unhandled: never commit past it

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._open.values())

    def start(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            self._open.setdefault(tp, set()).add(offset)

    def finish(self, tp: TopicPartition, offset: int, handled: bool = True) -> None:
        with self._lock:
            if offset not in self._open.get(tp, ()):
                return  # the partition was revoked meanwhile
            self._open[tp].discard(offset)
            self._high[tp] = max(self._high.get(tp, 0), offset + 1)
            if not handled:
                self._lost[tp] = min(offset, self._lost.get(tp, offset))

    def committable(self) -> dict[TopicPartition, int]:
        with self._lock:
            out = {}
            for tp, high in self._high.items():
                still = self._open.get(tp)
                upto = min(still) if still else high
                upto = min(upto, self._lost.get(tp, upto))
                if upto > self._done.get(tp, -1):
                    out[tp] = upto
            return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            self._done.update(offsets)

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Drop the state of lost partitions (their records are handled by the new owner)."""
        with self._lock:
            for tp in revoked:
                for table in (self._open, self._high, self._done, self._lost):
                    table.pop(tp, None)
