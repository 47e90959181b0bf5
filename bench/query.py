"""Query latency: `Searcher.search` (embed query + hybrid search + live filter) against index size.

The queried tenant always holds 10k chunks of real corpus text with their real embeddings
(tldr and rust-book snapshot chunks; in --quick, the chunks embedded so far, copied under other
document ids until there are 10k). The collection then grows with synthetic tenants made of
the same rows under other tenant and document ids, so vectors stay real while the index reaches
100k chunks without embedding 100k texts on a 2-core machine. Rows and document states are
written straight through `ChunkStore`, then flushed so Milvus searches sealed, indexed segments.
Queries are tldr page summary lines. The first-token latency of a streamed answer (search,
prompt, SmolLM2 prefill to the first text piece) is measured when the generator is available.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

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


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [10_000], "queries": 60, "first_token": 2, "real_chunks": 400}
    return {"sizes": [10_000, 30_000, 100_000], "queries": 300, "first_token": 8,
            "real_chunks": TENANT_CHUNKS}  # fmt: skip


def run(
    ctx: BenchContext, *, sizes: list[int], queries: int, first_token: int, real_chunks: int
) -> dict[str, Any]:
    from index.search import Searcher
    from index.store import ChunkStore

    started = time.monotonic()
    embedder = ctx.embedder()
    base, qs = _real_chunks(ctx, embedder, real_chunks, queries)
    with scoped(ctx.settings, NAME) as s:
        store = ChunkStore(s, embedder.model_id, embedder.dim)
        searcher = Searcher(s, embedder, store)
        per_size: dict[str, Any] = {}
        written = 0
        docs: dict[str, tuple[str, ...]] = {}
        for size in sorted(sizes):
            t0 = time.monotonic()
            written = _grow(store, base, docs, written, size)
            store.client.flush(store.chunks)
            store.client.flush(store.docs)
            load_s = time.monotonic() - t0
            per_size[str(size)] = _measure(searcher, embedder, store, qs) | {
                "write_s": round(load_s, 1), "chunks": store.count_chunks(),
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
        "one_thread_p50_ms": top["one_thread"]["p50_ms"],
        "one_thread_p99_ms": top["one_thread"]["p99_ms"],
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


def _grow(
    store: Any, base: list[dict[str, Any]], docs: dict[str, tuple[str, ...]], written: int,
    size: int,
) -> int:  # fmt: skip
    """Write rows number `written`..`size`: the queried tenant's 10k first, then other tenants.

    `docs` (doc key -> chunk ids) carries each document's live set across write batches.
    """
    from index.store import ChunkRow, DocState, doc_key

    rows: list[ChunkRow] = []
    states: dict[str, DocState] = {}

    def flush() -> None:
        store.write_chunks(rows)
        store.write_states(list(states.values()))
        rows.clear()
        states.clear()

    for i in range(written, size):
        tenant_no, j = divmod(i, TENANT_CHUNKS)
        copy, b = divmod(j, len(base))
        src = base[b]
        tenant = "default" if tenant_no == 0 else f"synth{tenant_no:03d}"
        doc_id = src["doc_id"] if copy == 0 else f"copy{copy:03d}/{src['doc_id']}"
        key = doc_key(tenant, doc_id)
        chunk = src["chunk"]
        chunk_id = chunk.chunk_id
        if tenant_no or copy:
            chunk_id = hashlib.sha256(f"{tenant}\x00{doc_id}\x00{chunk_id}".encode()).hexdigest()
            chunk_id = chunk_id[:32]
        rows.append(
            ChunkRow(chunk_id, tenant, key, doc_id, 1, chunk.section, chunk.text, src["vector"])
        )
        docs[key] = (*docs.get(key, ()), chunk_id)
        states[key] = DocState(key, tenant, doc_id, 1, False, docs[key])
        if len(rows) >= WRITE_BATCH:
            flush()
    flush()
    return size


def _measure(searcher: Any, embedder: Any, store: Any, qs: list[str]) -> dict[str, Any]:
    """Latency as configured, and with one torch thread, query by query in alternation.

    On a 2-core machine shared with other work, two OpenMP threads for a one-sentence query
    spend most of their time waiting for each other; alternating the two settings query by
    query exposes both to the same load.
    """
    import torch

    configured = torch.get_num_threads()
    for q in qs[:5]:  # warm-up: first calls build caches on both sides
        searcher.search(q, tenant="default", k=K)
    total: list[float] = []
    single: list[float] = []
    embed, hybrid, states = [], [], []
    empty = 0
    try:
        for q in qs:
            torch.set_num_threads(configured)
            t0 = time.perf_counter()
            hits = searcher.search(q, tenant="default", k=K)
            total.append((time.perf_counter() - t0) * 1000)
            empty += not hits
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            searcher.search(q, tenant="default", k=K)
            single.append((time.perf_counter() - t0) * 1000)
        torch.set_num_threads(configured)
        # The same queries again, one step at a time, to show where the time goes.
        for q in qs:
            t0 = time.perf_counter()
            v = embedder.encode([q])[0]
            t1 = time.perf_counter()
            raw = store.search(v, q, tenant="default", limit=max(4 * K, 20))
            t2 = time.perf_counter()
            searcher.live(raw, "default")
            t3 = time.perf_counter()
            embed.append((t1 - t0) * 1000)
            hybrid.append((t2 - t1) * 1000)
            states.append((t3 - t2) * 1000)
    finally:
        torch.set_num_threads(configured)
    p = percentiles(total)
    p1 = percentiles(single)

    def steps(q: int) -> dict[str, float]:
        return {
            "embed_query": round(percentiles(embed)[f"p{q}"], 2),
            "hybrid_search": round(percentiles(hybrid)[f"p{q}"], 2),
            "live_filter": round(percentiles(states)[f"p{q}"], 2),
        }

    return {
        "torch_threads": configured,
        "p50_ms": round(p["p50"], 2),
        "p95_ms": round(p["p95"], 2),
        "p99_ms": round(p["p99"], 2),
        "max_ms": round(p["max"], 2),
        "mean_ms": round(p["mean"], 2),
        "one_thread": {
            "p50_ms": round(p1["p50"], 2),
            "p95_ms": round(p1["p95"], 2),
            "p99_ms": round(p1["p99"], 2),
        },
        "empty_results": empty,
        "steps_p50_ms": steps(50),
        "steps_p99_ms": steps(99),
    }


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
    threads = per_size[sizes[0]]["torch_threads"]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        ax.plot(
            xs, [per_size[x][key] for x in sizes], marker="o", label=f"{label}, {threads} threads"
        )
        ax.plot(xs, [per_size[x]["one_thread"][key] for x in sizes], marker="s", ls=":",
                label=f"{label}, 1 thread")  # fmt: skip
    ax.axhline(30, color="grey", ls="--", lw=1, label="target p99 = 30 ms")
    ax.set_xscale("log")
    ax.set_xlabel("chunks in the index (queried tenant: 10k)")
    ax.set_ylabel("Searcher.search latency, ms")
    ax.set_title("Query latency vs index size (embed + hybrid search + live filter)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "query.png", dpi=110)
    plt.close(fig)
