"""CLI commands for the local stack: `headwater kafka|milvus start|stop|status|fetch`, `topics`."""

from __future__ import annotations

import argparse

from headwater.settings import Settings
from headwater.topics import ensure_topics
from stack.broker import LocalBroker
from stack.liteserver import LiteServer


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("kafka", "the local Kafka (KRaft; one node, or a cluster with --brokers)"),
        ("milvus", "the local Milvus Lite server"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("action", choices=["start", "stop", "status", "fetch"])
        if name == "kafka":
            p.add_argument(
                "--brokers",
                type=int,
                choices=range(1, 10),
                metavar="N",
                help="nodes of the local cluster (default: HEADWATER_KAFKA_BROKERS, 1); node i "
                "listens on HEADWATER_KAFKA_PORT+2i",
            )
        p.set_defaults(func=_kafka if name == "kafka" else _milvus)

    p = sub.add_parser("topics", help="create every missing headwater topic (idempotent)")
    p.add_argument("--json", action="store_true", help="print {topic: created?} as JSON")
    p.set_defaults(func=_topics)


def _kafka(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.uses_local_kafka:
        # An external cluster: nothing to start; report where clients go.
        if args.action in ("start", "status"):
            print(settings.bootstrap)
        return 0
    if getattr(args, "brokers", None):
        settings = settings.model_copy(update={"kafka_brokers": args.brokers})
    broker = LocalBroker(settings)
    if args.action == "fetch":
        print(broker.fetch())
        return 0
    if args.action == "start":
        address = broker.start()
        ensure_topics(settings.model_copy(update={"kafka_bootstrap": address}))
        nodes = len(broker.nodes)
        print(f"Kafka {'broker' if nodes == 1 else f'cluster of {nodes} nodes'} running "
              f"(data in {broker.home})")  # fmt: skip
        print(address)
        return 0
    if args.action == "stop":
        print("stopped" if broker.stop() else "not running")
        return 0
    address = broker.status()
    if address is None:
        print("not running")
        return 1
    print(address)
    return 0


def _milvus(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.uses_local_milvus:
        if args.action in ("start", "status"):
            print(settings.milvus_address)
        return 0
    server = LiteServer(settings)
    if args.action == "fetch":
        return 0
    if args.action == "start":
        address = server.start()
        print(f"Milvus Lite server running (data in {server.home})")
        print(address)
        return 0
    if args.action == "stop":
        print("stopped" if server.stop() else "not running")
        return 0
    address = server.status()
    if address is None:
        print("not running")
        return 1
    print(address)
    return 0


def _topics(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from headwater.topics import topic_specs

    created = set(ensure_topics(settings))
    names = [spec.name for spec in topic_specs(settings)]
    if args.json:
        print(json.dumps({name: name in created for name in names}))
    else:
        for name in names:
            print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


def start_stack(settings: Settings) -> None:
    """Start whatever local services the settings call for and make sure topics exist."""
    if settings.uses_local_kafka:
        LocalBroker(settings).start()
    if settings.uses_local_milvus:
        LiteServer(settings).start()
    ensure_topics(settings)


def require_stack(settings: Settings) -> None:
    """Fail fast with a clear message when the local services a command needs are down."""
    from headwater.errors import StackError
    from stack.daemon import port_open

    if settings.uses_local_kafka and not port_open("127.0.0.1", settings.kafka_port):
        raise StackError(
            f"no Kafka broker at {settings.bootstrap}: run `headwater kafka start` (or "
            "`headwater up`), or set HEADWATER_KAFKA_BOOTSTRAP"
        )
    if settings.uses_local_milvus and not port_open("127.0.0.1", settings.milvus_port):
        raise StackError(
            f"no Milvus at {settings.milvus_address}: run `headwater milvus start` (or "
            "`headwater up`), or set HEADWATER_MILVUS_URI"
        )
