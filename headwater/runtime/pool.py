"""The concurrent loop: each record is handled on its own by a pool of worker threads.

Used by the query consumer, where one record (a query) takes seconds and records are
independent. A partition's offset is committed only past records whose handling finished and
whose produced records were all acknowledged; a record cancelled by shutdown is never
committed past, so the group's next owner handles it again. When every worker is busy the
member pauses its partitions (and keeps polling, so it stays in the group) instead of buffering.

With a `key` function (the query consumer's: the tenant), records are fair between keys: at
most `per_key` of one key are handled at once and the next ones wait in that key's lane, while
records of other keys go past them; a full lane refuses its next record (the error policy gets
`Busy`), so one key's flood can neither occupy every worker nor stop the partitions for others.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Literal, TypeVar

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from headwater.errors import Busy, Cancelled, ProduceFailed
from headwater.runtime import clients
from headwater.runtime.deadletter import OnError
from headwater.runtime.member import GroupMember
from headwater.runtime.outbox import Outbox
from headwater.runtime.retry import DEFAULT_BACKOFF, Backoff, one_line, retrying, transient
from headwater.settings import Settings

T = TypeVar("T")
W = TypeVar("W")
log = logging.getLogger(__name__)

POLL_MS = 200
GRACE_S = 5.0  # how long shutdown waits for records in hand before cancelling them
TOTAL_LANES = 8  # all lanes together hold at most this many lanes' backlog

Decode = Callable[[ConsumerRecord], T]
# Handles one record; `cancel` is set when the loop stops (a handler should give up promptly).
Handle = Callable[[T, ConsumerRecord, Outbox, threading.Event], None]
Key = Callable[[T], Hashable | None]  # the lane of a decoded record (None: no bound)


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
        key: Key[T] | None = None,
        per_key: int = 1,
        key_backlog: int = 0,
    ) -> None:
        self.decode, self.handle, self.on_error = decode, handle, on_error
        self.workers = workers
        self.key = key
        self.lanes: Lanes[tuple[ConsumerRecord, T]] = Lanes(per_key, key_backlog)
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
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
        self._pool = pool
        paused = False
        try:
            while not stop.is_set():
                # Records waiting in a lane are bounded by the lanes themselves: they do not
                # stop the fetching, or one key's flood would hold back every other key.
                room = 2 * self.workers - (self.offsets.in_flight - self.lanes.waiting)
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
                    self._admit(record)
                self._commit()
            self._stopping.set()
            pool.shutdown(wait=False)
            self._drain(GRACE_S)
        finally:
            self._stopping.set()
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._commit()
            self.member.close()
            if self._owns_producer:
                self.producer.close(timeout=10)

    def _admit(self, record: ConsumerRecord) -> None:
        """Decode a record and run it now, let it wait in its lane, or refuse it (lane full)."""
        try:
            item = self.decode(record)
        except Exception as exc:
            self._submit(self._fail, record, exc)
            return
        lane = None if self.key is None else self.key(item)
        verdict = self.lanes.admit(lane, (record, item))
        if verdict == "run":
            self._submit(self._work, record, item, lane)
        elif verdict == "refuse":
            busy = Busy(f"too many records of {lane} in hand; try again later")
            self._submit(self._fail, record, busy)

    def _submit(self, fn: Callable, *args: object) -> None:
        if self._stopping.is_set() or self._pool is None:
            return  # stopping: never finished, so never committed past; redelivered
        with contextlib.suppress(RuntimeError):  # shut down meanwhile: redelivered too
            self._pool.submit(fn, *args)

    def _drain(self, grace_s: float) -> None:
        deadline = threading.Event()
        timer = threading.Timer(grace_s, deadline.set)
        timer.start()
        try:
            while self.offsets.in_flight - self.lanes.waiting > 0 and not deadline.is_set():
                self._commit()
                deadline.wait(0.05)
        finally:
            timer.cancel()

    def _fail(self, record: ConsumerRecord, exc: Exception) -> None:
        """A record that is not handled (it does not decode, or its lane is full)."""
        self._finish(record, lambda out: self.on_error(exc, record, out))

    def _work(self, record: ConsumerRecord, item: T, lane: Hashable | None) -> None:
        tp = TopicPartition(record.topic, record.partition)
        try:
            self._finish(record, lambda out: retrying(
                lambda: self._handle(item, record, out), stop=self._cancel,
                what=f"{self.member.group} record {tp.partition}@{record.offset}",
                backoff=self.backoff))  # fmt: skip
        finally:
            if lane is not None:
                nxt = self.lanes.done(lane)
                if nxt is not None:
                    self._submit(self._work, *nxt, lane)

    def _finish(self, record: ConsumerRecord, step: Callable[[Outbox], object]) -> None:
        """Run `step` with the record's outbox, settle what it produced, report the record."""
        tp = TopicPartition(record.topic, record.partition)
        out = Outbox(self.producer)
        done = False
        try:
            step(out)
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


class Lanes(Generic[W]):
    """Per-key bounds on work in hand: at most `per_key` running and `backlog` waiting per key,
    and `backlog * TOTAL_LANES` waiting in all (pure logic; thread-safe)."""

    def __init__(self, per_key: int, backlog: int) -> None:
        self.per_key = max(1, per_key)
        self.backlog = max(0, backlog)
        self._running: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque[W]] = {}
        self._count = 0
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._count

    def admit(self, key: Hashable | None, work: W) -> Literal["run", "wait", "refuse"]:
        """Whether `work` of `key` runs now, waits for its key, or is refused."""
        if key is None:
            return "run"
        with self._lock:
            if self._running.get(key, 0) < self.per_key:
                self._running[key] = self._running.get(key, 0) + 1
                return "run"
            lane = self._waiting.setdefault(key, deque())
            if len(lane) >= self.backlog or self._count >= self.backlog * TOTAL_LANES:
                if not lane:
                    del self._waiting[key]
                return "refuse"
            lane.append(work)
            self._count += 1
            return "wait"

    def done(self, key: Hashable) -> W | None:
        """One work of `key` finished: the next waiting one, now counted as running."""
        with self._lock:
            lane = self._waiting.get(key)
            if lane:
                self._count -= 1
                work = lane.popleft()
                if not lane:
                    del self._waiting[key]
                return work
            left = self._running.get(key, 1) - 1
            if left:
                self._running[key] = left
            else:
                self._running.pop(key, None)
            return None


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
