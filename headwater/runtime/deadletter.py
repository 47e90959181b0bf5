"""Error policies for the consumer runtime: dead-letter, skip or stop.

A policy is called as `on_error(exc, record, out)` for an input record the loop cannot handle
(it does not parse, its document cannot be chunked or embedded, a record produced for it was
refused for good). Whatever it sends goes through the batch's outbox, so the record's offset is
committed only once the dead letter is acknowledged too. Dead-lettering never blocks: a dead
letter the broker refuses (too large, say) is replaced by a reference to the original record
(topic, partition, offset, reason), which always fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from prometheus_client import Counter

from headwater.errors import (
    ChunkerError,
    EmbedderError,
    EventError,
    HeadwaterError,
    ProduceFailed,
    StopConsumer,
)
from headwater.runtime.outbox import Outbox
from headwater.runtime.retry import one_line

log = logging.getLogger(__name__)

DLQ_EVENTS = Counter(
    "headwater_dlq_events_total", "Records sent to a dead-letter topic", ["topic", "stage"]
)
REASON_MAX = 4000

OnError = Callable[[Exception, ConsumerRecord, Outbox], None]


def stage_of(exc: BaseException) -> str:
    """Where handling failed, as recorded with a dead letter."""
    for cls, stage in (
        (EventError, "parse"),
        (ChunkerError, "chunk"),
        (EmbedderError, "embed"),
        (ProduceFailed, "produce"),
    ):
        if isinstance(exc, cls):
            return stage
    return "handle"


def reason_of(exc: BaseException) -> str:
    """The reason kept with a dead letter: our own errors say it; others carry their type."""
    if isinstance(exc, HeadwaterError):
        return " ".join(str(exc).split())[:REASON_MAX] or type(exc).__name__
    return one_line(exc, REASON_MAX)


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered record as read back from a dead-letter topic."""

    key: bytes | None
    value: bytes | None
    error: str
    stage: str
    topic: str
    partition: int
    offset: int
    truncated: bool = False

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> DeadLetter:
        headers = {k: v.decode(errors="replace") for k, v in record.headers or []}
        return cls(
            key=record.key,
            value=record.value,
            error=headers.get("error", ""),
            stage=headers.get("stage", ""),
            topic=headers.get("source_topic", ""),
            partition=int(headers.get("source_partition", "-1")),
            offset=int(headers.get("source_offset", "-1")),
            truncated=headers.get("truncated") == "true",
        )


class DeadLetters:
    """The dead-letter policy: the original key and value, with the reason in headers."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def __call__(self, exc: Exception, record: ConsumerRecord, out: Outbox) -> None:
        stage, reason = stage_of(exc), reason_of(exc)
        log.warning(
            "dead-lettering %s[%d]@%d (%s): %s",
            record.topic, record.partition, record.offset, stage, reason,
        )  # fmt: skip
        headers = _headers(record, stage, reason)

        def as_reference(refusal: KafkaError) -> None:
            log.error(
                "dead letter of %s[%d]@%d refused (%s); sending a reference instead",
                record.topic, record.partition, record.offset, one_line(refusal),
            )  # fmt: skip
            ref = [*headers, ("truncated", b"true"), ("refused", one_line(refusal).encode())]
            out.send(self.topic, None, key=_short(record.key), headers=ref,
                     on_refused=lambda final: _give_up(record, final))  # fmt: skip

        out.send(
            self.topic, record.value, key=record.key, headers=headers, origin=record,
            on_refused=as_reference,
        )  # fmt: skip
        DLQ_EVENTS.labels(self.topic, stage).inc()


def _headers(record: ConsumerRecord, stage: str, reason: str) -> list[tuple[str, bytes]]:
    return [
        ("error", reason.encode()),
        ("stage", stage.encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
        ("source_timestamp", str(record.timestamp).encode()),
    ]


def _short(key: bytes | None) -> bytes | None:
    return key if key is None or len(key) <= 1024 else key[:1024]


def _give_up(record: ConsumerRecord, refusal: KafkaError) -> None:
    # Even a reference was refused for good (an ACL, a missing topic): no safe way on.
    raise StopConsumer(
        f"cannot dead-letter {record.topic}[{record.partition}]@{record.offset}: "
        f"{one_line(refusal)}"
    )


def skip(exc: Exception, record: ConsumerRecord, out: Outbox) -> None:
    """The skip policy: log the record's reason and go on (for derived, replayable topics)."""
    log.warning(
        "skipping %s[%d]@%d (%s): %s",
        record.topic, record.partition, record.offset, stage_of(exc), reason_of(exc),
    )  # fmt: skip


def stop(exc: Exception, record: ConsumerRecord, out: Outbox) -> None:
    """The stop policy: nothing may be skipped; the loop stops with the reason."""
    raise StopConsumer(
        f"{record.topic}[{record.partition}]@{record.offset}: {reason_of(exc)}"
    ) from exc
