"""How far the indexer got on the documents topic: applied offsets, lag, freshness tokens.

The indexer commits a partition's offset only after its Milvus write succeeded, so a committed
offset greater than a token's offset means that write is searchable. Everything here reads the
group's committed offsets through one admin client; nothing joins the group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from kafka import KafkaAdminClient, OffsetSpec, TopicPartition
from kafka.errors import KafkaError

from headwater.errors import TokenBeyondLog
from headwater.runtime import clients
from headwater.settings import Settings
from headwater.tokens import FreshnessToken

T = TypeVar("T")

POLL_INTERVAL_S = 0.05
# A fresh broker answers "coordinator not available" until __consumer_offsets exists.
RETRY_S = 5.0


class Progress:
    """The indexer group's position on the documents topic; holds one admin client (thread-safe)."""

    def __init__(self, settings: Settings, *, admin: KafkaAdminClient | None = None) -> None:
        self.settings = settings
        self.topic = settings.documents_topic
        self._admin = admin
        self._owns_admin = admin is None
        self._lock = threading.Lock()
        self._high: dict[int, int] = {}  # end offsets as last seen: they only grow
        self._high_at = float("-inf")  # time.monotonic() when they were read
        self._high_lock = threading.Lock()

    # -- offsets ------------------------------------------------------------------------------

    def applied_offsets(self, group: str | None = None) -> dict[int, int]:
        """`{partition: committed offset}` of `group` (the indexer's by default) on documents.

        Partitions the group never committed are absent. The committed offset is the next one
        the group will read, so every record below it has been applied.
        """
        return self._committed(group, RETRY_S)

    def end_offsets(self) -> dict[int, int]:
        """`{partition: offset the next record will get}` on the documents topic."""
        return self._offsets(OffsetSpec.LATEST)

    def consumer_lag(self, group: str | None = None) -> dict[int, int]:
        """`{partition: records not yet applied}` for every partition of the documents topic."""
        committed = self.applied_offsets(group)
        end = self.end_offsets()
        start = self._offsets(OffsetSpec.EARLIEST) if set(end) - set(committed) else {}
        return {p: max(0, e - committed.get(p, start.get(p, 0))) for p, e in end.items()}

    def caught_up(self, group: str | None = None) -> bool:
        """True when the group has applied everything written to the documents topic so far."""
        return not any(self.consumer_lag(group).values())

    # -- tokens -------------------------------------------------------------------------------

    def check_reachable(self, token: FreshnessToken | str) -> None:
        """TokenBeyondLog when `token` names a record the documents topic does not hold.

        A token comes from an acknowledged publish, whose record is below the high-water mark;
        one beyond it (a partition the topic lacks, an offset not written yet) could only be
        waited on in vain. The end offsets are cached and read again only for a token past them.
        """
        token = FreshnessToken.parse(token)
        if all(offset < self._high.get(p, -1) for p, offset in token.items()):
            return
        asked = time.monotonic()
        with self._high_lock:
            # One read at a time: a read that began after this call was made is as good as its
            # own (40 hopeless tokens at once cost one round trip, not 40 in a row).
            if self._high_at < asked:
                try:
                    self._high = self.end_offsets()
                except KafkaError:
                    return  # cannot tell now: the bounded wait decides
                self._high_at = time.monotonic()
        beyond = [f"{p}:{o}" for p, o in token.items() if o >= self._high.get(p, -1)]
        if beyond:
            ends = ",".join(f"{p}:{o}" for p, o in sorted(self._high.items()))
            raise TokenBeyondLog(
                f"freshness token {','.join(beyond)} is beyond the documents topic "
                f"(next offsets {ends}): it names no acknowledged write"
            )

    def is_applied(self, token: FreshnessToken | str, group: str | None = None) -> bool:
        return self._applied(FreshnessToken.parse(token), group, RETRY_S)

    def wait_for_token(
        self,
        token: FreshnessToken | str,
        timeout: float | None = None,
        group: str | None = None,
    ) -> bool:
        """Wait until every write in `token` is applied; False once `timeout` passes first.

        `timeout` defaults to `settings.freshness_wait_s`; 0 checks once. A token beyond the
        topic's end raises TokenBeyondLog at once instead of waiting.
        """
        token = FreshnessToken.parse(token)
        if not token:
            return True
        self.check_reachable(token)
        timeout = self.settings.freshness_wait_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._applied(token, group, retry_s=0.0):
                    return True
            except KafkaError:
                pass  # a broker hiccup is "not yet": the deadline still bounds the wait
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(POLL_INTERVAL_S, remaining))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            admin, self._admin = self._admin, None
        if admin is not None and self._owns_admin:
            admin.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _committed(self, group: str | None, retry_s: float) -> dict[int, int]:
        group = group or self.settings.indexer_group
        found = self._retrying(lambda a: a.list_group_offsets({group: None}), retry_s)
        return {
            tp.partition: meta.offset
            for tp, meta in found.get(group, {}).items()
            if tp.topic == self.topic and meta.offset >= 0
        }

    def _applied(self, token: FreshnessToken, group: str | None, retry_s: float) -> bool:
        if not token:
            return True
        committed = self._committed(group, retry_s)
        return all(committed.get(p, -1) > offset for p, offset in token.items())

    def _partitions(self, admin: KafkaAdminClient) -> list[int]:
        (described,) = admin.describe_topics([self.topic])
        if described["error_code"]:
            raise KafkaError(f"topic {self.topic} not found (error {described['error_code']})")
        return sorted(p["partition_index"] for p in described["partitions"])

    def _offsets(self, spec: OffsetSpec) -> dict[int, int]:
        def fetch(admin: KafkaAdminClient) -> dict[int, int]:
            specs = {TopicPartition(self.topic, p): spec for p in self._partitions(admin)}
            return {tp.partition: o.offset for tp, o in admin.list_partition_offsets(specs).items()}

        return self._retrying(fetch, RETRY_S)

    def _retrying(self, call: Callable[[KafkaAdminClient], T], retry_s: float) -> T:
        deadline = time.monotonic() + retry_s
        while True:
            try:
                with self._lock:
                    if self._admin is None:
                        self._admin = clients.admin(self.settings, timeout_s=max(retry_s, 1.0))
                    return call(self._admin)
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def applied_offsets(settings: Settings, group: str | None = None) -> dict[int, int]:
    with Progress(settings) as progress:
        return progress.applied_offsets(group)


def consumer_lag(settings: Settings, group: str | None = None) -> dict[int, int]:
    with Progress(settings) as progress:
        return progress.consumer_lag(group)


def wait_for_token(
    settings: Settings, token: FreshnessToken | str, timeout: float | None = None
) -> bool:
    """True once the indexer applied every write in `token` (bounded by `timeout`)."""
    with Progress(settings) as progress:
        return progress.wait_for_token(token, timeout)
