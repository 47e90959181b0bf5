"""CLI commands of the index: `headwater indexer`, `headwater search`, `headwater verify`."""

from __future__ import annotations

import argparse
import json
import sys

from headwater.errors import InvalidInput, Timeout
from headwater.runtime.shutdown import stop_on_signals
from headwater.settings import Settings
from headwater.threads import use_threads
from service.commands import remote
from service.commands.stack import require_stack
from service.running import add_service_args, service, with_args


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("indexer", help="run an indexer (a consumer-group member) until SIGTERM")
    add_service_args(p)
    p.set_defaults(func=_indexer)

    p = sub.add_parser("search", help="hybrid search of the fresh index")
    p.add_argument("query")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tenant", default=None)
    p.add_argument(
        "--fresh-as-of",
        dest="token",
        default=None,
        metavar="TOKEN",
        help="wait (bounded) until the index has applied this freshness token",
    )
    p.add_argument("--json", action="store_true")
    remote.add_url(p)
    p.set_defaults(func=_search)

    p = sub.add_parser("verify", help="compare the index with the documents topic (the truth)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--sample",
        type=int,
        default=20,
        metavar="N",
        help="also search N live documents by their own text (right tenant, right version)",
    )
    p.set_defaults(func=_verify)


def _indexer(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.indexer import Indexer

    settings = with_args(settings, args)
    require_stack(settings)
    use_threads(settings, "embed")
    stop = stop_on_signals()
    with service(settings, insecure=args.insecure):
        Indexer(settings).run(stop)
    return 0


def _search(settings: Settings, args: argparse.Namespace) -> int:
    from index.index import open_index

    if args.url:
        return remote.search(args)
    require_stack(settings)
    tenant = args.tenant or settings.default_tenant
    with open_index(settings) as index:
        try:
            hits = index.searcher.search(args.query, tenant=tenant, k=args.k, token=args.token)
        except (InvalidInput, Timeout) as exc:
            print(f"headwater: {exc}", file=sys.stderr)
            return 2
    if args.json:
        keys = ("doc_id", "version", "chunk_id", "score", "text")
        print(json.dumps({"hits": [{k: getattr(h, k) for k in keys} for h in hits]}))
        return 0
    remote.show_hits(hits)
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.truth import read_documents_topic
    from index.index import open_index
    from index.verify import check_search, expected_index, verify

    require_stack(settings)
    with open_index(settings) as index:
        expected = expected_index(read_documents_topic(settings), index.writer().chunk)
        report = verify(index.store, expected)
        if args.sample > 0:
            check_search(index.searcher, expected, report, sample=args.sample)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for name in (
            "docs",
            "chunks",
            "missing",
            "stale",
            "duplicates",
            "leaked",
            "deleted_present",
            "wrong_version",
            "searched",
            "search_wrong",
            "search_missed",
        ):
            print(f"{name:>16}: {getattr(report, name)}")
        for line in report.examples:
            print(f"  - {line}")
        print(
            "OK: the index equals the latest version of every document" if report.ok else "MISMATCH"
        )
    return 0 if report.ok else 1
