"""The query consumer: retrieval, then a streamed answer, as events on the reply topic.

A consumer-group member on the queries topic, on the runtime's `PoolLoop`. Each query gets,
keyed by its query_id (so one answer stays on one partition, in order): `hits`, then `token`
batches (answer mode), then `done` with timings, or `error`. A few queries are answered at once
(search-only queries don't wait behind generations); a partition's offset is committed only
past queries whose every event the broker acknowledged, so a crash re-answers rather than drops
a query. A query that fails (bad input, Milvus away) is answered with an `error` event.

Fairness and bounds: one tenant's queries take at most `query_tenant_workers` workers, the next
ones wait in that tenant's lane (`query_tenant_backlog` at most; more are answered "busy"), so a
flood of one tenant never holds back another's. A query the asker stopped waiting for is not
answered: it expires `ttl_s` after the broker appended it (the queries topic is stamped by the
broker, never by the asker's clock), and an asker that closes its stream publishes a null value
under the query id (a tombstone), which stops a generation in progress.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Histogram

from consumers.adapters import AdapterFollower
from consumers.generation import Generation, Generator, extractive_answer
from headwater.errors import (
    Busy,
    Cancelled,
    EventError,
    GenerationError,
    QueryAbandoned,
    UnknownTenantError,
    public_message,
)
from headwater.events import (
    HOUSE,
    TENANT_RE,
    AnswerEvent,
    ChatTurn,
    Hit,
    QueryEvent,
    parse_query,
)
from headwater.runtime.outbox import Outbox
from headwater.runtime.pool import PoolLoop
from headwater.settings import Settings
from models.adapters import adapter_path, parse_name

log = logging.getLogger(__name__)

ANSWERED = Counter("headwater_queries_total", "Queries answered", ["mode", "outcome"])
ERRORS = Counter("headwater_query_errors_total", "Queries that ended in an error", ["stage"])
LATENCY = Histogram(
    "headwater_query_seconds",
    "Query received to final event",
    ["mode"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
RETRIEVE = Histogram(
    "headwater_retrieve_seconds",
    "Retrieval time per query",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
FIRST_TOKEN = Histogram(
    "headwater_first_token_seconds",
    "Query received to first answer text",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
)

SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages below. Cite the passages you use "
    "with their numbers in brackets, like [1]. If the passages do not contain the answer, say "
    "that you don't know."
)
NO_PASSAGES = "I don't know: no indexed passage matches the question."
FLUSH_S = 0.1  # a token batch is sent early when text is slow to come
PASSAGE_MAX_CHARS = 1500
REMEMBERED_CANCELS = 10_000  # cancellations kept for queries not started yet
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type of a broker-stamped record
DROPPED = Counter("headwater_queries_dropped_total", "Queries not answered", ["reason"])


@dataclass(frozen=True)
class Asked:
    """A record of the queries topic: a query, or (query None) the cancellation of one."""

    query_id: str
    query: QueryEvent | None
    received: float  # time.monotonic() when polled

    @property
    def tenant(self) -> str | None:
        return None if self.query is None else self.query.tenant


class Search(Protocol):
    def search(
        self, query: str, *, tenant: str, k: int = 5, token: str | None = None
    ) -> Sequence[Hit]: ...


def build_prompt(
    question: str,
    hits: Sequence[Hit],
    max_chars: int = 6000,
    history: Sequence[ChatTurn] = (),
) -> list[dict[str, str]]:
    """System message, earlier turns of a chat, the numbered passages, then the question.

    The passages fill `max_chars`; so do the chat's turns, the latest first (an application's
    own system messages are added to ours, after it).
    """
    parts: list[str] = []
    budget = max_chars
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())[: min(PASSAGE_MAX_CHARS, budget)]
        if not text:
            break
        where = f"{h.doc_id}, {h.section}" if h.section else h.doc_id
        parts.append(f"[{i}] ({where}) {text}")
        budget -= len(text)
    passages = "\n\n".join(parts)
    system = "\n\n".join([SYSTEM_PROMPT, *(t.content for t in history if t.role == "system")])
    turns: list[dict[str, str]] = []
    budget = max_chars
    for turn in reversed([t for t in history if t.role != "system"]):
        if len(turn.content) > budget:
            break
        budget -= len(turn.content)
        turns.append({"role": turn.role, "content": turn.content})
    turns.reverse()
    while turns and turns[0]["role"] == "assistant":
        turns.pop(0)  # a kept answer whose question did not fit means nothing alone
    return [
        {"role": "system", "content": system[: max_chars + len(SYSTEM_PROMPT)]},
        *turns,
        {"role": "user", "content": f"Passages:\n\n{passages}\n\nQuestion: {question}"},
    ]


class _Reply:
    """The events of one answer: numbering and token batching, sent through an outbox."""

    def __init__(self, out: Outbox, topic: str, query_id: str, tenant: str, batch: int) -> None:
        self.out = out
        self.topic = topic
        self.query_id = query_id
        self.tenant = tenant
        self.batch = batch
        self.seq = 0
        self._pieces: list[str] = []
        self._last_flush = time.monotonic()

    def send(self, kind: str, **fields: Any) -> None:
        event = AnswerEvent(
            query_id=self.query_id, tenant=self.tenant, kind=kind, seq=self.seq, **fields
        )
        self.seq += 1
        self.out.send(self.topic, event.to_bytes(), key=self.query_id.encode())

    def token(self, piece: str) -> None:
        self._pieces.append(piece)
        if len(self._pieces) >= self.batch or time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush_tokens()

    def flush_tokens(self) -> None:
        if self._pieces:
            self.send("token", text="".join(self._pieces))
            self._pieces = []
        self._last_flush = time.monotonic()

    def finish(self, kind: str, **fields: Any) -> None:
        """Send `done` (after the last text) or `error` (dropping unsent text)."""
        if kind == "done":
            self.flush_tokens()
        else:
            self._pieces = []
        self.send(kind, **fields)


class Answerer:
    """Answers queries from the queries topic; one instance per process, run in a thread."""

    def __init__(
        self,
        settings: Settings,
        searcher: Search,
        generator: Generator | None = None,
        *,
        follow_adapters: bool = True,
        producer: Any = None,
    ) -> None:
        self.settings = settings
        self.searcher = searcher
        self.generator = generator
        self.follower = (
            AdapterFollower(settings, generator)
            if generator is not None and follow_adapters
            else None
        )
        self.producer = producer  # None: the loop's own (tests hand in a fake for `answer`)
        self.answered = 0  # per instance; the prometheus counters are process-wide
        self.errors = 0
        self.ready = threading.Event()  # set once the consumer has its partitions
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}  # query id -> its "abandoned" flag
        self._cancelled: OrderedDict[str, bool] = OrderedDict()

    # -- one query -----------------------------------------------------------------------------
    def answer(
        self,
        query: QueryEvent,
        out: Outbox | None = None,
        cancel: threading.Event | None = None,
        received: float | None = None,
        abandoned: threading.Event | None = None,
    ) -> str:
        """Send the whole answer of one query through `out`; returns "done", "error" or
        "abandoned" (`abandoned` was set: the rest of the answer is not generated).

        The events are acknowledged only once `out` is settled (the loop does that before it
        commits). Raises `Cancelled` when `cancel` is set mid-answer.
        """
        out = out or Outbox(self.producer)
        t0 = received if received is not None else time.monotonic()
        reply = _Reply(
            out, self._reply_topic(query), query.query_id, query.tenant,
            self.settings.answer_token_batch,
        )  # fmt: skip
        stage = "search"
        try:
            if not self.settings.tenant_known(query.tenant):
                raise UnknownTenantError(f"unknown tenant {query.tenant!r}")
            hits = list(
                self.searcher.search(query.text, tenant=query.tenant, k=query.k, token=query.token)
            )
            retrieve_s = time.monotonic() - t0
            RETRIEVE.observe(retrieve_s)
            reply.send("hits", hits=hits)
            timing = {"retrieve_ms": round(retrieve_s * 1000, 2)}
            adapter, usage, finish = None, None, None
            if query.mode == "answer":
                stage = "generate"
                adapter, first, usage, finish = self._stream_answer(
                    query, hits, reply, cancel, abandoned
                )
                if first is not None:
                    timing["first_token_ms"] = round((first - t0) * 1000, 2)
                    FIRST_TOKEN.observe(first - t0)
            timing["total_ms"] = round((time.monotonic() - t0) * 1000, 2)
            reply.finish("done", timing=timing, adapter_version=adapter, usage=usage,
                         finish_reason=finish)  # fmt: skip
        except Cancelled:
            raise
        except QueryAbandoned:
            log.info("query %s abandoned by its asker; not generated further", query.query_id)
            DROPPED.labels("abandoned").inc()
            return "abandoned"
        except Exception as exc:
            reason = public_message(exc)
            log.warning("query %s failed in %s: %s", query.query_id, stage, reason)
            self.errors += 1
            ERRORS.labels(stage).inc()
            ANSWERED.labels(query.mode, "error").inc()
            reply.finish("error", error=reason)
            return "error"
        self.answered += 1
        ANSWERED.labels(query.mode, "done").inc()
        LATENCY.labels(query.mode).observe(time.monotonic() - t0)
        return "done"

    def _stream_answer(
        self,
        query: QueryEvent,
        hits: list[Hit],
        reply: _Reply,
        cancel: threading.Event | None,
        abandoned: threading.Event | None = None,
    ) -> tuple[str | None, float | None, dict[str, int], str]:
        """Stream the answer's text; returns adapter, first-text time, usage, finish reason."""
        first: float | None = None
        if not hits:
            reply.token(NO_PASSAGES)
            return None, time.monotonic(), {"prompt_tokens": 0, "completion_tokens": 1}, "stop"
        generation: Generation | None = None
        adapter: str | None = None
        # Extractive answers count their pieces as tokens, up to the same limits.
        limit = min(query.max_tokens or self.settings.max_new_tokens,
                    self.settings.max_new_tokens)  # fmt: skip
        if self.generator is None:
            pieces: Iterable[str] = extractive_answer([h.text for h in hits])
        else:
            prompt = build_prompt(query.text, hits, self.settings.prompt_max_chars, query.history)
            generation = self._generation(query, prompt)
            pieces, limit = generation, generation.max_new_tokens
        sent, cut = 0, False
        try:
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"query {query.query_id}")
                if abandoned is not None and abandoned.is_set():
                    raise QueryAbandoned(query.query_id)
                if not piece:
                    continue
                if generation is None and sent >= limit:
                    cut = True
                    break
                if first is None:
                    first = time.monotonic()
                reply.token(piece)
                sent += 1
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # takes the answer out of the decoding batch when it ends early
        if generation is None:
            usage = {"prompt_tokens": 0, "completion_tokens": sent}
        else:
            # Read at the end: an adapter that failed to load was replaced by its fallback.
            adapter = generation.adapter
            usage = {"prompt_tokens": generation.prompt_tokens,
                     "completion_tokens": generation.completion_tokens}  # fmt: skip
            cut = generation.completion_tokens >= limit
        return adapter, first, usage, "length" if cut else "stop"

    def _generation(self, query: QueryEvent, prompt: list[dict[str, str]]) -> Generation:
        """Start the generation: the tenant's adapter (else the house one, else the base model),
        or the adapter the query names, which must be the tenant's own or the house's."""
        assert self.generator is not None
        options = {"max_new_tokens": query.max_tokens, "temperature": query.temperature}
        if query.adapter is None:
            return self.generator.stream(prompt, tenant=query.tenant, **options)
        try:
            scope, version = parse_name(query.adapter)
        except ValueError:
            scope = version = None
        if scope not in (query.tenant, HOUSE) or version is None:
            # Another tenant's adapter is as unknown here as one that does not exist.
            raise GenerationError(f"no such adapter for this tenant: {query.adapter[:100]!r}")
        # Loaded on first use; kept while hot, like every adapter (LRU within the budget).
        self.generator.offer(query.adapter, adapter_path(self.settings, scope, version))
        return self.generator.stream(prompt, adapter=query.adapter, **options)

    def _reply_topic(self, query: QueryEvent) -> str:
        return reply_topic_for(self.settings, query.reply_topic)

    # -- the loop ------------------------------------------------------------------------------
    def _decode(self, record: ConsumerRecord) -> Asked:
        now = time.monotonic()
        if record.value is None:  # a tombstone: the asker of this query id stopped waiting
            query_id = (record.key or b"").decode("utf-8", "replace")
            if not 1 <= len(query_id) <= 64:
                raise EventError("a cancellation (null value) needs the query id as its key")
            return Asked(query_id, None, now)
        query = parse_query(record.value)
        return Asked(query.query_id, query, now)

    def _handle(
        self, item: Asked, record: ConsumerRecord, out: Outbox, cancel: threading.Event
    ) -> None:
        if item.query is None:
            self._abandon(item.query_id)
            return
        query = item.query
        if self._expired(query, record, item.received):
            log.info("query %s expired before it was answered; dropped", query.query_id)
            DROPPED.labels("expired").inc()
            return
        with self._lock:
            if self._cancelled.pop(query.query_id, False):
                DROPPED.labels("abandoned").inc()
                return
            abandoned = self._running[query.query_id] = threading.Event()
        try:
            self.answer(query, out, cancel, item.received, abandoned)
        finally:
            with self._lock:
                self._running.pop(query.query_id, None)

    def _abandon(self, query_id: str) -> None:
        with self._lock:
            running = self._running.get(query_id)
            if running is not None:
                running.set()
                return
            self._cancelled[query_id] = True  # it may still be waiting in its tenant's lane
            while len(self._cancelled) > REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    @staticmethod
    def _expired(query: QueryEvent, record: ConsumerRecord, received: float) -> bool:
        """Whether the asker has stopped waiting: `ttl_s` after the broker appended the query
        (its clock against ours: servers agree within seconds, far below a query's ttl); on a
        topic stamped by the producer, from when this answerer received it."""
        if query.ttl_s is None:
            return False
        if getattr(record, "timestamp_type", None) == LOG_APPEND_TIME:
            return time.time() - record.timestamp / 1000 > query.ttl_s
        return time.monotonic() - received > query.ttl_s

    def _refuse(self, exc: Exception, record: ConsumerRecord, out: Outbox) -> None:
        """The error policy of the queries topic: answer with an error when it can be traced."""
        self.errors += 1
        stage = "busy" if isinstance(exc, Busy) else "handle"
        stage = "parse" if isinstance(exc, EventError) else stage
        ERRORS.labels(stage).inc()
        ANSWERED.labels("unknown", "error").inc()
        log.warning("refused query at %s/%d@%d: %s", record.topic, record.partition,
                    record.offset, _one_line(exc))  # fmt: skip
        traced = _trace(record.value, self.settings)
        if traced is not None:
            query_id, tenant, topic = traced
            reply = _Reply(out, topic, query_id, tenant, 1)
            what = "busy" if isinstance(exc, Busy) else "malformed query"
            reply.finish("error", error=f"{what}: {public_message(exc)}")

    def run(self, stop: threading.Event) -> None:
        """Serve queries until `stop` is set; in-flight answers finish and are committed."""
        s = self.settings
        follower_thread = None
        if self.follower is not None:
            follower_thread = threading.Thread(
                target=self.follower.run, args=(stop,), name="headwater-adapters", daemon=True
            )
            follower_thread.start()
        loop: PoolLoop[Asked] = PoolLoop(
            s, [s.queries_topic], group=s.query_group, client_id="headwater-answerer",
            decode=self._decode, handle=self._handle, on_error=self._refuse,
            workers=s.query_workers, producer=self.producer,
            on_assigned=lambda _: self.ready.set(),
            key=lambda asked: asked.tenant, per_key=s.query_tenant_workers,
            key_backlog=s.query_tenant_backlog,
        )  # fmt: skip
        mode = "generated" if self.generator else "extractive"
        log.info("answerer consuming %s as %s (%d workers, %s answers)", s.queries_topic,
                 s.query_group, s.query_workers, mode)  # fmt: skip
        try:
            loop.run(stop)
        finally:
            if follower_thread is not None:
                follower_thread.join(timeout=5)


def reply_topic_for(settings: Settings, requested: str | None) -> str:
    """The answers topic, or a caller's own `<answers topic>.<suffix>` topic; nothing else.

    Queries must not be able to write answer events into documents or other topics.
    """
    base = settings.answers_topic
    if requested and (requested == base or requested.startswith(base + ".")):
        return requested
    return base


def _trace(raw: bytes | None, settings: Settings) -> tuple[str, str, str] | None:
    """query_id, tenant and reply topic of a malformed query, when they can be read at all."""
    try:
        data = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    query_id = data.get("query_id")
    if not isinstance(query_id, str) or not 1 <= len(query_id) <= 64:
        return None
    tenant = data.get("tenant")
    if not isinstance(tenant, str) or not re.match(TENANT_RE, tenant):
        tenant = settings.default_tenant
    reply = data.get("reply_topic")
    return query_id, tenant, reply_topic_for(settings, reply if isinstance(reply, str) else None)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
