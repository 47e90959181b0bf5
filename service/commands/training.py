"""CLI commands for retraining: `example add`, `drift`, `train`, `trainer`, `adapters`.

Every tenant has its own drift and adapters; `--tenant` picks one (`_house` is the shared
house-style adapter).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from headwater.runtime.shutdown import stop_on_signals
from headwater.settings import Settings
from service.running import add_service_args, service, with_args


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    ex = sub.add_parser("example", help="style/behavior examples for the adapter")
    ex_sub = ex.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = ex_sub.add_parser("add", help="publish examples on the examples topic")
    src = add.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message")
    src.add_argument("--file", type=Path, help="JSONL of {prompt, response[, tenant, weight]}")
    add.add_argument("--response", help="the answer in the wanted style (with --prompt)")
    add.add_argument("--tenant", help="tenant (default: settings.default_tenant)")
    add.add_argument("--weight", type=float, default=1.0, help="sampling weight (default 1)")
    add.add_argument("--shared", action="store_true", help="teach the shared house-style adapter")
    add.set_defaults(func=_clear_errors(_example_add))

    drift = sub.add_parser("drift", help="each tenant's drift since its adapter, and the queue")
    drift.add_argument("--tenant", help="one tenant (or _house)")
    drift.add_argument("--json", action="store_true", help="a JSON object")
    drift.set_defaults(func=_clear_errors(_drift))

    train = sub.add_parser("train", help="check the retraining policy once, or force a run")
    train.add_argument("--now", action="store_true", help="run now, whatever the policy says")
    train.add_argument("--tenant", help="whose adapter --now trains (default: default tenant)")
    train.set_defaults(func=_clear_errors(_train))

    trainer = sub.add_parser("trainer", help="run the retraining scheduler until SIGTERM")
    add_service_args(trainer)
    trainer.set_defaults(func=_clear_errors(_trainer))

    adapters = sub.add_parser("adapters", help="adapter versions: list, promote, rollback")
    ad_sub = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = ad_sub.add_parser("list", help="every trained version and the current one")
    ls.add_argument("--tenant", help="one tenant (or _house): its versions and pending drift")
    ls.add_argument("--json", action="store_true", help='{"tenant", "versions", "current", ...}')
    ls.set_defaults(func=_clear_errors(_adapters_list))
    promote = ad_sub.add_parser("promote", help="make a finished version current and announce it")
    promote.add_argument("version")
    promote.add_argument("--tenant", help="whose adapter (default: settings.default_tenant)")
    promote.set_defaults(func=_clear_errors(_adapters_promote))
    rollback = ad_sub.add_parser("rollback", help="back to the previously promoted version")
    rollback.add_argument("--tenant", help="whose adapter (default: settings.default_tenant)")
    rollback.set_defaults(func=_clear_errors(_adapters_rollback))


def scope_of(settings: Settings, tenant: str | None) -> str:
    """A known tenant (default: the default tenant) or `_house`; UnknownTenantError otherwise."""
    from headwater.errors import UnknownTenantError
    from models.adapters import HOUSE, valid_scope

    scope = tenant or settings.default_tenant
    if scope != HOUSE and not (valid_scope(scope) and settings.tenant_known(scope)):
        raise UnknownTenantError(f"unknown tenant {scope[:64]!r}")
    return scope


def _fail(message: str) -> int:
    print(f"headwater: {message}", file=sys.stderr)
    return 2


def _clear_errors(func: Callable[[Settings, argparse.Namespace], int]) -> Callable:
    """Bad input, a busy trainer or an unreachable broker: one line on stderr, exit code 2."""

    @functools.wraps(func)
    def run(settings: Settings, args: argparse.Namespace) -> int:
        from kafka.errors import KafkaError

        from headwater.errors import HeadwaterError

        try:
            return func(settings, args)
        except HeadwaterError as exc:
            return _fail(str(exc))
        except KafkaError as exc:
            return _fail(f"Kafka at {settings.bootstrap}: {exc}")

    return run


def _example_add(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.examples import make_example, publish_examples, read_examples_file

    if args.file is not None:
        if args.response is not None:
            return _fail("--response goes with --prompt, not --file")
        examples = read_examples_file(settings, args.file)
    else:
        if args.response is None:
            return _fail("--prompt needs --response")
        examples = [
            make_example(
                settings, args.prompt, args.response, args.tenant, args.weight, shared=args.shared
            )
        ]
    n = publish_examples(settings, examples)
    print(f"published {n} example{'s' * (n != 1)} on {settings.examples_topic}")
    return 0


def _drift(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.status import drift_report

    scope = scope_of(settings, args.tenant) if args.tenant else None
    report = drift_report(settings, scope)
    if args.json:
        print(json.dumps(report))
        return 0
    rows = {scope: report} if scope else report["tenants"]
    console = Console()
    for name, fig in rows.items():
        position = fig["queue_position"]
        turn = "" if position is None else f", #{position} in the queue"
        table = Table(title=f"{name}: drift since its adapter ({fig['reason']}{turn})")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, value in fig.items():
            figure = isinstance(value, int | float) and not isinstance(value, bool)
            if figure and key not in ("queue_position", "queue_length"):
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
    if not rows:
        console.print("no drift yet")
    fresh, sched = report["freshness"], report["scheduler"]
    console.print(f"indexer lag {fresh['index_lag']} (max {fresh['max_index_lag']})"
                  + (f": {fresh['hold']}" if fresh["hold"] else ""), markup=False)  # fmt: skip
    if sched.get("checked"):
        console.print(f"scheduler ({sched['checked'][:19]}): {sched['action']} {sched['reason']}",
                      markup=False)  # fmt: skip
    return 0


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.scheduler import TrainerService

    console = Console(stderr=True)
    service = TrainerService(settings, on_line=lambda line: console.print(line, markup=False))
    try:
        if args.now:
            scope = scope_of(settings, args.tenant)
            figures = service.tracker.update()
            outcome = service.train(scope, "forced (headwater train --now)", figures.get(scope))
        else:
            if args.tenant:
                return _fail("--tenant goes with --now (a check plans every tenant)")
            outcome = service.check()
    finally:
        service.backlog.close()
    if outcome is None:
        decision = service.last_decision
        print(f"no run: {decision.reason if decision else 'policy says wait'}")
        return 0
    verb = "promoted" if outcome.promoted else outcome.status
    print(f"{outcome.tenant}/{outcome.version} {verb}: {outcome.reason}")
    return 0 if outcome.status != "failed" else 1


def _trainer(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.scheduler import TrainerService

    settings = with_args(settings, args)
    stop = stop_on_signals()
    trainer = TrainerService(settings)
    with service(settings, insecure=args.insecure, group=False,
                 live={"scheduler": trainer.scheduling}):  # fmt: skip
        trainer.start()
        print(
            f"trainer running: checks every {settings.train_check_interval_s:.0f} s"
            + (f" and on '{settings.train_cron}'" if settings.train_cron else ""),
            file=sys.stderr,
        )
        try:
            while not stop.wait(1.0):
                pass
        finally:
            trainer.stop()
    return 0


def _adapters_list(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.registry import Registry
    from trainer.status import adapters_report

    if args.tenant:
        listings = [adapters_report(settings, scope_of(settings, args.tenant))]
    else:
        listings = [Registry(settings, s).listing() for s in Registry.scopes(settings)]
    if args.json:
        print(json.dumps(listings[0] if args.tenant else {"tenants": listings}))
        return 0
    console = Console()
    for listing in listings:
        _print_listing(console, listing)
    if not listings:
        console.print("no adapters yet")
    return 0


def _print_listing(console: Console, listing: dict) -> None:
    current = listing["current"] or "none"
    table = Table(title=f"{listing['tenant']}: adapters (current: {current})")
    for col in ("version", "status", "created", "adherence", "loss"):
        table.add_column(col, no_wrap=True)
    for v in listing["versions"]:
        after = (v.get("metrics") or {}).get("after") or {}
        adherence, loss = after.get("adherence"), after.get("loss")
        table.add_row(
            ("* " if v["current"] else "") + v["version"],
            v["status"],
            v["created"][:16],
            "" if adherence is None else f"{adherence:.2f}",
            "" if loss is None else f"{loss:.3f}",
        )
    console.print(table)
    for v in listing["versions"]:
        if v["reason"]:
            console.print(f"{v['version']}: {v['reason']}", markup=False, soft_wrap=True)
    pending = listing.get("pending")
    if pending:
        where = pending["queue_position"]
        console.print(f"pending: {pending['examples']} examples, {pending['changed_docs']} "
                      f"changed documents; {pending['reason']}"
                      + (f" (#{where} in the queue)" if where else ""), markup=False)  # fmt: skip


def _adapters_promote(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.registry import Registry

    scope = scope_of(settings, args.tenant)
    Registry(settings, scope).promote(args.version)
    print(f"{scope}: current adapter {args.version}")
    return 0


def _adapters_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from trainer.registry import Registry

    scope = scope_of(settings, args.tenant)
    current, _ = Registry(settings, scope).rollback()
    print(f"{scope}: current adapter {current or 'none'}")
    return 0
