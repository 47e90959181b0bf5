"""CLI commands for queries: `headwater ask|serve|answerer|standing|subscribe`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from headwater.runtime.shutdown import stop_on_signals
from headwater.settings import Settings
from headwater.threads import use_threads
from service.commands import remote
from service.running import add_service_args, service, with_args

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    p = sub.add_parser("ask", help="ask a question; the answer streams, then its sources")
    p.add_argument("question")
    p.add_argument("--tenant", help="tenant to ask in (default: HEADWATER_DEFAULT_TENANT)")
    p.add_argument("--search-only", action="store_true", help="retrieve passages, no answer")
    p.add_argument("--k", type=int, default=5, help="passages to retrieve (1-100)")
    p.add_argument("--token", help="freshness token: see writes up to it")
    p.add_argument("--timeout", type=float, help="seconds to wait for each answer event")
    p.add_argument("--json", action="store_true", help="print every answer event as JSON")
    remote.add_url(p)
    p.set_defaults(func=_ask)

    p = sub.add_parser("serve", help="run the HTTP API (documents, search, ask, subscriptions)")
    p.add_argument("--port", type=int, help="port (default: HEADWATER_API_PORT)")
    add_service_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("answerer", help="run the query consumer (retrieval + generation)")
    add_service_args(p)
    p.set_defaults(func=_answerer)

    p = sub.add_parser("standing", help="run the standing-query matcher (notifications)")
    add_service_args(p)
    p.set_defaults(func=_standing)

    p = sub.add_parser("subscribe", help="register a standing query and print its notifications")
    p.add_argument("query")
    p.add_argument("--tenant", help="tenant to watch (default: HEADWATER_DEFAULT_TENANT)")
    p.add_argument("--threshold", type=float, help="cosine similarity to match (-1..1)")
    p.add_argument("--max", type=int, help="exit after this many notifications")
    p.add_argument("--idle", type=float, help="exit after this many seconds without one")
    p.add_argument("--json", action="store_true", help="print notifications as JSON")
    remote.add_url(p)
    p.set_defaults(func=_subscribe)


def _fail(message: object) -> int:
    print(f"headwater: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


# -- ask -----------------------------------------------------------------------------------------


def _ask(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.replies import QueryClient
    from headwater.errors import Forbidden, InvalidInput, QueryError

    if args.url:
        return remote.ask(args)
    client = QueryClient(settings)
    hits: list[Any] = []
    answered = False
    try:
        stream = client.ask(
            args.question,
            tenant=args.tenant,
            k=args.k,
            token=args.token,
            mode="search" if args.search_only else "answer",
            timeout=args.timeout,
        )
        for event in stream:
            if args.json:
                print(event.model_dump_json(), flush=True)
            elif event.kind == "hits":
                hits = list(event.hits or [])
            elif event.kind == "token":
                answered = True
                sys.stdout.write(event.text or "")
                sys.stdout.flush()
            elif event.kind == "error":
                if answered:
                    print()
                return _fail(event.error)
    except (QueryError, InvalidInput, Forbidden) as exc:
        return _fail(exc)
    finally:
        client.close()
    if not args.json:
        remote.show_sources(hits, answered=answered, snippets=args.search_only)
    return 0


# -- long-running services -------------------------------------------------------------------


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.gateway import build_app, guard_api, serve

    settings = with_args(settings, args)
    if args.port is not None:
        settings = settings.model_copy(update={"api_port": args.port})
    if not args.insecure:
        guard_api(settings, insecure=False)  # before anything is loaded: fail fast
    use_threads(settings, "embed")  # searches embed the question
    with service(settings, insecure=args.insecure, group=False) as health:
        serve(build_app(settings, health=health), settings, insecure=args.insecure)
    return 0


def _answerer(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.answerer import Answerer
    from consumers.generation import load_generator
    from index.index import open_index

    settings = with_args(settings, args)
    stop = stop_on_signals()
    use_threads(settings, "generate")
    with service(settings, insecure=args.insecure) as health, open_index(settings) as index:
        answerer = Answerer(settings, index.searcher, load_generator(settings))
        if answerer.follower is not None:
            health.ready_check("adapters", answerer.follower.readiness)
        answerer.run(stop)
    return 0


def _standing(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.standing import StandingMatcher
    from index.index import open_index

    settings = with_args(settings, args)
    stop = stop_on_signals()
    use_threads(settings, "embed")
    with service(settings, insecure=args.insecure), open_index(settings) as index:
        StandingMatcher(settings, index.embedder, index.store).run(stop)
    return 0


def _subscribe(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.subscriptions import SubscriptionClient
    from headwater.errors import Forbidden, InvalidInput, QueryError

    if args.url:
        return remote.subscribe(args, _print_notification)
    subs = SubscriptionClient(settings)
    try:
        sub = subs.build(args.query, tenant=args.tenant, threshold=args.threshold)
        # Follow notifications before registering, so not even the first one can be missed.
        with subs.notifications(sub) as stream:
            subs.register(sub)
            print(
                f"subscription {sub.subscription_id} (tenant {sub.tenant}, threshold "
                f"{sub.threshold:g}); waiting for notifications, Ctrl-C to stop",
                flush=True,
            )
            seen, quiet = 0, 0.0
            while args.max is None or seen < args.max:
                batch = stream.poll(1.0)
                quiet = 0.0 if batch else quiet + 1.0
                for _, note in batch:
                    _print_notification(note, args.json)
                    seen += 1
                if args.idle is not None and quiet >= args.idle:
                    break
    except (QueryError, InvalidInput, Forbidden) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        subs.close()
    return 0


def _print_notification(note: Any, as_json: bool) -> None:
    if as_json:
        print(note.model_dump_json(), flush=True)
        return
    print(
        f"{note.ts:%H:%M:%S} {note.op} {note.doc_id} v{note.version}: "
        f"{len(note.matched)} matching, {len(note.removed)} gone"
    )
    for c in note.matched:
        print(f"  + {c.score:.3f} {' '.join(c.text.split())[:120]}")
    for c in note.removed:
        print(f"  - {' '.join(c.text.split())[:120]}")
    sys.stdout.flush()
