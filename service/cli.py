"""`headwater` command line: builds Settings once and hands it to the chosen command.

Errors headwater raises on purpose end as one line on stderr: exit 2 for what the caller must
fix, 1 for what may work later.
"""

from __future__ import annotations

import argparse
import logging
import sys

from headwater import __version__
from headwater.errors import Forbidden, InvalidInput, StackError, Timeout, Unavailable
from headwater.settings import Settings
from headwater.threads import passive_waits
from service.commands import app, bench, documents, index, queries, stack, training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwater",
        description="Keep an LLM application's knowledge fresh: Kafka events -> Milvus -> answers.",
    )
    parser.add_argument("--version", action="version", version=f"headwater {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (stack, documents, index, queries, training, bench, app):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # kafka-python logs every failed connection attempt; our own errors say it in one line.
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    passive_waits()  # before anything loads torch
    try:
        settings = Settings()
        return int(args.func(settings, args) or 0)
    except (StackError, InvalidInput, Forbidden) as exc:
        print(f"headwater: {one_line(exc)}", file=sys.stderr)
        return 2
    except (Unavailable, Timeout) as exc:  # might work later: not the caller's mistake
        print(f"headwater: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
