"""The dead-letter topic: events the indexer cannot apply, with their original bytes and why."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter

from headwater.settings import Settings

log = logging.getLogger(__name__)

DLQ_EVENTS = Counter(
    "headwater_dlq_events_total", "Events sent to the dead-letter topic", ["stage"]
)


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered event as read back from the DLQ topic."""

    key: bytes | None
    value: bytes | None
    error: str
    stage: str
    topic: str
    partition: int
    offset: int

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
        )


class DeadLetters:
    """Sends failed events to `settings.dlq_topic`; `flush()` before committing their offsets."""

    def __init__(self, settings: Settings, producer: KafkaProducer) -> None:
        self.topic = settings.dlq_topic
        self.producer = producer
        self._pending: list = []

    def send(self, record: ConsumerRecord, error: str, stage: str) -> None:
        log.warning(
            "dead-lettering %s[%d]@%d (%s): %s",
            record.topic, record.partition, record.offset, stage, error,
        )  # fmt: skip
        headers = [
            ("error", error[:4000].encode()),
            ("stage", stage.encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("source_timestamp", str(record.timestamp).encode()),
        ]
        self._pending.append(
            self.producer.send(self.topic, key=record.key, value=record.value, headers=headers)
        )
        DLQ_EVENTS.labels(stage).inc()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every dead letter is acknowledged (raises if the broker refused one)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.get(timeout=timeout)
