"""Asking questions over Kafka and registering standing queries.

`QueryClient.ask` publishes a QueryEvent and streams back the AnswerEvents for its query_id. One
background reader per client follows the answers topic from its end (positioned before the first
query is published, so no answer can be missed) and hands each event to the query waiting for
it. `SubscriptionClient` stores standing queries on the compacted subscriptions topic and reads
their notifications.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headwater import topics
from headwater.settings import Settings
from producers.events import AnswerEvent, Citation, QueryEvent, Tenant

log = logging.getLogger(__name__)

POLL_MS = 200
SEND_TIMEOUT_S = 15.0


class QueryError(RuntimeError):
    """A query that could not be asked or answered; the message is one line for the user."""


class QueryTimeout(QueryError):
    """No answer event arrived in time (is an answerer running?)."""


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "query"
    return f"{where}: {str(err['msg']).removeprefix('Value error, ')}"


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2, like the Java client)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# -- following a topic by key ----------------------------------------------------------------


class _KeyedTail:
    """Reads a topic from its end in one thread and routes each record to its key's waiter."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._waiters: dict[bytes, queue.SimpleQueue[bytes | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def start(self) -> None:
        """Position at the topic's end (synchronously) and start reading; idempotent."""
        with self._lock:
            if self._thread is not None:
                return
            consumer = topics.consumer(
                self.settings,
                group_id=None,
                client_id="headwater-replies",
                request_timeout_ms=15_000,
                fetch_max_wait_ms=100,
            )
            try:
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    raise QueryError(f"topic {self.topic} does not exist (`headwater kafka start`)")
                tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
                consumer.assign(tps)
                consumer.seek_to_end(*tps)
                for tp in tps:
                    consumer.position(tp)  # resolves "end" now, before any query is sent
            except BaseException:
                consumer.close()
                raise
            self._thread = threading.Thread(
                target=self._run, args=(consumer,), name="headwater-replies", daemon=True
            )
            self._thread.start()

    def _run(self, consumer: KafkaConsumer) -> None:
        try:
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=POLL_MS).values():
                    for record in records:
                        waiter = self._waiters.get(record.key)
                        if waiter is not None:
                            waiter.put(record.value)
        except BaseException as exc:
            log.error("reading %s failed: %s", self.topic, exc)
            self._failed = exc
        finally:
            consumer.close()
            for waiter in list(self._waiters.values()):
                waiter.put(None)  # wakes every waiter: the stream is over

    def register(self, key: bytes) -> queue.SimpleQueue[bytes | None]:
        if self._failed is not None:
            raise QueryError(f"the reply reader of {self.topic} stopped: {self._failed}")
        waiter: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._waiters[key] = waiter
        return waiter

    def unregister(self, key: bytes) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.put(None)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- answers ---------------------------------------------------------------------------------


class AnswerStream(Iterator[AnswerEvent]):
    """The answer events of one query, in order, ending after `done` or `error`.

    Iterating blocks; `get(wait_s)` returns None when nothing arrived within `wait_s` (for
    callers that must stay responsive). Both raise QueryTimeout after `timeout_s` of silence.
    """

    def __init__(
        self,
        tail: _KeyedTail,
        query: QueryEvent,
        waiter: queue.SimpleQueue[bytes | None],
        timeout_s: float,
    ) -> None:
        self.query = query
        self.query_id = query.query_id
        self.timeout_s = timeout_s
        self.finished = False
        self._tail = tail
        self._waiter = waiter
        self._next_seq = 0
        self._last = time.monotonic()

    def get(self, wait_s: float | None = None) -> AnswerEvent | None:
        """The next event, None if none within `wait_s`; StopIteration-free (check .finished)."""
        if self.finished:
            return None
        deadline = self._last + self.timeout_s
        until = deadline if wait_s is None else min(deadline, time.monotonic() + wait_s)
        while True:
            remaining = until - time.monotonic()
            try:
                raw = (
                    self._waiter.get(timeout=max(0.0, remaining))
                    if remaining > 0
                    else (self._waiter.get_nowait())
                )
            except queue.Empty:
                if time.monotonic() >= deadline:
                    self.close()
                    raise QueryTimeout(
                        f"no answer to query {self.query_id} within {self.timeout_s:g} s "
                        "(is an answerer running? `headwater answerer`)"
                    ) from None
                return None
            if raw is None:
                self.close()
                raise QueryError(f"the answer stream of query {self.query_id} was closed")
            try:
                event = AnswerEvent.model_validate_json(raw)
            except ValidationError as exc:
                log.warning("ignoring a malformed answer event: %s", _one_line(exc))
                continue
            if event.seq < self._next_seq:
                continue  # a redelivered query answered again: keep the first answer
            self._next_seq = event.seq + 1
            self._last = time.monotonic()
            if event.kind in ("done", "error"):
                self.close()
            return event

    def __next__(self) -> AnswerEvent:
        while not self.finished:
            event = self.get(wait_s=1.0)
            if event is not None:
                return event
        raise StopIteration

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._tail.unregister(self.query_id.encode())

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueryClient:
    """Publishes queries and streams their answers; thread-safe, one reply reader per client."""

    def __init__(
        self, settings: Settings, *, producer: Any = None, reply_topic: str | None = None
    ) -> None:
        self.settings = settings
        self.reply_topic = reply_topic or settings.answers_topic
        self._producer = producer
        self._owns_producer = producer is None
        self._tail = _KeyedTail(settings, self.reply_topic)
        self._lock = threading.Lock()

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            if self._producer is None:
                self._producer = topics.producer(
                    self.settings, client_id="headwater-query-client", max_block_ms=10_000
                )
        try:
            self._producer.send(topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise QueryError(
                f"cannot publish to {topic} on {self.settings.bootstrap}: {exc}"
            ) from exc

    def ask(
        self,
        text: str,
        *,
        tenant: str | None = None,
        mode: Literal["search", "answer"] = "answer",
        k: int = 5,
        token: object = None,
        timeout: float | None = None,
    ) -> AnswerStream:
        """Publish a query; the returned stream yields its answer events as they arrive."""
        tenant = self.settings.default_tenant if tenant is None else tenant
        try:
            query = QueryEvent(
                tenant=tenant,
                text=text,
                mode=mode,
                k=k,
                token=str(token) if token else None,  # a FreshnessToken or its text
                reply_topic=self.reply_topic,
            )
        except ValidationError as exc:
            raise QueryError(f"invalid query: {_one_line(exc)}") from exc
        if not self.settings.tenant_known(tenant):
            raise QueryError(f"unknown tenant {tenant!r}")
        try:
            self._tail.start()
        except KafkaError as exc:
            raise QueryError(f"cannot read {self.reply_topic}: {exc}") from exc
        key = query.query_id.encode()
        waiter = self._tail.register(key)
        stream = AnswerStream(
            self._tail, query, waiter, self.settings.query_timeout_s if timeout is None else timeout
        )
        try:
            self._send(self.settings.queries_topic, key, query.to_bytes())
        except BaseException:
            stream.close()
            raise
        return stream

    def search(
        self,
        text: str,
        *,
        tenant: str | None = None,
        k: int = 5,
        token: object = None,
        timeout: float | None = None,
    ) -> list[Citation]:
        """Retrieval only, through the query consumers: the hits of a `search` query."""
        hits: list[Citation] = []
        with self.ask(text, tenant=tenant, mode="search", k=k, token=token, timeout=timeout) as s:
            for event in s:
                if event.kind == "hits":
                    hits = list(event.hits or [])
                elif event.kind == "error":
                    raise QueryError(event.error or "the query failed")
        return hits

    def close(self) -> None:
        self._tail.close()
        if self._owns_producer and self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


# -- standing queries ------------------------------------------------------------------------


class Subscription(BaseModel):
    """A standing query: notify when indexed chunks of `tenant` come to match `query` or go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    subscription_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$"
    )
    tenant: Tenant
    query: str = Field(min_length=1, max_length=4096)
    threshold: float = Field(ge=-1.0, le=1.0, description="Cosine similarity needed to match.")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Notification(BaseModel):
    """A document change that matters to a standing query: new matches or lost matches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    notification_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    subscription_id: str
    tenant: Tenant
    doc_id: str
    op: Literal["added", "changed", "deleted"]
    version: int
    matched: list[Citation] = Field(default_factory=list, description="Chunks that now match.")
    removed: list[Citation] = Field(default_factory=list, description="Matches that are gone.")
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class NotificationStream(Iterator[Notification]):
    """Notifications of one subscription, read by its own consumer (one partition).

    Starts where asked (an offset, a time, else the end); `poll(wait_s)` returns what arrived,
    each with its offset (usable as an SSE event id to resume from).
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
        topic = settings.notifications_topic
        self._consumer = topics.consumer(
            settings, group_id=None, client_id="headwater-notifications", fetch_max_wait_ms=200
        )
        try:
            parts = sorted(self._consumer.partitions_for_topic(topic) or ())
            if not parts:
                raise QueryError(f"topic {topic} does not exist (`headwater kafka start`)")
            self.tp = TopicPartition(
                topic, parts[partition_for(subscription_id.encode(), len(parts))]
            )
            self._consumer.assign([self.tp])
            if after_offset is not None:
                self._consumer.seek(self.tp, after_offset + 1)
            elif since is not None:
                found = self._consumer.offsets_for_times({self.tp: int(since.timestamp() * 1000)})
                if found.get(self.tp) is None:
                    self._consumer.seek_to_end(self.tp)
                else:
                    self._consumer.seek(self.tp, found[self.tp].offset)
            else:
                self._consumer.seek_to_end(self.tp)
            self._consumer.position(self.tp)  # resolve the start now, before anything happens
        except BaseException:
            self._consumer.close()
            raise
        self._buffer: list[tuple[int, Notification]] = []

    def poll(self, wait_s: float = 1.0) -> list[tuple[int, Notification]]:
        """(offset, notification) pairs that arrived within `wait_s` (maybe none)."""
        out = []
        for records in self._consumer.poll(timeout_ms=int(wait_s * 1000)).values():
            for record in records:
                if record.key != self.subscription_id.encode():
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
        self._consumer.close()

    def __enter__(self) -> NotificationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Notifications are stamped by the broker's clock; read from a little before a subscription's
# creation so a skewed client clock cannot hide the first ones (other subscriptions' are skipped).
CLOCK_SLACK = timedelta(seconds=60)


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
                self._producer = topics.producer(
                    self.settings, client_id="headwater-subscriptions", max_block_ms=10_000
                )
        try:
            self._producer.send(self.topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise QueryError(f"cannot publish to {self.topic}: {exc}") from exc

    def build(
        self, query: str, *, tenant: str | None = None, threshold: float | None = None
    ) -> Subscription:
        """A validated subscription (not yet registered)."""
        tenant = self.settings.default_tenant if tenant is None else tenant
        if not self.settings.tenant_known(tenant):
            raise QueryError(f"unknown tenant {tenant!r}")
        threshold = self.settings.standing_threshold if threshold is None else threshold
        try:
            return Subscription(tenant=tenant, query=query, threshold=threshold)
        except ValidationError as exc:
            raise QueryError(f"invalid subscription: {_one_line(exc)}") from exc

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
    consumer = topics.consumer(settings, group_id=None, client_id="headwater-subscriptions")
    try:
        topic = settings.subscriptions_topic
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            raise QueryError(f"topic {topic} does not exist (`headwater kafka start`)")
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        subs: dict[str, Subscription] = {}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise QueryError(f"reading {topic} took longer than {timeout_s:g} s")
            for records in consumer.poll(timeout_ms=POLL_MS).values():
                for record in records:
                    apply_subscription_record(subs, record.key, record.value)
        return subs
    finally:
        consumer.close()


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
