"""Consumer lag and freshness age of this process's group members, computed at scrape time.

Prometheus reads these when it scrapes, not when a batch ends, so a stuck consumer (a batch
that never finishes, partitions paused while Milvus is away, a loop that died) shows a
freshness age that keeps rising and a lag that keeps growing instead of its last good values.
Lag is the broker's view: the end of each partition the member owns minus the group's committed
offset, read through one admin client per process (bounded; a scrape during a broker outage
reports the ages and no lag).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from kafka import KafkaAdminClient, OffsetSpec, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from headwater.runtime import clients
from headwater.runtime.member import GroupMember, members
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)


class LagCollector(Collector):
    """Per group member: freshness age, partitions owned, and lag per owned partition."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "headwater_freshness_lag_seconds",
            "Age of the oldest record a group member holds uncommitted (0: none in hand); "
            "rises while a consumer is stuck",
            labels=["group"],
        )
        owned = GaugeMetricFamily(
            "headwater_group_partitions", "Partitions a group member owns", labels=["group"]
        )
        lag = GaugeMetricFamily(
            "headwater_consumer_lag",
            "Records behind the end of a partition this member owns (the group's commit)",
            labels=["group", "topic", "partition"],
        )
        now_ms = time.time() * 1000
        for member in members():
            oldest = member.oldest_in_hand_ms()
            # Record timestamps come from the producers' clocks: only the metric depends on it.
            age.add_metric([member.group], 0.0 if oldest is None else max(0.0, (now_ms - oldest)
                                                                          / 1000))  # fmt: skip
            assignment = member.assignment()
            owned.add_metric([member.group], len(assignment))
            for tp, behind in self._lag(member, assignment).items():
                lag.add_metric([member.group, tp.topic, str(tp.partition)], behind)
        yield age
        yield owned
        yield lag

    def _lag(self, member: GroupMember, assignment: set[TopicPartition]) -> dict:
        if not assignment:
            return {}
        with self._lock:
            try:
                if self._admin is None:
                    self._admin = clients.admin(
                        self.settings, timeout_s=2.0, request_timeout_ms=4000
                    )
                committed = self._admin.list_group_offsets({member.group: list(assignment)})
                ends = self._admin.list_partition_offsets(
                    {tp: OffsetSpec.LATEST for tp in assignment}, timeout_ms=3000
                )
            except KafkaError as exc:
                log.debug("consumer lag of %s not read: %s", member.group, one_line(exc))
                self._close()
                return {}
        done = committed.get(member.group, {})
        out = {}
        for tp, end in ends.items():
            meta = done.get(tp)
            start = meta.offset if meta is not None and meta.offset >= 0 else 0
            out[tp] = max(0, end.offset - start)
        return out

    def _close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(KafkaError):
                admin.close()


_registered: dict[int, LagCollector] = {}


def register(settings: Settings, registry: CollectorRegistry = REGISTRY) -> LagCollector:
    """Add the collector to `registry` once per process (every service calls it at start)."""
    collector = _registered.get(id(registry))
    if collector is None:
        collector = _registered[id(registry)] = LagCollector(settings)
        registry.register(collector)
    return collector
