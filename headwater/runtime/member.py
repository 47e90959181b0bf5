"""One member of a consumer group: its subscription, polls, commits and rebalance bookkeeping.

Both loop shapes (`BatchLoop`, `PoolLoop`) stand on this. It remembers, per partition, the
lowest offset handed out and not yet committed. kafka-python 3 runs rebalance listeners on its
IO thread, where a blocking commit is refused, so uncommitted work of a revoked partition cannot
be committed there; instead the loop drops it (its new owner re-handles it: handlers are
idempotent) and, should the partition come back to this member, `on_assigned` seeks back to that
offset: kafka-python keeps a retained partition's position across a rebalance, so without the
seek those records would be skipped and committed past.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import MemberState, OffsetAndMetadata

from headwater.runtime import clients
from headwater.settings import Settings

log = logging.getLogger(__name__)

Partitions = Callable[[set[TopicPartition]], None]
_REBALANCED = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)
# A member whose loop has not polled for this long is not doing its work (readiness).
STALL_S = 60.0
_MEMBERS: weakref.WeakSet[GroupMember] = weakref.WeakSet()


def members() -> list[GroupMember]:
    """This process's open group members (probes and metrics read them)."""
    return [m for m in list(_MEMBERS) if not m.closed]


class GroupMember(ConsumerRebalanceListener):
    """A subscribed KafkaConsumer with offset bookkeeping; `poll` and `commit` from one thread."""

    def __init__(
        self,
        settings: Settings,
        topics: Iterable[str],
        *,
        group: str,
        client_id: str,
        max_poll_records: int,
        on_revoked: Partitions | None = None,
        on_assigned: Partitions | None = None,
    ) -> None:
        self.topics = list(topics)
        self.group = group
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._lock = threading.Lock()
        self._uncommitted: dict[TopicPartition, int] = {}  # lowest offset handed out, uncommitted
        # (offset, record timestamp ms) of every record handed out and not committed, in order.
        self._in_hand: dict[TopicPartition, deque[tuple[int, int]]] = {}
        self._redo: dict[TopicPartition, int] = {}
        self.last_poll = time.monotonic()
        self.closed = False
        self.consumer = clients.consumer(
            settings, group_id=group, client_id=client_id, max_poll_records=max_poll_records
        )
        for topic in self.topics:
            clients.await_topic(self.consumer, topic)
        self.consumer.subscribe(self.topics, listener=self)
        _MEMBERS.add(self)

    # -- polling and committing ----------------------------------------------------------------
    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[ConsumerRecord]:
        """Records in partition order (each partition's in offset order), maybe none."""
        polled = clients.poll(self.consumer, timeout_ms=timeout_ms, max_records=max_records)
        self.last_poll = time.monotonic()
        records = [r for batch in polled.values() for r in batch]
        with self._lock:
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                self._uncommitted.setdefault(tp, r.offset)
                self._in_hand.setdefault(tp, deque()).append((r.offset, r.timestamp))
        return records

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit `{tp: next offset to read}`; False when partitions were lost meanwhile.

        Raises KafkaError when the broker is unreachable (the caller retries the commit).
        """
        with self._lock:
            owned = self.consumer.assignment()
            offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return True
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except _REBALANCED as exc:
            # A rebalance took (or is taking) the partitions: whoever owns them next reads from
            # the last commit, and if it is this member, `on_assigned` seeks back to it.
            log.warning("%s: commit refused after a rebalance (%s); redelivered", self.group, exc)
            return False
        with self._lock:
            for tp, offset in offsets.items():
                if tp in self._uncommitted and self.consumer.position(tp) <= offset:
                    del self._uncommitted[tp]
                elif tp in self._uncommitted:
                    self._uncommitted[tp] = max(self._uncommitted[tp], offset)
                held = self._in_hand.get(tp)
                while held and held[0][0] < offset:
                    held.popleft()
        return True

    def seek_back(self, offsets: dict[TopicPartition, int]) -> None:
        """Read these partitions again from these offsets (a batch given up, to be polled again)."""
        owned = self.consumer.assignment()
        for tp, offset in offsets.items():
            if tp in owned:
                self.consumer.seek(tp, offset)
                with self._lock:  # those records come again: they are in hand once more then
                    held = self._in_hand.get(tp)
                    while held and held[-1][0] >= offset:
                        held.pop()

    # -- flow control --------------------------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def pause(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self.consumer.pause(*(self.assignment() if partitions is None else partitions))

    def resume(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        paused = self.consumer.paused()
        tps = paused if partitions is None else [tp for tp in partitions if tp in paused]
        if tps:
            self.consumer.resume(*tps)

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the high-water mark on every assigned partition (as last fetched)."""
        out = {}
        for tp in self.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                try:
                    out[tp] = max(0, high - self.consumer.position(tp))
                except KafkaError:
                    continue
        return out

    # -- what probes and metrics read (any thread) ------------------------------------------------
    def oldest_in_hand_ms(self) -> int | None:
        """Timestamp (ms) of the oldest record handed out and not committed; None if none.

        Its age keeps rising while a batch is stuck, which a value set after each batch cannot.
        """
        with self._lock:
            firsts = [held[0][1] for held in self._in_hand.values() if held]
        return min(firsts, default=None)

    def membership(self) -> tuple[bool, str]:
        """(ready, why): the member owns partitions or waits for an assignment, and polls.

        Not ready when its loop stopped polling (stuck, or dead) or the member is closed.
        """
        if self.closed:
            return False, "closed"
        idle = time.monotonic() - self.last_poll
        if idle > STALL_S:
            return False, f"has not polled for {idle:.0f} s"
        owned = len(self.consumer.assignment())
        if owned:
            return True, f"owns {owned} partitions"
        state = getattr(getattr(self.consumer, "_coordinator", None), "state", None)
        joining = "joining" if state != MemberState.STABLE else "in the group"
        return True, f"waiting for an assignment ({joining})"

    def close(self) -> None:
        self.closed = True
        _MEMBERS.discard(self)
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:
            log.warning("%s: closing the consumer: %s", self.group, exc)

    # -- rebalance listener (kafka-python's IO thread) ------------------------------------------
    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        with self._lock:
            for tp in revoked:
                self._in_hand.pop(tp, None)
                if tp in self._uncommitted:
                    offset = self._uncommitted.pop(tp)
                    self._redo[tp] = min(self._redo.get(tp, offset), offset)
        if self._on_revoked is not None:
            self._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        with self._lock:
            redo, self._redo = self._redo, {}
        for tp, offset in redo.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        log.info("%s assigned %s", self.group, sorted(f"{t.topic}:{t.partition}" for t in assigned))
        if self._on_assigned is not None:
            self._on_assigned(set(assigned))
