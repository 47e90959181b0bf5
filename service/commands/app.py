"""`headwater up` (everything in one process) and `headwater demo` (the guided main job)."""

from __future__ import annotations

import argparse

from headwater.settings import Settings
from service.running import add_service_args, with_args


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="index a tldr sample, search it, edit, delete, answer")
    p.add_argument("--limit", type=int, default=800, help="corpus records to publish")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "up", help="run indexer, query consumer, trainer scheduler and HTTP gateway in one process"
    )
    p.add_argument("--no-trainer", action="store_true", help="do not schedule adapter refreshes")
    add_service_args(p)
    p.set_defaults(func=_up)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(settings, limit=args.limit)


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from service.up import run_up

    return run_up(with_args(settings, args), trainer=not args.no_trainer, insecure=args.insecure)
