"""Standing queries from the client's side: register, look up, cancel, read notifications.

Subscriptions live on the compacted subscriptions topic (key = subscription id, a tombstone
cancels); the standing-query matcher (`consumers.standing`) follows it and publishes
notifications keyed by subscription id, so one subscription's notifications share a partition.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from kafka.errors import KafkaError
from pydantic import ValidationError

from headwater.errors import InvalidInput, KafkaUnavailable, QueryError, UnknownTenantError
from headwater.events import Notification, Subscription
from headwater.runtime import clients
from headwater.runtime.reader import Tail, read_to_end
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 15.0
# Notifications are stamped by the broker's clock; read from a little before a subscription's
# creation so a skewed client clock cannot hide the first ones (other subscriptions' are skipped).
CLOCK_SLACK = timedelta(seconds=60)


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "subscription"
    return f"{where}: {str(err['msg']).removeprefix('Value error, ')}"


class _Hub:
    """One reader of the notifications topic, shared by every stream of a process.

    Each record goes to the streams of its key. The reader survives broker outages (`Tail`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tail = Tail(settings, settings.notifications_topic, start="end",
                         client_id="headwater-notifications", fetch_max_wait_ms=200)  # fmt: skip
        self._streams: dict[bytes, set[NotificationStream]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, stream: NotificationStream) -> int:
        """Deliver the stream's records from now on; returns the first offset it will get on
        its partition (everything before it is the stream's own catch-up)."""
        with self._lock:
            if self._thread is None:
                try:
                    self.tail.open()
                except KafkaUnavailable as exc:
                    raise QueryError(str(exc)) from exc
                self._thread = threading.Thread(
                    target=self._run, name="headwater-notifications", daemon=True
                )
                self._thread.start()
            # Records polled but not yet handed out are below this: the stream's catch-up
            # reads them, and `deliver` drops them should the reader hand them out after all.
            stream.joined = self.tail.positions.get(stream.partition, 0)
            self._streams.setdefault(stream.key, set()).add(stream)
            return stream.joined

    def detach(self, stream: NotificationStream) -> None:
        with self._lock:
            streams = self._streams.get(stream.key)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[stream.key]

    @property
    def partitions(self) -> int:
        with self._lock:
            if self.tail.positions:
                return len(self.tail.positions)
        return _partitions(self.settings, self.settings.notifications_topic)

    def _run(self) -> None:
        while not self._stop.is_set():
            records = self.tail.poll(0.5)
            with self._lock:  # positions move only here, so `attach` sees a consistent one
                for record in records:
                    for stream in self._streams.get(record.key, ()):
                        stream.deliver(record.offset, record.value)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tail.close()


class NotificationStream(Iterator[Notification]):
    """Notifications of one subscription: what it missed, then what the shared reader brings.

    Starts where asked (after an offset, at a time, else now). Notifications older than the
    shared reader's position are read once by a catch-up reader of the subscription's
    partition, which closes when it gets there; `poll(wait_s)` returns what arrived, each with
    its offset (usable as an SSE event id to resume from).
    """

    def __init__(
        self,
        settings: Settings,
        hub: _Hub,
        subscription_id: str,
        *,
        since: datetime | None = None,
        after_offset: int | None = None,
    ) -> None:
        self.subscription_id = subscription_id
        self.key = subscription_id.encode()
        self.partition = clients.partition_for(self.key, hub.partitions)
        self._hub = hub
        self._live: queue.SimpleQueue[tuple[int, bytes | None]] = queue.SimpleQueue()
        self.joined = 0
        hub.attach(self)
        start: Any = (
            {self.partition: after_offset + 1} if after_offset is not None else since or "end"
        )
        self._catchup: Tail | None = None
        if start != "end" and not (after_offset is not None and after_offset + 1 >= self.joined):
            self._catchup = Tail(settings, settings.notifications_topic, start=start,
                                 partitions=[self.partition], client_id="headwater-catchup",
                                 fetch_max_wait_ms=200)  # fmt: skip
        self._buffer: list[tuple[int, Notification]] = []

    def deliver(self, offset: int, value: bytes | None) -> None:
        """Called by the shared reader with each record of this subscription's key."""
        if offset >= self.joined:
            self._live.put((offset, value))

    def poll(self, wait_s: float = 1.0) -> list[tuple[int, Notification]]:
        """(offset, notification) pairs that arrived within `wait_s` (maybe none)."""
        if self._catchup is not None:
            return self._poll_catchup(wait_s)
        out = []
        try:
            item = self._live.get(timeout=wait_s)
            while True:
                self._decode(out, *item)
                item = self._live.get_nowait()
        except queue.Empty:
            pass
        return out

    def _poll_catchup(self, wait_s: float) -> list[tuple[int, Notification]]:
        assert self._catchup is not None
        out: list[tuple[int, Notification]] = []
        for record in self._catchup.poll(wait_s):
            if record.offset < self.joined and record.key == self.key:
                self._decode(out, record.offset, record.value)
        if self._catchup.positions.get(self.partition, 0) >= self.joined:
            self._catchup.close()
            self._catchup = None  # caught up: the shared reader has everything from here
        return out

    @staticmethod
    def _decode(out: list[tuple[int, Notification]], offset: int, value: bytes | None) -> None:
        if value is None:
            return
        try:
            out.append((offset, Notification.model_validate_json(value)))
        except ValidationError as exc:
            log.warning("ignoring a malformed notification: %s", _one_line(exc))

    def __next__(self) -> Notification:
        while not self._buffer:
            self._buffer = self.poll(1.0)
        return self._buffer.pop(0)[1]

    def close(self) -> None:
        self._hub.detach(self)
        if self._catchup is not None:
            self._catchup.close()
            self._catchup = None

    def __enter__(self) -> NotificationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _partitions(settings: Settings, topic: str) -> int:
    with Tail(settings, topic, start="end", client_id="headwater-notifications") as tail:
        try:
            return len(tail.end_offsets())
        except KafkaUnavailable as exc:
            raise QueryError(str(exc)) from exc


class _Table:
    """The live subscriptions, kept by following the compacted subscriptions topic.

    `get` catches up to the topic's end first (the records since the last look, not the whole
    topic), so a subscription registered anywhere is found, and unknown ids cost one look.
    """

    def __init__(self, settings: Settings) -> None:
        self.tail = Tail(settings, settings.subscriptions_topic, start="beginning",
                         client_id="headwater-subscriptions")  # fmt: skip
        self.subs: dict[str, Subscription] = {}
        self._lock = threading.Lock()

    def get(self, subscription_id: str, timeout_s: float = 15.0) -> Subscription | None:
        with self._lock:
            try:
                for record in self.tail.read_to_end(timeout_s):
                    apply_subscription_record(self.subs, record.key, record.value)
            except KafkaUnavailable as exc:
                raise QueryError(str(exc)) from exc
            return self.subs.get(subscription_id)

    def close(self) -> None:
        self.tail.close()


class SubscriptionClient:
    """Registers, looks up and cancels standing queries; opens their notification streams."""

    def __init__(self, settings: Settings, *, producer: Any = None) -> None:
        self.settings = settings
        self.topic = settings.subscriptions_topic
        self._producer = producer
        self._owns_producer = producer is None
        self._table = _Table(settings)
        self._hub = _Hub(settings)
        self._lock = threading.Lock()

    def _send(self, key: bytes, value: bytes | None) -> None:
        with self._lock:
            if self._producer is None:
                self._producer = clients.producer(
                    self.settings, client_id="headwater-subscriptions", max_block_ms=10_000
                )
        try:
            self._producer.send(self.topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise QueryError(f"cannot publish to {self.topic}: {one_line(exc)}") from exc

    def build(
        self, query: str, *, tenant: str | None = None, threshold: float | None = None
    ) -> Subscription:
        """A validated subscription (not yet registered)."""
        tenant = self.settings.default_tenant if tenant is None else tenant
        if not self.settings.tenant_known(tenant):
            raise UnknownTenantError(f"unknown tenant {tenant!r}")
        threshold = self.settings.standing_threshold if threshold is None else threshold
        try:
            return Subscription(tenant=tenant, query=query, threshold=threshold)
        except ValidationError as exc:
            raise InvalidInput(f"invalid subscription: {_one_line(exc)}") from exc

    def register(self, subscription: Subscription) -> Subscription:
        self._send(subscription.subscription_id.encode(), subscription.to_bytes())
        return subscription

    def subscribe(
        self, query: str, *, tenant: str | None = None, threshold: float | None = None
    ) -> Subscription:
        return self.register(self.build(query, tenant=tenant, threshold=threshold))

    def cancel(self, subscription_id: str) -> None:
        """Remove a subscription (a tombstone on the compacted topic)."""
        self._send(subscription_id.encode(), None)

    def get(self, subscription_id: str) -> Subscription | None:
        """The registered subscription, None if unknown or cancelled."""
        return self._table.get(subscription_id)

    def notifications(
        self, subscription: Subscription, *, after_offset: int | None = None
    ) -> NotificationStream:
        """Every notification of `subscription` since it was created (or after an offset)."""
        return NotificationStream(
            self.settings,
            self._hub,
            subscription.subscription_id,
            since=subscription.created - CLOCK_SLACK,
            after_offset=after_offset,
        )

    def close(self) -> None:
        self._hub.close()
        self._table.close()
        if self._owns_producer and self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


def read_subscriptions(settings: Settings, timeout_s: float = 15.0) -> dict[str, Subscription]:
    """Every live subscription: the compacted topic read from the beginning to its end."""
    subs: dict[str, Subscription] = {}
    try:
        for record in read_to_end(settings, settings.subscriptions_topic, timeout_s=timeout_s,
                                  client_id="headwater-subscriptions"):  # fmt: skip
            apply_subscription_record(subs, record.key, record.value)
    except KafkaUnavailable as exc:
        raise QueryError(str(exc)) from exc
    return subs


def apply_subscription_record(
    subs: dict[str, Subscription], key: bytes | None, value: bytes | None
) -> None:
    """Fold one subscriptions-topic record into `subs` (None value = cancelled)."""
    if key is None:
        return
    sub_id = key.decode(errors="replace")
    if value is None:
        subs.pop(sub_id, None)
        return
    try:
        subs[sub_id] = Subscription.model_validate_json(value)
    except ValidationError as exc:
        log.warning("ignoring a malformed subscription %s: %s", sub_id, _one_line(exc))
