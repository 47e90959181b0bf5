"""`--url` mode of publish, delete, search, ask and subscribe: talk to a gateway over HTTP.

With `--url URL [--api-token T]` the commands need no Kafka and no Milvus access, only a running
`headwater serve`/`headwater up`; they go through `headwater.client.Client`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from headwater.client import Client
from headwater.errors import HeadwaterError, Timeout, Unavailable


def add_url(p: argparse.ArgumentParser) -> None:
    """The `--url`/`--api-token` options of a command that can run against a gateway."""
    p.add_argument("--url", help="talk to a headwater API at this URL instead of Kafka/Milvus")
    p.add_argument("--api-token", help="bearer token for --url (its tenant is bound to it)")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_token=args.api_token, tenant=getattr(args, "tenant", None))


def _fail(exc: BaseException) -> int:
    """One line on stderr; exit 1 for what may work later, 2 for what the caller must fix."""
    print(f"headwater: {' '.join(str(exc).split())}", file=sys.stderr)
    return 1 if isinstance(exc, Unavailable | Timeout) else 2


def publish(args: argparse.Namespace, text: str, metadata: dict[str, Any] | None) -> int:
    try:
        with _client(args) as hw:
            token = hw.publish(args.doc_id, text, metadata=metadata, version=args.version)
    except HeadwaterError as exc:
        return _fail(exc)
    return _report(args, str(token), f"published {args.doc_id}")


def delete(args: argparse.Namespace) -> int:
    try:
        with _client(args) as hw:
            token = hw.delete(args.doc_id, version=args.version)
    except HeadwaterError as exc:
        return _fail(exc)
    return _report(args, str(token), f"deleted {args.doc_id}")


def _report(args: argparse.Namespace, token: str, line: str) -> int:
    print(json.dumps({"token": token}) if args.json else f"{line}; token {token}")
    return 0


def search(args: argparse.Namespace) -> int:
    try:
        with _client(args) as hw:
            hits = hw.search(args.query, k=args.k, token=args.token or "")
    except HeadwaterError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"hits": [h.to_dict() for h in hits]}))
        return 0
    show_hits(hits)
    return 0


def show_hits(hits: list[Any]) -> None:
    """A search's hits for a person (the CLI's Kafka and --url modes print the same)."""
    if not hits:
        print("no results")
    for i, h in enumerate(hits, 1):
        where = f"{h.doc_id} (v{h.version})" + (f" § {h.section}" if h.section else "")
        print(f"[{i}] {h.score:.4f}  {where}")
        print("    " + " ".join(h.text.split())[:300])


def show_sources(hits: list[Any], *, answered: bool, snippets: bool = False) -> None:
    """What follows a streamed answer: its sources (with their text when only searching)."""
    if answered:
        print("\n")
    if not hits:
        print("No sources found.")
    for i, h in enumerate(hits, start=1):
        where = f", {h.section}" if h.section else ""
        print(f"[{i}] {h.doc_id} (v{h.version}{where}) score {h.score:.3f}")
        if snippets:
            snippet = " ".join(h.text.split())
            print(f"    {snippet[:300]}{'...' if len(snippet) > 300 else ''}")


def ask(args: argparse.Namespace) -> int:
    hits: list[Any] = []
    answered = False
    try:
        with _client(args) as hw:
            events = hw.ask(args.question, k=args.k, token=args.token or "",
                            search_only=args.search_only)  # fmt: skip
            for event in events:
                if args.json:
                    print(event.model_dump_json(), flush=True)
                elif event.kind == "hits":
                    hits = list(event.hits or [])
                elif event.kind == "token":
                    answered = True
                    sys.stdout.write(event.text or "")
                    sys.stdout.flush()
    except HeadwaterError as exc:
        if answered:
            print()
        return _fail(exc)
    if not args.json:
        show_sources(hits, answered=answered)
    return 0


def subscribe(args: argparse.Namespace, show: Any) -> int:
    try:
        with _client(args) as hw:
            sub = hw.subscribe(args.query, threshold=args.threshold)
            print(f"subscription {sub}; waiting for notifications, Ctrl-C to stop", flush=True)
            for note in hw.notifications(sub, limit=args.max, idle=args.idle):
                show(note, args.json)
    except HeadwaterError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        pass
    return 0
