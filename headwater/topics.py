"""headwater's topics: their names, shapes and idempotent creation."""

from __future__ import annotations

from dataclasses import dataclass

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from headwater.runtime.clients import admin, max_record_bytes
from headwater.settings import Settings


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
            config["max.message.bytes"] = str(max_record_bytes(settings))
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
