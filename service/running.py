"""What every long-running service does around its loop: topics, probes and metrics.

`headwater indexer|answerer|standing|trainer|serve|up` each refuse a port beyond loopback without
authentication, ensure the topics (a fresh cluster with auto-creation off needs nothing else),
then serve `/livez`, `/readyz` and `/metrics` on `HEADWATER_METRICS_PORT` (when set) while the
loop runs. Ready = Kafka and Milvus answer and every consumer-group member of the process owns
partitions or waits for an assignment.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator

from headwater.errors import KafkaUnavailable
from headwater.health import Check, Health, KafkaCheck, MilvusCheck, group_check, polling_check
from headwater.probes import ProbeServer, guard_exposure
from headwater.runtime import lag
from headwater.settings import Settings
from headwater.topics import ensure_topics

log = logging.getLogger(__name__)

TOPICS_WAIT_S = 120.0  # a service may start before the cluster it needs: wait, then give up


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The options every long-running service shares."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics, /livez and /readyz on this port (default: HEADWATER_METRICS_PORT)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without tokens (local play only; warns loudly)",
    )


def guard_metrics(settings: Settings, insecure: bool) -> None:
    if settings.metrics_port is not None:
        guard_exposure(settings.metrics_host, settings.metrics_token is not None,
                       "the metrics port", "HEADWATER_METRICS_TOKEN", insecure)  # fmt: skip


def with_args(settings: Settings, args: argparse.Namespace) -> Settings:
    port = getattr(args, "metrics_port", None)
    return settings if port is None else settings.model_copy(update={"metrics_port": port})


def ensure_topics_waiting(settings: Settings, wait_s: float = TOPICS_WAIT_S) -> None:
    """`ensure_topics`, waiting (bounded) for a cluster that is still coming up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ensure_topics(settings)
            return
        except KafkaUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("topics not ensured yet (%s); retrying", exc)
            time.sleep(2.0)


@contextlib.contextmanager
def service(
    settings: Settings,
    *,
    insecure: bool = False,
    milvus: bool = True,
    group: bool = True,
    ready: dict[str, Check] | None = None,
    live: dict[str, Check] | None = None,
) -> Iterator[Health]:
    """Topics ensured, probes and metrics served, for as long as the block runs."""
    guard_metrics(settings, insecure)
    ensure_topics_waiting(settings)
    lag.register(settings)
    health = Health()
    health.ready_check("kafka", KafkaCheck(settings))
    if milvus:
        health.ready_check("milvus", MilvusCheck(settings))
    if group:
        health.ready_check("group", group_check)
        health.live_check("polling", polling_check)
    for name, check in (ready or {}).items():
        health.ready_check(name, check)
    for name, check in (live or {}).items():
        health.live_check(name, check)
    server = None
    if settings.metrics_port is not None:
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        server = ProbeServer(health, host=settings.metrics_host, port=settings.metrics_port,
                             metrics_token=token).start()  # fmt: skip
    health.start()
    try:
        yield health
    finally:
        if server is not None:
            server.stop()
        health.stop()
