"""CLI commands for documents: `headwater publish|delete|replay|watch`.

They talk to a running stack (`headwater kafka start` or `headwater up`) and never start one;
an unreachable broker fails within the publisher's bounded timeouts. Bad input prints one line
`headwater: ...` and exits 2; a broker failure exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from consumers.truth import published_by
from headwater.errors import DeliveryError, HeadwaterError
from headwater.runtime.shutdown import stop_on_signals
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from producers.corpus import count_records, default_corpus_dir, read_corpus, replay
from producers.publisher import DocumentPublisher
from producers.watch import FolderWatcher, text_digest, watch_source
from service.commands import remote

EXIT_BAD_INPUT = 2
EXIT_DELIVERY = 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    p = sub.add_parser("publish", help="publish (upsert) one document")
    p.add_argument("--doc-id", required=True, help="document id, e.g. its path")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--file", type=Path, help="read the text from this file ('-' for stdin)")
    text.add_argument("--text", help="the document's full text")
    _tenant(p)
    p.add_argument("--metadata", help='JSON object of scalars, e.g. \'{"lang": "en"}\'')
    p.add_argument("--version", type=int, help="document version (default: from the clock)")
    _json(p)
    remote.add_url(p)
    p.set_defaults(func=_publish)

    p = sub.add_parser("delete", help="delete one document")
    p.add_argument("--doc-id", required=True)
    _tenant(p)
    p.add_argument("--version", type=int, help="document version (default: from the clock)")
    _json(p)
    remote.add_url(p)
    p.set_defaults(func=_delete)

    p = sub.add_parser("replay", help="replay a document-change corpus (snapshot, then edits)")
    p.add_argument("corpus", metavar="DIR", help="corpus folder or .jsonl.gz file, or a name: tldr")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    _tenant(p)
    _json(p)
    p.set_defaults(func=_replay)

    p = sub.add_parser("watch", help="publish a folder's *.md/*.txt files and their changes")
    p.add_argument("folder", metavar="DIR", type=Path)
    _tenant(p)
    p.add_argument("--pattern", action="append", help="file pattern (repeatable; *.md, *.txt)")
    p.set_defaults(func=_watch)


def _tenant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="tenant (default: HEADWATER_DEFAULT_TENANT)")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help='print {"token": ...} as JSON')


# -- commands ---------------------------------------------------------------------------------


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    try:
        metadata = _metadata(args.metadata)
        text = args.text if args.text is not None else _read_text(args.file)
    except ValueError as exc:
        return _fail(str(exc))
    if args.url:
        return remote.publish(args, text, metadata)
    return _send(
        settings, args, "published",
        lambda pub: pub.upsert(
            args.doc_id, text, tenant=args.tenant, metadata=metadata, version=args.version,
            source="cli",
        ),
    )  # fmt: skip


def _delete(settings: Settings, args: argparse.Namespace) -> int:
    if args.url:
        return remote.delete(args)
    return _send(
        settings, args, "deleted",
        lambda pub: pub.delete(
            args.doc_id, tenant=args.tenant, version=args.version, source="cli"
        ),
    )  # fmt: skip


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        return _fail("--limit must be >= 0")
    if args.rate is not None and args.rate <= 0:
        return _fail("--rate must be > 0")
    tenant = settings.default_tenant if args.tenant is None else args.tenant
    if not settings.tenant_known(tenant):
        return _fail(f"unknown tenant {tenant!r} (known: {', '.join(settings.tenants)})")
    try:
        path = _corpus_path(args.corpus)
        total = count_records(path)
        if args.limit is not None:
            total = min(total, args.limit)
        records = read_corpus(path, args.limit)
        console = Console(stderr=True)
        columns = (
            TextColumn("replaying {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(),
        )  # fmt: skip
        with (
            DocumentPublisher(settings) as publisher,
            Progress(*columns, console=console, disable=not console.is_terminal) as bar,
        ):
            task = bar.add_task(path.name, total=total)
            token = replay(
                publisher, records, rate=args.rate, tenant=tenant, source=f"corpus:{path.name}",
                on_progress=lambda n: bar.advance(task, n),
            )  # fmt: skip
            done = int(bar.tasks[0].completed)
    except HeadwaterError as exc:
        return _fail(str(exc), EXIT_DELIVERY if isinstance(exc, DeliveryError) else None)
    return _report(args, token, f"replayed {done} events from {path}")


def _watch(settings: Settings, args: argparse.Namespace) -> int:
    tenant = settings.default_tenant if args.tenant is None else args.tenant
    if not settings.tenant_known(tenant):
        return _fail(f"unknown tenant {tenant!r} (known: {', '.join(settings.tenants)})")
    if not args.folder.is_dir():
        return _fail(f"{args.folder} is not a folder")
    stop = stop_on_signals()
    folder = args.folder.resolve()
    try:  # what earlier runs published, from the topic: deletes made meanwhile are published
        published = published_by(settings, tenant, watch_source(folder), text_digest)
    except HeadwaterError as exc:
        return _fail(f"cannot read back the documents topic: {exc}", EXIT_DELIVERY)
    with DocumentPublisher(settings) as publisher:
        watcher = FolderWatcher(
            publisher, folder, tenant=tenant, published=published,
            patterns=tuple(args.pattern or ("*.md", "*.txt")),
        )  # fmt: skip
        print(f"watching {watcher.folder} for tenant {tenant!r} (Ctrl-C stops)", file=sys.stderr)
        try:
            watcher.run(stop)
        except DeliveryError as exc:
            return _fail(str(exc), EXIT_DELIVERY)
    stats = watcher.stats
    print(
        f"stopped: {stats['upsert']} upserts, {stats['delete']} deletes, "
        f"{stats['skipped']} skipped; token {watcher.token}"
    )
    return 0


# -- helpers ----------------------------------------------------------------------------------


def _send(
    settings: Settings,
    args: argparse.Namespace,
    verb: str,
    call: Callable[[DocumentPublisher], FreshnessToken],
) -> int:
    try:
        with DocumentPublisher(settings) as publisher:
            token = call(publisher)
    except HeadwaterError as exc:
        return _fail(str(exc), EXIT_DELIVERY if isinstance(exc, DeliveryError) else None)
    tenant = settings.default_tenant if args.tenant is None else args.tenant
    return _report(args, token, f"{verb} {tenant}/{args.doc_id}")


def _report(args: argparse.Namespace, token: FreshnessToken, line: str) -> int:
    if args.json:
        print(json.dumps({"token": str(token)}))
    else:
        print(f"{line}; token {token}")
    return 0


def _fail(message: str, code: int | None = None) -> int:
    print(f"headwater: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT if code is None else code


def _metadata(raw: str | None) -> dict[str, object] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--metadata is not valid JSON: {exc.msg} (at char {exc.pos})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--metadata must be a JSON object, not {type(value).__name__}")
    return value


def _read_text(path: Path) -> str:
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc


def _corpus_path(arg: str) -> Path:
    path = Path(arg)
    if path.exists() or "/" in arg or arg.endswith(".gz"):
        return path
    return default_corpus_dir(arg)
