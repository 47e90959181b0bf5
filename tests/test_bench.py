"""Smoke tests of `headwater bench`: each benchmark runs on tiny inputs on the real stack and
writes its JSON with the required keys; the report renders what they wrote.

No figure is asserted against a speed target here (that is what the benchmarks are for); the
assertions are about what must hold whatever the machine's speed. The ingest, incremental,
freshness and lora smoke runs embed tens of chunks or train a step each, so they are `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chunking, freshness, incremental, ingest, lora, query, report
from bench.common import BenchContext, CountingEmbedder, VectorMemo, percentiles
from headwater.settings import Settings
from service.cli import build_parser

COMMON_KEYS = {"benchmark", "command", "quick", "date", "git", "machine", "wall_s"}


@pytest.fixture
def ctx(stack_settings, embedder, tmp_path: Path) -> BenchContext:
    c = BenchContext(settings=stack_settings, quick=True, out_dir=tmp_path / "out", command="t")
    c._embedder = embedder
    return c


def _result(ctx: BenchContext, name: str, keys: set[str]) -> dict:
    doc = json.loads((ctx.out_dir / f"{name}.json").read_text())
    assert COMMON_KEYS | keys <= doc.keys()
    assert doc["benchmark"] == name
    assert doc["machine"]["cores"] >= 1
    return doc


def test_cli_parses_bench_commands() -> None:
    args = build_parser().parse_args(["bench", "all", "--quick", "--out", "x"])
    assert (args.name, args.quick, args.out) == (["all"], True, Path("x"))
    assert build_parser().parse_args(["bench", "query", "lora"]).name == ["query", "lora"]
    assert build_parser().parse_args(["bench", "chunking"]).name == ["chunking"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "nonsense"])


def test_percentiles_and_counting_embedder(embedder) -> None:
    p = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["p99"] == 100.0 and p["max"] == 100.0
    memo = VectorMemo()
    counting = CountingEmbedder(embedder, memo)
    a = counting.encode(["alpha", "beta", "alpha"])
    b = counting.encode(["beta"])
    assert counting.texts == 4 and memo.computed == 2  # asked 4 times, computed twice
    assert a.shape == (3, embedder.dim) and (a[0] == a[2]).all() and (b[0] == a[1]).all()


@pytest.mark.slow
def test_ingest_quick(ctx) -> None:
    f = ingest.run(ctx, docs=12, sample=6, recall_queries=6)
    doc = _result(ctx, "ingest", {"pipeline_cps", "bare_cps", "ratio"})
    assert f["chunks"] == f["bare_chunks"] > 0  # the pipeline embedded exactly those chunks
    assert doc["pipeline_cps"] > 0 and doc["bare_cps"] > 0
    assert doc["ratio"] == pytest.approx(doc["pipeline_cps"] / doc["bare_cps"], rel=0.01)
    assert f["pipeline_recall_at_5"] >= 0.5  # a page's own summary line finds it
    assert f["services_cpu_s"] > 0 and f["pipeline_process_cpu_s"] > 0  # both sides measured
    assert len(ctx.memo.vectors) > 0  # the bare pass feeds later benchmarks


# Hangs on the current tree (issue 6 open): run under `make soak` until fixed.
@pytest.mark.soak
def test_incremental_quick(ctx) -> None:
    f = incremental.run(ctx, docs=1, window=120)
    _result(ctx, "incremental", {"headwater_embeddings", "whole_doc_embeddings",
                                 "langchain_embeddings", "ratio_vs_whole_doc"})  # fmt: skip
    assert f["events"] > 0
    assert f["headwater_embeddings"] < f["whole_doc_embeddings"]
    # One event per batch: headwater embeds exactly the chunks its previous version lacked.
    assert f["headwater_embeddings"] == f["chunk_diff_embeddings"]
    final = f["final"]
    assert final["headwater_chunks"] == final["expected_live_chunks"]
    assert final["headwater_stale_rows"] == final["headwater_missing"] == 0
    assert final["langchain_stale_rows"] == final["langchain_missing"] == 0
    assert (ctx.out_dir / "incremental.png").is_file()


@pytest.mark.slow
def test_freshness_quick(ctx) -> None:
    f = freshness.run(ctx, events=12, rate=4.0, sample_every=4, snapshot="touched")
    _result(ctx, "freshness", {"p50_s", "p95_s", "p99_s", "rate_eps", "events", "visible"})
    assert f["events"] == 12 and f["never_visible"] == 0
    assert 0 < f["p50_s"] <= f["p95_s"] <= f["p99_s"]
    assert f["rate_eps"] > 0
    assert (ctx.out_dir / "freshness.png").is_file()


def test_query_quick(ctx) -> None:
    f = query.run(ctx, sizes=[300, 600], queries=8, first_token=0, real_chunks=40)
    _result(ctx, "query", {"p50_ms", "p99_ms", "chunks", "sizes"})
    assert f["chunks"] == 600 and set(f["sizes"]) == {"300", "600"}
    assert f["sizes"]["300"]["chunks"] == 300
    assert f["sizes"]["600"]["empty_results"] == 0
    assert f["p50_ms"] <= f["p99_ms"]
    assert (ctx.out_dir / "query.png").is_file()


# Never completed as a test on this machine (issue 6 open): `make soak` only.
@pytest.mark.soak
def test_lora_and_first_token_quick(ctx) -> None:
    f = lora.run(ctx, sizes=[6], replay=3, heldout=1, docs=1, steps=1, gate_tokens=4)
    _result(ctx, "lora", {"runs", "seconds", "peak_rss_mib", "swap"})
    (r,) = f["runs"]
    assert r["status"] == "trained" and r["peak_rss_mib"] > 100
    assert len(f["swap"]["ms"]) == 2
    q = query.run(ctx, sizes=[200], queries=3, first_token=1, real_chunks=20)
    assert q["first_token"]["n"] == 1 and q["first_token"]["p50_s"] > 0


def test_chunking_quick(embedder, tmp_path: Path) -> None:
    # No stack: chunking needs none, and `headwater bench chunking` starts none.
    from service.commands.bench import needs_stack

    assert not needs_stack("chunking") and needs_stack("ingest")
    ctx = BenchContext(settings=Settings(), quick=True, out_dir=tmp_path / "out", command="t")
    ctx._embedder = embedder
    f = chunking.run(ctx, sizes=[4_000, 16_000], classes=["heading-spaces", "data-uri"], repeat=1)
    doc = _result(ctx, "chunking", {"sizes", "ordinary", "classes", "ratio", "worst_class"})
    assert doc["sizes"] == [4_000, 16_000] and set(doc["classes"]) == {"heading-spaces", "data-uri"}
    for c in f["classes"].values():
        for size in ("4000", "16000"):
            assert c[size]["s_per_mb"] > 0 and c[size]["ratio"] is not None
    assert f["ordinary"]["16000"]["chunks"] > 1
    worst = f["classes"][f["worst_class"]]
    assert (
        f["ratio"]
        == worst[str(f["worst_size"])]["ratio"]
        == max(c[s]["ratio"] for c in f["classes"].values() for s in ("4000", "16000"))
    )
    text = report.write(ctx.out_dir).read_text()
    assert "| chunking ≤ 3 × ordinary s/MB |" in text and "| data-uri: " in text


def test_chunking_inputs_have_their_sizes() -> None:
    for name, (_, make) in chunking.CLASSES.items():
        text = make(50_000)
        assert 40_000 <= len(text) <= 50_000, name


def test_report_renders_results(tmp_path: Path) -> None:
    machine = {"cores": 2, "cpu": "x", "memory_gib": 1, "os": "linux", "python": "3.11",
               "torch": "2", "torch_threads": 2, "loadavg": [1.0, 1.0, 1.0]}  # fmt: skip
    common = {
        "command": "headwater bench ingest", "quick": True, "date": "2026-01-01T00:00",
        "git": {"commit": "abc", "dirty": False}, "machine": machine, "wall_s": 1,
    }  # fmt: skip
    ing = {
        "benchmark": "ingest", **common, "docs": 1, "chunks": 10, "pipeline_s": 1.0,
        "bare_s": 1.0, "publish_s": 0.1, "pipeline_cps": 9.0, "bare_cps": 10.0, "ratio": 0.9,
        "batch_size": 64, "variants": {"fp32_bs32": {"cps": 1.0, "dense_recall_at_5": 1.0}},
    }  # fmt: skip
    (tmp_path / "ingest.json").write_text(json.dumps(ing))
    half = {"events": 600, "never_visible": 0, "rate_eps": 5.0, "p50_s": 0.2, "p95_s": 0.5,
            "p99_s": 0.8, "max_s": 1.1, "search_p99_s": 0.7}  # fmt: skip
    fresh = {
        "benchmark": "freshness", **common, **half, "p99_s": 1.5, "upserts": 590, "deletes": 10,
        "snapshot_docs": 9, "rate_target_eps": 5.0, "chunks_embedded": 800,
        "chunks_per_event": 1.3, "batch_max_events": 500, "batch_max_ms": 100, "mean_s": 0.3,
        "search_confirmed": 20, "search_p50_s": 0.3, "publish_ack_p50_ms": 9.0,
        "from_send_p99_s": 1.6, "without_training": half,
        "lora_during_replay": {"status": "trained", "paused": 3, "paused_s": 12.5,
                               "new_examples": 200, "steps": 50, "seconds": 300.0,
                               "finished_after_s": 301.0, "replay_s": 120.0},
    }  # fmt: skip
    (tmp_path / "freshness.json").write_text(json.dumps(fresh))
    path = report.write(tmp_path)
    text = path.read_text()
    assert "| ingest ≥ 0.9 × bare |" in text and "ratio **0.9**" in text
    assert "| freshness p99 ≤ 2 s with a LoRA refresh running | p99 **1.5 s**" in text
    assert "paused 3 × for 12.5 s" in text and "earlier in the same run: p99 0.8 s" in text
    assert "| first half, no training | 0.2 | 0.5 | 0.8 | 1.1 | 600 |" in text
    assert report.MARKER in text
    # Hand-written notes survive a rewrite.
    path.write_text(text.replace("_No notes yet._", "kept note"))
    assert "kept note" in report.write(tmp_path).read_text()


def test_overrides_are_checked() -> None:
    from service.commands.bench import parse_overrides

    assert parse_overrides(
        ["freshness.rate=5", "ingest.docs=100", "freshness.snapshot=touched"]
    ) == {
        "freshness": {"rate": 5, "snapshot": "touched"},
        "ingest": {"docs": 100},
    }
    assert parse_overrides(["chunking.sizes=[1000]"]) == {"chunking": {"sizes": [1000]}}
    for bad in ("rate=5", "nosuch.rate=5", "freshness.nosuch=1", "freshness.rate"):
        with pytest.raises(ValueError, match="--set"):
            parse_overrides([bad])
