"""headwater's topics and the kafka-python clients that use them, built from Settings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import MemberState

from headwater.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    partitions: int | None = None  # None: settings.partitions


def topic_specs(settings: Settings) -> list[TopicSpec]:
    return [
        # Compacted: the latest event per tenant/doc_id is kept, a replayable source of truth.
        TopicSpec(settings.documents_topic, compacted=True),
        TopicSpec(settings.dlq_topic),
        TopicSpec(settings.queries_topic),
        TopicSpec(settings.answers_topic),
        TopicSpec(settings.examples_topic),
        TopicSpec(settings.adapters_topic, compacted=True, partitions=1),
        TopicSpec(settings.changes_topic),
        TopicSpec(settings.notifications_topic),
        TopicSpec(settings.subscriptions_topic, compacted=True, partitions=1),
    ]


def admin(settings: Settings, timeout_s: float = 30.0) -> KafkaAdminClient:
    """An admin client, retrying (bounded) while the broker is still coming up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(
                client_id="headwater-admin", request_timeout_ms=15_000,
                **settings.kafka_client_config(),
            )  # fmt: skip
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def ensure_topics(settings: Settings) -> list[str]:
    """Create any missing headwater topic; returns the names created."""
    client = admin(settings)
    try:
        existing = set(client.list_topics())
        new = []
        for spec in topic_specs(settings):
            if spec.name in existing:
                continue
            config = {"cleanup.policy": "compact"} if spec.compacted else {}
            # Room for the largest allowed document (plus its JSON envelope).
            config["max.message.bytes"] = str(max(2 * settings.max_text_bytes, 1_048_576) + 65_536)
            if spec.compacted:
                # Compact promptly so the topic stays a small snapshot; deletes stay a day.
                config |= {"min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "86400000"}
            new.append(
                NewTopic(
                    spec.name,
                    spec.partitions or settings.partitions,
                    settings.replication_factor,
                    topic_configs=config,
                )
            )
        created = []
        for topic in new:
            try:
                client.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        return created
    finally:
        client.close()


def producer(settings: Settings, **overrides: object) -> KafkaProducer:
    """An idempotent, acks=all producer: an acknowledged event is on the broker."""
    cfg: dict[str, object] = {
        "acks": "all",
        "enable_idempotence": True,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "linger_ms": 5,
        "max_request_size": max(2 * settings.max_text_bytes, 1_048_576) + 65_536,
        "client_id": "headwater-producer",
        **settings.kafka_client_config(),
    }
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def consumer(settings: Settings, *topics: str, **overrides: object) -> KafkaConsumer:
    """A consumer with manual commits (offsets are committed only after the work is done)."""
    cfg: dict[str, object] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": max(2 * settings.max_text_bytes, 1_048_576) + 65_536,
        "fetch_max_bytes": 64 * 1_048_576,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
        "max_poll_interval_ms": 600_000,
        **settings.kafka_client_config(),
    }
    cfg.update(overrides)
    return KafkaConsumer(*topics, **cfg)


def poll(consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None) -> dict:
    """`consumer.poll`, first reviving a rebalance that kafka-python 3.0.12 lost.

    When a rebalance is triggered by a metadata change (not by the coordinator) and the poll that
    started it times out, the finished join is never applied: heartbeats stay off, the broker
    evicts the member after session.timeout.ms and the consumer polls nothing, silently, forever.
    Asking for a rejoin in that state makes the next poll join again.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    rebalancing = getattr(coordinator, "state", None) == MemberState.REBALANCING
    if rebalancing and consumer.subscription() and not coordinator.need_rejoin():
        log.info("consumer group %s: rejoining after a lost rebalance", coordinator.group_id)
        coordinator.request_rejoin()
    return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)


def await_topic(consumer: Any, topic: str, timeout_s: float = 30.0) -> None:
    """Wait until the client's metadata knows `topic`, before the consumer joins its group.

    A member that joins while a just-created topic is missing from its metadata is assigned
    nothing, and only notices at the next metadata refresh (minutes later).
    """
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            log.warning("topic %s not found; consuming it once it exists", topic)
            return
        time.sleep(0.2)


__all__ = [
    "KafkaError",
    "TopicSpec",
    "admin",
    "await_topic",
    "consumer",
    "ensure_topics",
    "poll",
    "producer",
    "topic_specs",
]
