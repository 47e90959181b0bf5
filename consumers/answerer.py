"""The query consumer: retrieval, then a streamed answer, as events on the reply topic.

A consumer-group member on the queries topic. Each query gets, keyed by its query_id (so one
answer stays on one partition, in order): `hits`, then `token` batches (answer mode), then
`done` with timings, or `error`. A few queries are answered at once by a small pool (search-only
queries don't wait behind generations); a partition's offset is committed only past queries
whose final event the broker acknowledged, so a crash re-answers rather than drops a query.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Histogram

from consumers.generation import AdapterFollower, Generator, extractive_answer
from headwater.settings import Settings
from headwater.topics import await_topic, poll
from headwater.topics import consumer as make_consumer
from headwater.topics import producer as make_producer
from producers.events import TENANT_RE, AnswerEvent, Citation, EventError, QueryEvent, parse_query

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
LOST = "lost"  # the final event could not be published: the query must be answered again


class Hit(Protocol):
    doc_id: str
    version: int
    chunk_id: str
    score: float
    text: str
    section: str


class Search(Protocol):
    def search(
        self, query: str, *, tenant: str, k: int = 5, token: str | None = None
    ) -> Sequence[Hit]: ...


def build_prompt(question: str, hits: Sequence[Hit], max_chars: int = 6000) -> list[dict[str, str]]:
    """System message, the numbered passages (within `max_chars`), then the question."""
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
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Passages:\n\n{passages}\n\nQuestion: {question}"},
    ]


def citations(hits: Iterable[Hit]) -> list[Citation]:
    return [
        Citation(
            doc_id=h.doc_id,
            version=h.version,
            chunk_id=h.chunk_id,
            score=float(h.score),
            text=h.text,
            section=h.section or "",
        )
        for h in hits
    ]


class _Reply:
    """The events of one answer: numbering, token batching, and the final acknowledgement."""

    def __init__(self, producer: Any, topic: str, query_id: str, tenant: str, batch: int) -> None:
        self.producer = producer
        self.topic = topic
        self.query_id = query_id
        self.tenant = tenant
        self.batch = batch
        self.seq = 0
        self._pieces: list[str] = []
        self._last_flush = time.monotonic()

    def send(self, kind: str, **fields: Any) -> Any:
        event = AnswerEvent(
            query_id=self.query_id, tenant=self.tenant, kind=kind, seq=self.seq, **fields
        )
        self.seq += 1
        return self.producer.send(self.topic, key=self.query_id.encode(), value=event.to_bytes())

    def token(self, piece: str) -> None:
        self._pieces.append(piece)
        if len(self._pieces) >= self.batch or time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush_tokens()

    def flush_tokens(self) -> None:
        if self._pieces:
            self.send("token", text="".join(self._pieces))
            self._pieces = []
        self._last_flush = time.monotonic()

    def finish(self, kind: str, timeout_s: float = 30.0, **fields: Any) -> None:
        """Send `done`/`error` and wait until the broker has it (and so every earlier event)."""
        if kind == "done":
            self.flush_tokens()
        else:
            self._pieces = []
        self.send(kind, **fields).get(timeout=timeout_s)


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
        self._producer = producer
        self._owns_producer = producer is None
        self.answered = 0  # per instance; the prometheus counters are process-wide
        self.errors = 0
        self.ready = threading.Event()  # set once the consumer has its partitions

    @property
    def producer(self) -> Any:
        if self._producer is None:
            self._producer = make_producer(self.settings, client_id="headwater-answerer")
        return self._producer

    # -- one query -----------------------------------------------------------------------------
    def answer(self, query: QueryEvent, received: float | None = None) -> str:
        """Publish the whole answer of one query; returns "done", "error" or LOST (unsent)."""
        t0 = received if received is not None else time.monotonic()
        reply = _Reply(
            self.producer,
            self._reply_topic(query),
            query.query_id,
            query.tenant,
            self.settings.answer_token_batch,
        )
        stage = "search"
        try:
            if not self.settings.tenant_known(query.tenant):
                raise EventError(f"unknown tenant {query.tenant!r}")
            hits = list(
                self.searcher.search(query.text, tenant=query.tenant, k=query.k, token=query.token)
            )
            retrieve_s = time.monotonic() - t0
            RETRIEVE.observe(retrieve_s)
            reply.send("hits", hits=citations(hits))
            timing = {"retrieve_ms": round(retrieve_s * 1000, 2)}
            adapter = None
            if query.mode == "answer":
                stage = "generate"
                adapter, first = self._stream_answer(query, hits, reply)
                if first is not None:
                    timing["first_token_ms"] = round((first - t0) * 1000, 2)
                    FIRST_TOKEN.observe(first - t0)
            timing["total_ms"] = round((time.monotonic() - t0) * 1000, 2)
            stage = "publish"
            reply.finish("done", timing=timing, adapter_version=adapter)
        except Exception as exc:
            reason = _one_line(exc)
            log.warning("query %s failed in %s: %s", query.query_id, stage, reason)
            self.errors += 1
            ERRORS.labels(stage).inc()
            ANSWERED.labels(query.mode, "error").inc()
            return "error" if self._send_error(reply, reason) else LOST
        self.answered += 1
        ANSWERED.labels(query.mode, "done").inc()
        LATENCY.labels(query.mode).observe(time.monotonic() - t0)
        return "done"

    def _stream_answer(
        self, query: QueryEvent, hits: list[Hit], reply: _Reply
    ) -> tuple[str | None, float | None]:
        first: float | None = None
        if not hits:
            reply.token(NO_PASSAGES)
            return None, time.monotonic()
        if self.generator is None:
            pieces: Iterable[str] = extractive_answer([h.text for h in hits])
            adapter = None
        else:
            prompt = build_prompt(query.text, hits, self.settings.prompt_max_chars)
            generation = self.generator.stream(prompt)
            pieces, adapter = generation, generation.adapter
        try:
            for piece in pieces:
                if not piece:
                    continue
                if first is None:
                    first = time.monotonic()
                reply.token(piece)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # stops the model when publishing failed mid-answer
        return adapter, first

    def _send_error(self, reply: _Reply, reason: str) -> bool:
        try:
            reply.finish("error", error=reason)
            return True
        except Exception as exc:  # the broker is gone too: the query is redelivered later
            log.error("could not publish the error of query %s: %s", reply.query_id, exc)
            return False

    def _reply_topic(self, query: QueryEvent) -> str:
        return reply_topic_for(self.settings, query.reply_topic)

    def handle(self, record: ConsumerRecord) -> str:
        """Answer one raw record; malformed ones get an error event when they can be traced.

        Returns the final kind sent ("done" or "error"), or LOST when it could not be sent.
        """
        received = time.monotonic()
        try:
            query = parse_query(record.value)
        except EventError as exc:
            self.errors += 1
            ERRORS.labels("parse").inc()
            ANSWERED.labels("unknown", "error").inc()
            log.warning(
                "malformed query at %s/%d@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            traced = _trace(record.value, self.settings)
            if traced is not None:
                query_id, tenant, topic = traced
                reply = _Reply(self.producer, topic, query_id, tenant, 1)
                if not self._send_error(reply, f"malformed query: {exc}"):
                    return LOST
            return "error"
        return self.answer(query, received)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve queries until `stop` is set; in-flight answers finish and are committed."""
        s = self.settings
        follower_thread = None
        if self.follower is not None:
            follower_thread = threading.Thread(
                target=self.follower.run, args=(stop,), name="headwater-adapters", daemon=True
            )
            follower_thread.start()
        consumer = make_consumer(
            s,
            s.queries_topic,
            group_id=s.query_group,
            client_id="headwater-answerer",
            max_poll_records=s.query_workers,
        )
        await_topic(consumer, s.queries_topic)
        offsets = _Offsets()
        finished: queue.SimpleQueue[tuple[TopicPartition, int, bool]] = queue.SimpleQueue()
        pool = ThreadPoolExecutor(s.query_workers, thread_name_prefix="headwater-query")
        limit = 2 * s.query_workers
        log.info(
            "answerer consuming %s as %s (%d workers, generator: %s)",
            s.queries_topic,
            s.query_group,
            s.query_workers,
            "yes" if self.generator else "extractive",
        )
        try:
            while not stop.is_set():
                if offsets.in_flight < limit:
                    try:
                        polled = poll(
                            consumer, timeout_ms=200, max_records=limit - offsets.in_flight
                        )
                    except KafkaError as exc:  # the broker is away: keep trying, don't die
                        log.warning("polling %s failed: %s", s.queries_topic, exc)
                        stop.wait(1.0)
                        continue
                    if consumer.assignment():
                        self.ready.set()
                    for tp, records in polled.items():
                        for record in records:
                            offsets.start(tp, record.offset)
                            pool.submit(self._work, record, tp, finished)
                else:
                    time.sleep(0.02)  # every worker is busy; answers finish within seconds
                self._commit(consumer, offsets, finished)
            pool.shutdown(wait=True)
            self._commit(consumer, offsets, finished)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            consumer.close(autocommit=False)
            if self._owns_producer and self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None
            if follower_thread is not None:
                follower_thread.join(timeout=5)

    def _work(
        self,
        record: ConsumerRecord,
        tp: TopicPartition,
        finished: queue.SimpleQueue[tuple[TopicPartition, int, bool]],
    ) -> None:
        outcome = LOST
        try:
            outcome = self.handle(record)
        except Exception:  # handle() reports its own errors; this is a bug guard for the loop
            log.exception("unexpected failure answering %s@%d", tp, record.offset)
        finally:
            finished.put((tp, record.offset, outcome != LOST))

    def _commit(
        self,
        consumer: Any,
        offsets: _Offsets,
        finished: queue.SimpleQueue[tuple[TopicPartition, int, bool]],
    ) -> None:
        changed = False
        while True:
            try:
                tp, offset, answered = finished.get_nowait()
            except queue.Empty:
                break
            offsets.finish(tp, offset, answered)
            changed = True
        if not changed:
            return
        commit = offsets.committable()
        if not commit:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in commit.items()})
            offsets.committed(commit)
        except KafkaError as exc:
            # Lost the partition in a rebalance: its next owner answers those queries again.
            log.warning("query offsets not committed (%s); they will be redelivered", exc)


class _Offsets:
    """Per partition: queries in flight and the offset below which all are answered."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._high: dict[TopicPartition, int] = {}  # next offset after the highest finished
        self._done: dict[TopicPartition, int] = {}  # last committed
        self._lost: dict[TopicPartition, int] = {}  # lowest unanswered: never commit past it
        self.in_flight = 0

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self.in_flight += 1

    def finish(self, tp: TopicPartition, offset: int, answered: bool = True) -> None:
        self._open.get(tp, set()).discard(offset)
        self.in_flight -= 1
        self._high[tp] = max(self._high.get(tp, 0), offset + 1)
        if not answered:
            self._lost[tp] = min(offset, self._lost.get(tp, offset))

    def committable(self) -> dict[TopicPartition, int]:
        out = {}
        for tp, high in self._high.items():
            still = self._open.get(tp)
            upto = min(still) if still else high
            upto = min(upto, self._lost.get(tp, upto))
            if upto > self._done.get(tp, -1):
                out[tp] = upto
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._done.update(offsets)


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
