"""Asking questions over Kafka: publish a query, stream back its answer events.

`QueryClient.ask` publishes a QueryEvent and streams back the AnswerEvents for its query_id. One
background reader per client follows the answers topic from its end (positioned before the first
query is published, so no answer can be missed) and hands each event to the query waiting for
it. A query carries the client's wait as its time to live, and a stream closed before its answer
ended (the HTTP client went away, the wait ran out) publishes a tombstone under the query id,
so the answerers stop generating what nobody reads. The reader survives broker outages (the
runtime's `Tail`): it resumes where it was, so a restarted broker costs the waiting queries a
pause, never the client.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from kafka.errors import KafkaError
from pydantic import ValidationError

from headwater.errors import (
    InvalidInput,
    KafkaUnavailable,
    QueryError,
    QueryTimeout,
    UnknownTenantError,
)
from headwater.events import AnswerEvent, ChatTurn, Hit, QueryEvent
from headwater.runtime import clients
from headwater.runtime.reader import Tail
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)

POLL_MS = 200
SEND_TIMEOUT_S = 15.0


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "query"
    return f"{where}: {str(err['msg']).removeprefix('Value error, ')}"


# -- following a topic by key ----------------------------------------------------------------


class _Replies:
    """Follows a reply topic from its end and hands each record to the query waiting for it."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.tail = Tail(settings, topic, start="end", client_id="headwater-replies",
                         request_timeout_ms=15_000, fetch_max_wait_ms=100)  # fmt: skip
        self._waiters: dict[bytes, queue.SimpleQueue[bytes | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Pin the topic's end now (so no reply to a later query is missed); idempotent."""
        with self._lock:
            if self._thread is not None:
                return
            self.tail.open()  # KafkaUnavailable: nothing started, the next ask tries again
            self._thread = threading.Thread(target=self._run, name="headwater-replies", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for record in self.tail.poll(POLL_MS / 1000):
                    waiter = self._waiters.get(record.key)
                    if waiter is not None:
                        waiter.put(record.value)
        finally:
            self.tail.close()
            for waiter in list(self._waiters.values()):
                waiter.put(None)  # wakes every waiter: the stream is over

    def register(self, key: bytes) -> queue.SimpleQueue[bytes | None]:
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
        tail: _Replies,
        query: QueryEvent,
        waiter: queue.SimpleQueue[bytes | None],
        timeout_s: float,
        on_abandon: Callable[[QueryEvent], None] | None = None,
    ) -> None:
        self.query = query
        self.query_id = query.query_id
        self.timeout_s = timeout_s
        self.finished = False
        self.answered = False  # the answer ended (done or error)
        self._on_abandon = on_abandon
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
                self.answered = True
                self.close()
            return event

    def __next__(self) -> AnswerEvent:
        while not self.finished:
            event = self.get(wait_s=1.0)
            if event is not None:
                return event
        raise StopIteration

    def close(self) -> None:
        """Stop reading; before the answer ended, this tells the answerers to stop too."""
        if not self.finished:
            self.finished = True
            self._tail.unregister(self.query_id.encode())
            if not self.answered and self._on_abandon is not None:
                self._on_abandon(self.query)

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
        self._tail = _Replies(settings, self.reply_topic)
        self._lock = threading.Lock()

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            if self._producer is None:
                self._producer = clients.producer(
                    self.settings, client_id="headwater-query-client", max_block_ms=10_000
                )
        try:
            self._producer.send(topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise QueryError(f"cannot publish to {topic}: {one_line(exc)}") from exc

    def ask(
        self,
        text: str,
        *,
        tenant: str | None = None,
        mode: Literal["search", "answer"] = "answer",
        k: int = 5,
        token: object = None,
        timeout: float | None = None,
        history: Sequence[ChatTurn] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        adapter: str | None = None,
    ) -> AnswerStream:
        """Publish a query; the returned stream yields its answer events as they arrive.

        `history` (earlier turns of a chat), `max_tokens`, `temperature` and `adapter` (a
        version to answer with instead of the current one) shape the answer.
        """
        tenant = self.settings.default_tenant if tenant is None else tenant
        timeout = self.settings.query_timeout_s if timeout is None else timeout
        try:
            query = QueryEvent(
                tenant=tenant,
                text=text,
                mode=mode,
                k=k,
                token=str(token) if token else None,  # a FreshnessToken or its text
                reply_topic=self.reply_topic,
                history=list(history),
                max_tokens=max_tokens,
                temperature=temperature,
                adapter=adapter,
                ttl_s=timeout,  # nobody waits longer for the first event
            )
        except ValidationError as exc:
            raise InvalidInput(f"invalid query: {_one_line(exc)}") from exc
        if not self.settings.tenant_known(tenant):
            raise UnknownTenantError(f"unknown tenant {tenant!r}")
        try:
            self._tail.start()
        except KafkaUnavailable as exc:
            raise QueryError(str(exc)) from exc
        key = query.query_id.encode()
        waiter = self._tail.register(key)
        stream = AnswerStream(self._tail, query, waiter, timeout)
        try:
            self._send(self.settings.queries_topic, key, query.to_bytes())
        except BaseException:
            stream.answered = True  # never asked: nothing to cancel
            stream.close()
            raise
        stream._on_abandon = self._cancel
        return stream

    def _cancel(self, query: QueryEvent) -> None:
        """Publish the tombstone of an abandoned query (not awaited: best effort)."""
        try:
            if self._producer is not None:
                self._producer.send(self.settings.queries_topic, key=query.query_id.encode(),
                                    value=None)  # fmt: skip
        except KafkaError as exc:
            log.info("could not cancel query %s: %s", query.query_id, one_line(exc))

    def search(
        self,
        text: str,
        *,
        tenant: str | None = None,
        k: int = 5,
        token: object = None,
        timeout: float | None = None,
    ) -> list[Hit]:
        """Retrieval only, through the query consumers: the hits of a `search` query."""
        hits: list[Hit] = []
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
