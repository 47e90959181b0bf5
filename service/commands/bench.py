"""`headwater bench NAME|all [--quick] [--out DIR]`: benchmarks on real models and corpora."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headwater.settings import Settings

if TYPE_CHECKING:
    from bench.common import BenchContext

log = logging.getLogger(__name__)

# In this order under `all`: ingest's bare pass and incremental's replay leave real vectors in
# the run's memo, which freshness (its untimed snapshot) and query (its 10k/100k rows) reuse.
# answers, adapters and chunking need neither the memo nor the stack, so they come last.
BENCHMARKS = ("ingest", "incremental", "freshness", "query", "lora", "answers", "adapters",
              "chunking", "hostile")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run benchmarks (real models, real corpora) and write JSON results + BENCHMARKS.md",
    )
    p.add_argument(
        "name",
        nargs="+",
        choices=[*BENCHMARKS, "all", "report"],
        help="benchmarks to run (in the order given), all of them, or `report` to rewrite "
        "BENCHMARKS.md from the JSON",
    )
    p.add_argument("--quick", action="store_true", help="small inputs (all: under 10 minutes)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results, or bench/results/quick with --quick)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override one parameter of one benchmark, e.g. freshness.rate=5 or "
        "ingest.docs=1000 (JSON value); recorded in the results with the command",
    )
    p.add_argument("--profile", action="store_true", help="ingest: pyinstrument the pipeline")
    p.set_defaults(func=_bench)


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from bench import report
    from bench.common import DEFAULT_OUT, BenchContext, BenchError, bench_stack

    out: Path = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if args.name == ["report"]:
        path = report.write(out)
        print(f"wrote {path}")
        return 0
    if "report" in args.name and len(args.name) > 1:
        print("headwater: `report` runs alone", file=sys.stderr)
        return 2
    names = BENCHMARKS if "all" in args.name else tuple(dict.fromkeys(args.name))
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2
    command = "headwater " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    failed = []
    # Kafka and Milvus are started only when a benchmark needs them (chunking does not).
    stack = bench_stack(settings) if any(map(needs_stack, names)) else nullcontext(settings)
    try:
        with stack as base:
            ctx = BenchContext(
                settings=base, quick=args.quick, out_dir=out, command=command,
                profile=args.profile,
            )  # fmt: skip
            for name in names:
                t0 = time.monotonic()
                print(f"== {name} ...", flush=True)
                try:
                    figures = run_one(ctx, name, overrides.get(name, {}))
                except BenchError as exc:
                    print(f"headwater: bench {name}: {exc}", file=sys.stderr)
                    failed.append(name)
                    continue
                print(f"== {name} done in {time.monotonic() - t0:.0f} s: {headline(figures)}")
    finally:
        path = report.write(out)
        print(f"results in {out}/, summary in {path}")
    return 1 if failed else 0


def needs_stack(name: str) -> bool:
    import importlib

    return getattr(importlib.import_module(f"bench.{name}"), "STACK", True)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["freshness.rate=5"]` -> `{"freshness": {"rate": 5}}`; ValueError names a bad item."""
    import importlib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        name, dot, key = target.partition(".")
        if not (sep and dot and name in BENCHMARKS):
            raise ValueError(f"--set {item!r}: expected NAME.KEY=VALUE with NAME in {BENCHMARKS}")
        known = importlib.import_module(f"bench.{name}").params(False)
        if key not in known:
            raise ValueError(
                f"--set {item!r}: {name} has no parameter {key!r} ({', '.join(known)})"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def run_one(ctx: BenchContext, name: str, overrides: dict[str, Any] | None = None) -> dict:
    """Run benchmark `name` at the context's scale; returns its figures (also written)."""
    import importlib

    module = importlib.import_module(f"bench.{name}")
    kwargs = module.params(ctx.quick) | (overrides or {})
    log.info("bench %s: %s", name, kwargs)
    return module.run(ctx, **kwargs)


def headline(figures: dict) -> str:
    keys = (
        "p50_s", "p99_s", "rate_eps", "pipeline_cps", "bare_cps", "ratio", "ratio_vs_whole_doc",
        "p50_ms", "p99_ms", "chunks", "worst_class", "speedup", "dtype", "rss_per_adapter_mib",
        "load_p50_ms", "switch_overhead_ms",
    )  # fmt: skip
    parts = [f"{k}={figures[k]}" for k in keys if k in figures]
    if "runs" in figures:
        parts += [f"{r['new_examples']} examples: {r['seconds']} s" for r in figures["runs"]]
    return ", ".join(parts) or "ok"
