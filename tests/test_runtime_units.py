"""The consumer runtime's pure logic: offsets in hand, backoff, the outbox, dead-letter fallback."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from headwater.errors import Cancelled, StopConsumer, StoreError
from headwater.runtime.deadletter import DeadLetters, stage_of
from headwater.runtime.outbox import Outbox
from headwater.runtime.pool import Offsets
from headwater.runtime.retry import Backoff, retrying, transient


def test_offsets_commit_only_below_unfinished_records():
    tp = TopicPartition("q", 0)
    o = Offsets()
    for off in (5, 6, 7):
        o.start(tp, off)
    o.finish(tp, 6)
    assert o.committable() == {tp: 5}
    o.committed({tp: 5})
    assert o.committable() == {}
    o.finish(tp, 5)
    assert o.committable() == {tp: 7} and o.in_flight == 1
    o.finish(tp, 7, handled=False)  # cancelled by shutdown: handle it again later
    o.committed({tp: 7})
    assert o.committable() == {}
    o.forget({tp})  # revoked: a late finish of a record of a lost partition changes nothing
    o.finish(tp, 8)
    assert o.committable() == {}


def test_backoff_grows_to_its_cap_with_jitter():
    delays = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.5).delays(random.Random(1))
    got = [next(delays) for _ in range(8)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c * 0.5 <= d <= c for d, c in zip(got, caps, strict=True))
    assert len(set(got)) == len(got)  # jittered: members do not retry in lockstep


def test_retrying_retries_transient_errors_only_and_stops_on_stop():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise StoreError("Milvus away")
        return "ok"

    fast = Backoff(initial=0.001, maximum=0.002)
    assert retrying(flaky, stop=threading.Event(), what="x", backoff=fast) == "ok"
    assert len(calls) == 3
    with pytest.raises(ValueError):
        retrying(lambda: int("x"), stop=threading.Event(), what="x", backoff=fast)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        retrying(lambda: (_ for _ in ()).throw(StoreError("down")), stop=stop, what="x")
    assert transient(KafkaTimeoutError()) and not transient(MessageSizeTooLargeError())


class _Future:
    def __init__(self, error=None):
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error
        return SimpleNamespace(partition=0, offset=0)


class ScriptedProducer:
    """Answers each send with the next scripted outcome (None: acknowledged)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.sent = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append((topic, key, value, dict(headers or [])))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome == "raise":
            raise MessageSizeTooLargeError("too large for max_request_size")
        return _Future(outcome)


def record(offset=7, value=b"v" * 100):
    return SimpleNamespace(topic="docs", partition=2, offset=offset, key=b"k", value=value,
                           timestamp=0, headers=[])  # fmt: skip


def test_outbox_reports_final_refusals_by_origin_and_resends_transient_ones():
    producer = ScriptedProducer(None, MessageSizeTooLargeError("too big"), KafkaTimeoutError())
    out = Outbox(producer)
    first, second, third = record(1), record(2), record(3)
    out.send("changes", b"a", origin=first)
    out.send("changes", b"b", origin=second)
    out.send("changes", b"c", origin=third)
    with pytest.raises(KafkaTimeoutError):  # transient: raised after waiting for all
        out.settle()
    refused = out.settle()  # the timed-out record is sent again and now acknowledged
    assert [(r.offset, type(e).__name__) for r, e in refused] == [(2, "MessageSizeTooLargeError")]
    assert [v for _, _, v, _ in producer.sent] == [b"a", b"b", b"c", b"c"]
    assert out.settle() == []


def test_a_refused_dead_letter_becomes_a_reference_and_a_refused_reference_stops():
    producer = ScriptedProducer("raise")  # the original is over the producer's limit
    out = Outbox(producer)
    DeadLetters("docs.dlq")(ValueError("bad"), record(value=b"x" * 10_000), out)
    assert out.settle() == []
    _original, (_, key, value, ref) = producer.sent
    assert value is None and key == b"k" and ref["truncated"] == b"true"
    assert ref["source_offset"] == b"7" and ref["source_topic"] == b"docs"
    assert b"MessageSizeTooLarge" in ref["refused"] and ref["error"] == b"ValueError: bad"
    out = Outbox(ScriptedProducer("raise", "raise"))
    DeadLetters("docs.dlq")(ValueError("bad"), record(), out)
    with pytest.raises(StopConsumer):
        out.settle()


def test_stage_names():
    from headwater.errors import EmbedderError, EventError, ProduceFailed

    errors = (EventError("x"), EmbedderError("x"), ProduceFailed("x"), RuntimeError())
    assert [stage_of(e) for e in errors] == ["parse", "embed", "produce", "handle"]
