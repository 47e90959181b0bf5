"""The kafka-python clients headwater uses, built from Settings, and every workaround they need.

kafka-python is pinned exactly (pyproject.toml); each of its quirks headwater works around is
handled here and nowhere else:

- a rebalance lost after a timed-out poll leaves a member silently evicted (`poll` rejoins);
- a member that joins while a just-created topic is missing from its metadata is assigned
  nothing until the next metadata refresh, minutes later (`await_topic`);
- `KafkaProducer.flush()` does not raise for failed sends (the runtime's `Outbox` awaits every
  future instead);
- one record the broker refuses for good (over a topic's max.message.bytes, say) turns an
  idempotent producer fatal: every later send fails the same way. Loops produce derived records
  with `idempotent=False` (one request in flight keeps them in order; commit-after-ack makes
  them at-least-once anyway); an idempotent producer that went fatal is `broken()` and must be
  replaced;
- `send()` raises some errors synchronously (a record over `max_request_size`) and reports
  others through the future (`is_final` classifies both the same way).

This is the only module that constructs a `KafkaConsumer`, `KafkaProducer` or admin client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import BrokerResponseError, KafkaError
from kafka.partitioner.default import murmur2
from kafka.structs import MemberState

from headwater.settings import Settings

log = logging.getLogger(__name__)

# Room for the largest allowed document (plus its JSON envelope) in one record.
ENVELOPE_BYTES = 65_536


def max_record_bytes(settings: Settings) -> int:
    """The largest record headwater writes: a document event at `max_text_bytes`."""
    return max(2 * settings.max_text_bytes, 1_048_576) + ENVELOPE_BYTES


def producer(settings: Settings, *, idempotent: bool = True, **overrides: object) -> KafkaProducer:
    """An acks=all producer: an acknowledged record is on the broker.

    Idempotent by default (a retried send is appended once); `idempotent=False` for loops that
    produce derived records (see the module docstring).
    """
    cfg: dict[str, object] = {
        "acks": "all",
        "enable_idempotence": idempotent,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "linger_ms": 5,
        "max_request_size": max_record_bytes(settings),
        "client_id": "headwater-producer",
        **settings.kafka_client_config(),
    }
    if not idempotent:
        cfg["max_in_flight_requests_per_connection"] = 1  # retries cannot reorder records
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def broken(producer: KafkaProducer) -> bool:
    """Whether an idempotent producer went fatal and fails every send from now on."""
    manager = getattr(producer, "_transaction_manager", None)
    return bool(manager is not None and manager.has_fatal_error())


def consumer(settings: Settings, *topics: str, **overrides: object) -> KafkaConsumer:
    """A consumer with manual commits (offsets are committed only after the work is done)."""
    cfg: dict[str, object] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": max_record_bytes(settings),
        "fetch_max_bytes": 64 * 1_048_576,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
        "max_poll_interval_ms": 600_000,
        **settings.kafka_client_config(),
    }
    cfg.update(overrides)
    return KafkaConsumer(*topics, **cfg)


def admin(
    settings: Settings, timeout_s: float = 30.0, request_timeout_ms: int = 15_000
) -> KafkaAdminClient:
    """An admin client, retrying (bounded) while the broker is still coming up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(
                client_id="headwater-admin", request_timeout_ms=request_timeout_ms,
                # Its own default is 30 s whatever the caller's bound: a probe must not hang.
                bootstrap_timeout_ms=max(1000, int(timeout_s * 1000)),
                **settings.kafka_client_config(),
            )  # fmt: skip
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


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


def await_topic(consumer: Any, topic: str, timeout_s: float = 30.0) -> bool:
    """Wait until the client's metadata knows `topic`, before the consumer joins its group.

    A member that joins while a just-created topic is missing from its metadata is assigned
    nothing, and only notices at the next metadata refresh (minutes later).
    """
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            log.warning("topic %s not found; consuming it once it exists", topic)
            return False
        time.sleep(0.2)
    return True


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2, like the Java client)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def is_final(exc: BaseException) -> bool:
    """Whether the broker refused this very record for good (too large, invalid, unauthorized).

    Retrying such a record would block its partition forever; every other Kafka error (broker
    down, leader moving, timeouts) may go away by itself.
    """
    return isinstance(exc, BrokerResponseError) and not getattr(exc, "retriable", False)


__all__ = [
    "KafkaError",
    "admin",
    "await_topic",
    "broken",
    "consumer",
    "is_final",
    "max_record_bytes",
    "partition_for",
    "poll",
    "producer",
]
