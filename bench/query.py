"""Query latency: `Searcher.search` (embed query + hybrid search + live filter) against index size.

The queried tenant always holds 10k chunks of real corpus text with their real embeddings
(tldr and rust-book snapshot chunks; in --quick, the chunks embedded so far, copied under other
document ids until there are 10k). The collection then grows with synthetic tenants made of
the same rows under other tenant and document ids, so vectors stay real while the index reaches
100k chunks without embedding 100k texts on a 2-core machine. Rows and document states are
written straight through `ChunkStore`, then flushed so Milvus searches sealed, indexed segments.
Queries are tldr page summary lines. The first-token latency of a streamed answer (search,
prompt, SmolLM2 prefill to the first text piece) is measured when the generator is available.

Dense recall@10 compares the engine's dense top-10 with exact cosine search (numpy) over the
queried tenant's vectors; a hit tied with the exact 10th score counts (copied rows tie). The
Milvus server's resident memory is read after each size. With `compare_python` (a Python
whose environment has another milvus-lite, e.g. 3.2), a second Lite server from it gets the
same rows and every query runs on both engines back to back, order alternating.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BenchContext,
    corpus,
    description,
    percentiles,
    plot,
    scoped,
    write_result,
)

log = logging.getLogger(__name__)

NAME = "query"
TENANT_CHUNKS = 10_000
WRITE_BATCH = 2_000
K = 5
RECALL_K = 10


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [10_000], "queries": 60, "first_token": 2, "real_chunks": 400,
                "compare_python": None}  # fmt: skip
    return {"sizes": [10_000, 30_000, 100_000], "queries": 300, "first_token": 8,
            "real_chunks": TENANT_CHUNKS, "compare_python": None}  # fmt: skip


def run(
    ctx: BenchContext, *, sizes: list[int], queries: int, first_token: int, real_chunks: int,
    compare_python: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    from index.search import Searcher
    from index.store import ChunkStore

    started = time.monotonic()
    embedder = ctx.embedder()
    base, qs = _real_chunks(ctx, embedder, real_chunks, queries)
    with scoped(ctx.settings, NAME) as s, _other_engine(s, compare_python) as other:
        store = ChunkStore(s, embedder.model_id, embedder.dim)
        engines = {"headwater": (Searcher(s, embedder, store), store, _server_pid(ctx.settings))}
        if other is not None:
            o_settings, o_pid, o_name = other
            o_store = ChunkStore(o_settings, embedder.model_id, embedder.dim)
            engines[o_name] = (Searcher(o_settings, embedder, o_store), o_store, o_pid)
        searcher = engines["headwater"][0]
        per_size: dict[str, Any] = {}
        written = 0
        docs: dict[str, dict[str, tuple[str, ...]]] = {n: {} for n in engines}
        for size in sorted(sizes):
            t0 = time.monotonic()
            for name, (_, st, _) in engines.items():
                _grow(st, base, docs[name], written, size)
                st.client.flush(st.chunks)
                st.client.flush(st.docs)
            written = size
            load_s = time.monotonic() - t0
            measured = _measure(engines, embedder, base, qs)
            per_size[str(size)] = measured["headwater"] | {
                "write_s": round(load_s, 1), "chunks": store.count_chunks(),
                "engines": {n: m for n, m in measured.items() if n != "headwater"},
            }  # fmt: skip
            log.info("query latency at %d chunks: %s", size, per_size[str(size)])
        ft = _first_token(s, searcher, qs, first_token) if first_token else None
    top = per_size[str(max(sizes))]
    figures = {
        "chunks": top["chunks"],
        "tenant_chunks": TENANT_CHUNKS,
        "real_unique_chunks": len(base),
        "queries": len(qs),
        "k": K,
        "p50_ms": top["p50_ms"],
        "p95_ms": top["p95_ms"],
        "p99_ms": top["p99_ms"],
        "dense_recall_at_10": top["dense_recall_at_10"],
        "server_rss_mib": top["server_rss_mib"],
        "embedder": embedder.variant,
        "engine": _engine_name(store),
        "sizes": per_size,
        "first_token": ft,
    }
    write_result(ctx, NAME, figures, started)
    _plot(ctx, per_size)
    return figures


def _real_chunks(
    ctx: BenchContext, embedder: Any, n: int, queries: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Up to `n` real chunks (tldr first, then rust-book) with vectors, and the query texts."""
    from index.chunker import chunk_document

    tldr, _ = corpus("tldr")
    book, _ = corpus("rust-book")
    rows: list[dict[str, Any]] = []
    qs: list[str] = []
    for record in [*tldr, *book]:
        if len(rows) >= 3 * n and len(qs) >= queries:
            break
        chunks = chunk_document(
            "default", record.doc_id, record.text or "", count_tokens=embedder.count_tokens,
            target_tokens=min(ctx.settings.chunk_tokens, embedder.max_tokens - 2),
            max_tokens=embedder.max_tokens - 2,
        )  # fmt: skip
        rows += [{"doc_id": record.doc_id, "chunk": c} for c in chunks]
        if (q := description(record.text or "")) and len(qs) < queries:
            qs.append(q)
    # Chunks this run has embedded already first: the vectors are the same, the time is not.
    rows.sort(key=lambda r: r["chunk"].embed_text not in ctx.memo.vectors)
    rows = rows[:n]
    vectors = ctx.memo.encode(embedder, [r["chunk"].embed_text for r in rows])
    for r, v in zip(rows, vectors, strict=True):
        r["vector"] = v
    return rows, qs


def _row(base: list[dict[str, Any]], i: int) -> tuple[str, str, dict[str, Any], str]:
    """(tenant, doc_id, source row, chunk_id) of row number `i` of the grown index."""
    tenant_no, j = divmod(i, TENANT_CHUNKS)
    copy, b = divmod(j, len(base))
    src = base[b]
    tenant = "default" if tenant_no == 0 else f"synth{tenant_no:03d}"
    doc_id = src["doc_id"] if copy == 0 else f"copy{copy:03d}/{src['doc_id']}"
    chunk_id = src["chunk"].chunk_id
    if tenant_no or copy:
        chunk_id = hashlib.sha256(f"{tenant}\x00{doc_id}\x00{chunk_id}".encode()).hexdigest()
        chunk_id = chunk_id[:32]
    return tenant, doc_id, src, chunk_id


def _grow(
    store: Any, base: list[dict[str, Any]], docs: dict[str, tuple[str, ...]], written: int,
    size: int,
) -> int:  # fmt: skip
    """Write rows number `written`..`size`: the queried tenant's 10k first, then other tenants.

    `docs` (doc key -> chunk ids) carries each document's live set across write batches.
    """
    from headwater.versions import Stamp
    from index.store import ChunkRow, DocState, doc_key

    rows: list[ChunkRow] = []
    states: dict[str, DocState] = {}

    def flush() -> None:
        store.write_chunks(rows)
        store.write_states(list(states.values()))
        rows.clear()
        states.clear()

    for i in range(written, size):
        tenant, doc_id, src, chunk_id = _row(base, i)
        key = doc_key(tenant, doc_id)
        chunk = src["chunk"]
        rows.append(
            ChunkRow(chunk_id, tenant, key, doc_id, 1, chunk.section, chunk.text, src["vector"])
        )
        docs[key] = (*docs.get(key, ()), chunk_id)
        states[key] = DocState(key, tenant, doc_id, Stamp(1, 0, 0), False, docs[key])
        if len(rows) >= WRITE_BATCH:
            flush()
    flush()
    return size


def _measure(
    engines: dict[str, tuple[Any, Any, int | None]], embedder: Any, base: list[dict[str, Any]],
    qs: list[str],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Latency, dense recall@10 and server memory of each engine, query by query in alternation.

    On a 2-core machine shared with other work, alternating the engines query by query exposes
    them to the same load.
    """
    rows = [_row(base, i) for i in range(TENANT_CHUNKS)]
    position = {chunk_id: n for n, (_, _, _, chunk_id) in enumerate(rows)}
    matrix = np.stack([src["vector"] for _, _, src, _ in rows]).astype(np.float32)
    names = list(engines)
    for q in qs[:5]:  # warm-up: first calls build caches on both sides
        for searcher, _, _ in engines.values():
            searcher.search(q, tenant="default", k=K)
    total: dict[str, list[float]] = {n: [] for n in names}
    empty = dict.fromkeys(names, 0)
    for i, q in enumerate(qs):
        for n in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            hits = engines[n][0].search(q, tenant="default", k=K)
            total[n].append((time.perf_counter() - t0) * 1000)
            empty[n] += not hits
    # The same queries again, one step at a time, to show where the time goes; and recall.
    embed: list[float] = []
    hybrid: dict[str, list[float]] = {n: [] for n in names}
    states: dict[str, list[float]] = {n: [] for n in names}
    recall: dict[str, list[float]] = {n: [] for n in names}
    for i, q in enumerate(qs):
        t0 = time.perf_counter()
        v = embedder.encode([q])[0]
        embed.append((time.perf_counter() - t0) * 1000)
        exact = matrix @ v
        kth = float(np.partition(exact, -RECALL_K)[-RECALL_K])
        for n in names if i % 2 == 0 else names[::-1]:
            searcher, store, _ = engines[n]
            t1 = time.perf_counter()
            raw = store.search(v, q, tenant="default", limit=max(4 * K, 20))
            t2 = time.perf_counter()
            searcher.live(raw, "default")
            t3 = time.perf_counter()
            hybrid[n].append((t2 - t1) * 1000)
            states[n].append((t3 - t2) * 1000)
            dense = store.search(v, "", tenant="default", limit=RECALL_K)
            # A hit as close as the exact 10th counts: copied rows have equal vectors.
            good = sum(
                1 for h in dense[:RECALL_K]
                if h.chunk_id in position and exact[position[h.chunk_id]] >= kth - 1e-4
            )  # fmt: skip
            recall[n].append(good / RECALL_K)

    out: dict[str, dict[str, Any]] = {}
    for n in names:
        p = percentiles(total[n])

        def steps(q: int, n: str = n) -> dict[str, float]:
            return {
                "embed_query": round(percentiles(embed)[f"p{q}"], 2),
                "hybrid_search": round(percentiles(hybrid[n])[f"p{q}"], 2),
                "live_filter": round(percentiles(states[n])[f"p{q}"], 2),
            }

        out[n] = {
            "engine": _engine_name(engines[n][1]),
            "p50_ms": round(p["p50"], 2),
            "p95_ms": round(p["p95"], 2),
            "p99_ms": round(p["p99"], 2),
            "max_ms": round(p["max"], 2),
            "mean_ms": round(p["mean"], 2),
            "dense_recall_at_10": round(float(np.mean(recall[n])), 4),
            "server_rss_mib": _rss_mib(engines[n][2]),
            "empty_results": empty[n],
            "steps_p50_ms": steps(50),
            "steps_p99_ms": steps(99),
        }
    return out


def _engine_name(store: Any) -> str:
    version = store.engine.version
    return f"milvus {version}" if version else "milvus-lite " + _lite_version()


def _lite_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("milvus-lite")
    except PackageNotFoundError:
        return "?"


def _server_pid(s: Any) -> int | None:
    from stack.liteserver import LiteServer

    return LiteServer(s).daemon.pid() if s.uses_local_milvus else None


def _rss_mib(pid: int | None) -> int | None:
    """Resident memory of the Milvus server (and its children), MiB; None if not local."""
    import psutil

    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True))) >> 20
    except psutil.Error:
        return None


@contextlib.contextmanager
def _other_engine(s: Any, python: str | None) -> Iterator[tuple[Any, int, str] | None]:
    """A Lite server from another environment's milvus-lite (`python -m milvus_lite server`)."""
    if not python:
        yield None
        return
    from stack.daemon import free_port, port_open
    from stack.liteserver import answers

    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('milvus-lite'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="headwater-bench-other-"))
    argv = [python, "-m", "milvus_lite", "server", "--data-dir", str(home), "--host",
            "127.0.0.1", "--port", str(port)]  # fmt: skip
    log_file = (home / "server.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not (port_open("127.0.0.1", port) and answers(address)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite {version} server did not start: see {home}")
            time.sleep(0.5)
        yield s.model_copy(update={"milvus_uri": address}), proc.pid, f"milvus-lite {version}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        shutil.rmtree(home, ignore_errors=True)


def _first_token(s: Any, searcher: Any, qs: list[str], n: int) -> dict[str, Any]:
    """Seconds from a question to the first streamed text piece of a generated answer."""
    try:
        from consumers.answerer import build_prompt
        from consumers.generation import load_generator
    except ImportError as exc:
        return {"skipped": f"answer generation not available: {exc}"}
    t0 = time.monotonic()
    generator = load_generator(s)
    if generator is None:
        return {"skipped": "settings.generator is empty (extractive answers)"}
    load_s = time.monotonic() - t0
    times, prompt_tokens = [], []
    for q in qs[: n + 1]:
        t0 = time.perf_counter()
        hits = searcher.search(q, tenant="default", k=K)
        messages = build_prompt(q, hits, s.prompt_max_chars)
        gen = generator.stream(messages)
        try:
            piece = ""
            for piece in gen:
                if piece.strip():
                    break
            elapsed = time.perf_counter() - t0
        finally:
            gen.close()
            for _ in gen:  # let the worker finish so the next query does not wait on its lock
                pass
        prompt_tokens.append(int(generator.encode(messages)["input_ids"].shape[1]))
        times.append(elapsed)
    times, prompt_tokens = times[1:], prompt_tokens[1:]  # the first one warms up
    p = percentiles(times)
    return {
        "generator": s.generator,
        "load_s": round(load_s, 1),
        "n": len(times),
        "p50_s": round(p["p50"], 3),
        "max_s": round(p["max"], 3),
        "prompt_tokens_mean": round(sum(prompt_tokens) / max(1, len(prompt_tokens))),
        "path": "in-process: Searcher.search + build_prompt + Generator.stream (no Kafka hop)",
    }


def _plot(ctx: BenchContext, per_size: dict[str, Any]) -> None:
    plt = plot()
    sizes = sorted(per_size, key=int)
    xs = [int(x) for x in sizes]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        ax.plot(xs, [per_size[x][key] for x in sizes], marker="o", label=f"{label}, headwater")
        for other in per_size[sizes[0]].get("engines") or {}:
            ax.plot(xs, [per_size[x]["engines"][other][key] for x in sizes], marker="s",
                    ls=":", label=f"{label}, {other}")  # fmt: skip
    ax.axhline(30, color="grey", ls="--", lw=1, label="target p99 = 30 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("chunks in the index (queried tenant: 10k)")
    ax.set_ylabel("Searcher.search latency, ms")
    ax.set_title("Query latency vs index size (embed + hybrid search + live filter)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "query.png", dpi=110)
    plt.close(fig)
