"""headwater's topics: their names, shapes and idempotent creation.

Every service calls `ensure_topics` at start (and `headwater topics` does it once, for an init
job), so a fresh cluster with auto-creation off needs nothing else. Replication and
min.insync.replicas come from the settings, or from the cluster's defaults when unset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kafka.errors import InvalidReplicationFactorError, KafkaError, TopicAlreadyExistsError

from headwater.errors import KafkaUnavailable
from headwater.runtime.clients import admin, max_record_bytes
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)

# Compacted topics compact promptly, so they stay small snapshots; deletes stay for a day.
COMPACTED = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1",
             "delete.retention.ms": "86400000"}  # fmt: skip
# The adapters topic carries a few MB per version, retired with tombstones: the active segment
# is never cleaned, so it must roll (hourly) for a retired version to leave the disk.
ADAPTERS = {"segment.ms": "3600000"}
# The broker stamps queries: their expiry never trusts an asker's clock.
QUERIES = {"message.timestamp.type": "LogAppendTime"}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    partitions: int | None = None  # None: settings.partitions
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    return [
        # Compacted: the latest event per tenant/doc_id is kept, a replayable source of truth.
        TopicSpec(settings.documents_topic, compacted=True),
        TopicSpec(settings.dlq_topic),
        TopicSpec(settings.queries_topic, configs=QUERIES),
        TopicSpec(settings.answers_topic),
        TopicSpec(settings.examples_topic),
        # One partition: a version's chunks, its manifest and the announcement stay in order.
        TopicSpec(settings.adapters_topic, compacted=True, partitions=1, configs=ADAPTERS),
        TopicSpec(settings.changes_topic),
        TopicSpec(settings.notifications_topic),
        TopicSpec(settings.subscriptions_topic, compacted=True, partitions=1),
    ]


def topic_configs(settings: Settings, spec: TopicSpec) -> dict[str, str]:
    """The configs a new topic is created with."""
    config = dict(COMPACTED) if spec.compacted else {}
    # Room for the largest allowed document (plus its JSON envelope).
    config["max.message.bytes"] = str(max_record_bytes(settings))
    if settings.min_insync_replicas is not None:
        config["min.insync.replicas"] = str(settings.min_insync_replicas)
    return config | spec.configs


def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> list[str]:
    """Create any missing headwater topic; returns the names created.

    Idempotent and safe to race: every service does it at start. While the cluster has fewer
    live brokers than the replication factor (one still starting, say) it retries until
    `timeout_s`, then raises KafkaUnavailable.
    """
    deadline = time.monotonic() + timeout_s
    try:
        client = admin(settings, timeout_s=timeout_s)
    except KafkaError as exc:
        raise KafkaUnavailable(f"no Kafka at {settings.bootstrap}: {one_line(exc)}") from exc
    try:
        created: list[str] = []
        existing = set(client.list_topics())
        for spec in topic_specs(settings):
            if spec.name in existing:
                continue
            new = {
                spec.name: {
                    "num_partitions": spec.partitions or settings.partitions,
                    "replication_factor": settings.replication_factor or -1,  # -1: the default
                    "configs": topic_configs(settings, spec),
                }
            }
            while True:
                try:
                    client.create_topics(new)
                    created.append(spec.name)
                    break
                except TopicAlreadyExistsError:
                    break  # another process won the race
                except InvalidReplicationFactorError as exc:
                    if time.monotonic() > deadline:
                        raise KafkaUnavailable(
                            f"cannot create {spec.name}: {one_line(exc)} (replication factor "
                            f"{settings.replication_factor or 'default'}; are all brokers up?)"
                        ) from exc
                    time.sleep(1.0)
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot create topics: {one_line(exc)}") from exc
    finally:
        client.close()
