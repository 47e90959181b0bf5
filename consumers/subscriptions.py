"""Standing queries from the client's side: register, look up, cancel, read notifications.

Subscriptions live on the compacted subscriptions topic (key = subscription id, a tombstone
cancels); the standing-query matcher (`consumers.standing`) follows it and publishes
notifications keyed by subscription id, so one subscription's notifications share a partition.
"""

from __future__ import annotations

import logging
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


class NotificationStream(Iterator[Notification]):
    """Notifications of one subscription, read from its partition of the notifications topic.

    Starts where asked (after an offset, at a time, else at the end); `poll(wait_s)` returns what
    arrived, each with its offset (usable as an SSE event id to resume from).
    """

    def __init__(
        self,
        settings: Settings,
        subscription_id: str,
        *,
        since: datetime | None = None,
        after_offset: int | None = None,
    ) -> None:
        self.subscription_id = subscription_id
        self._key = subscription_id.encode()
        topic = settings.notifications_topic
        partition = clients.partition_for(self._key, _partitions(settings, topic))
        start: Any = {partition: after_offset + 1} if after_offset is not None else since or "end"
        self._tail = Tail(settings, topic, start=start, partitions=[partition],
                          client_id="headwater-notifications", fetch_max_wait_ms=200)  # fmt: skip
        try:
            self._tail.open()  # resolve the start now, before anything happens
        except KafkaUnavailable as exc:
            raise QueryError(str(exc)) from exc
        self._buffer: list[tuple[int, Notification]] = []

    def poll(self, wait_s: float = 1.0) -> list[tuple[int, Notification]]:
        """(offset, notification) pairs that arrived within `wait_s` (maybe none)."""
        out = []
        for record in self._tail.poll(wait_s):
            if record.key != self._key:
                continue
            try:
                out.append((record.offset, Notification.model_validate_json(record.value)))
            except ValidationError as exc:
                log.warning("ignoring a malformed notification: %s", _one_line(exc))
        return out

    def __next__(self) -> Notification:
        while not self._buffer:
            self._buffer = self.poll(1.0)
        return self._buffer.pop(0)[1]

    def close(self) -> None:
        self._tail.close()

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


class SubscriptionClient:
    """Registers, looks up and cancels standing queries; opens their notification streams."""

    def __init__(self, settings: Settings, *, producer: Any = None) -> None:
        self.settings = settings
        self.topic = settings.subscriptions_topic
        self._producer = producer
        self._owns_producer = producer is None
        self._known: dict[str, Subscription] = {}
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
        self._known[subscription.subscription_id] = subscription
        return subscription

    def subscribe(
        self, query: str, *, tenant: str | None = None, threshold: float | None = None
    ) -> Subscription:
        return self.register(self.build(query, tenant=tenant, threshold=threshold))

    def cancel(self, subscription_id: str) -> None:
        """Remove a subscription (a tombstone on the compacted topic)."""
        self._send(subscription_id.encode(), None)
        self._known.pop(subscription_id, None)

    def get(self, subscription_id: str) -> Subscription | None:
        """The registered subscription, None if unknown or cancelled (reads the topic)."""
        if subscription_id in self._known:
            return self._known[subscription_id]
        found = read_subscriptions(self.settings).get(subscription_id)
        if found is not None:
            self._known[subscription_id] = found
        return found

    def notifications(
        self, subscription: Subscription, *, after_offset: int | None = None
    ) -> NotificationStream:
        """Every notification of `subscription` since it was created (or after an offset)."""
        return NotificationStream(
            self.settings,
            subscription.subscription_id,
            since=subscription.created - CLOCK_SLACK,
            after_offset=after_offset,
        )

    def close(self) -> None:
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
