"""Bulk ingest: chunks/s through the whole pipeline against the bare encode of the same embedder.

The tldr snapshot goes through in rounds. In each, the round's pages are published
(acknowledged, not timed), then an indexer that already owns its partitions is timed from its
first poll until it has applied them, and the bare embedder (the configured backend and
precision) encodes exactly the chunk texts of those pages, right before or right after
(alternating), so a load change on the shared machine hits both sides alike.

Every embedder variant (torch / onnx / openvino × fp32 / int8, and onnx int8 with one intra-op
thread, alone or as two concurrent streams) is then compared on a sample of whole pages: the
sample goes through in slices, each slice through every variant back to back in rotated order,
so the ratios hold on a loaded machine. Each variant's dense recall@5 on page-summary queries
and mean cosine to torch fp32's vectors show that speed is never bought with quality.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from bench.common import (
    BenchContext,
    CountingEmbedder,
    ServiceCPU,
    corpus,
    description,
    index_through,
    join_group,
    scoped,
    write_result,
)

log = logging.getLogger(__name__)

NAME = "ingest"
K = 5


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"docs": 160, "sample": 40, "recall_queries": 40, "rounds": 2, "variants": "two"}
    return {"docs": None, "sample": 512, "recall_queries": 300, "rounds": 6, "variants": "all"}


def run(
    ctx: BenchContext, *, docs: int | None, sample: int, recall_queries: int, rounds: int = 2,
    variants: str = "two",
) -> dict[str, Any]:  # fmt: skip
    from consumers.indexer import Indexer
    from index.search import Searcher
    from producers.corpus import replay, to_event
    from producers.publisher import DocumentPublisher

    started = time.monotonic()
    snapshot, _ = corpus("tldr")
    records = snapshot[:docs] if docs else snapshot
    embedder = ctx.embedder()
    bs = embedder.batch_size

    def bare(texts: list[str]) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        v = embedder.encode(texts)
        return v, time.perf_counter() - t0

    with scoped(ctx.settings, NAME) as s:
        counting = CountingEmbedder(embedder)
        ix = Indexer(s, embedder=counting)
        per_record = [
            [c.embed_text for c in ix.writer.chunk(to_event(r, "default"))] for r in records
        ]
        texts = [t for ts in per_record for t in ts]
        bare(texts[:16])  # warm-up (first call allocates); not counted
        size = max(1, -(-len(records) // rounds))
        pipeline_s = bare_s = publish_s = 0.0
        chunks = bare_chunks = 0
        embed_s = 0.0  # of pipeline_s, the time inside the embedder's encode
        services = ServiceCPU(ctx.settings)
        services_s = own_s = 0.0  # CPU-s of the pipeline phases: broker + Milvus, this process
        per_round: list[dict[str, Any]] = []
        vectors: list[np.ndarray] = []
        try:
            join_group(ix)
            with DocumentPublisher(s) as pub:
                starts = list(range(0, len(records), size))
                for i, lo in enumerate(starts):
                    part = records[lo : lo + size]
                    part_texts = [t for ts in per_record[lo : lo + size] for t in ts]
                    embedded = ix.stats.embedded
                    encode_s = counting.seconds
                    # The profiler slows the pipeline side, so its round is left out of the totals.
                    profiled = ctx.profile and i == len(starts) - 1 and len(starts) > 1
                    # Alternate which side goes first, so a load trend hits both alike.
                    if i % 2 == 0:
                        v, b_s = bare(part_texts)
                    t0 = time.monotonic()
                    token = replay(pub, part, tenant="default")
                    publish_s += time.monotonic() - t0
                    profiler = _profiler() if profiled else None
                    t0, svc0, own0 = time.monotonic(), services.seconds(), time.process_time()
                    index_through(ix, token, timeout=3600)
                    p_s = time.monotonic() - t0
                    svc_s, my_s = services.seconds() - svc0, time.process_time() - own0
                    if profiler is not None:
                        profiler.stop()
                        ctx.out_dir.mkdir(parents=True, exist_ok=True)
                        (ctx.out_dir / "ingest-profile.txt").write_text(
                            profiler.output_text(unicode=True, color=False, show_all=False)
                        )
                    if i % 2 == 1:
                        v, b_s = bare(part_texts)
                    vectors.append(v)
                    n = ix.stats.embedded - embedded
                    per_round.append(
                        {"chunks": n, "pipeline_cps": round(n / p_s, 2),
                         "bare_cps": round(len(part_texts) / b_s, 2),
                         "ratio": round((n / p_s) / (len(part_texts) / b_s), 3),
                         "profiled": profiled}
                    )  # fmt: skip
                    log.info("ingest round %d: %s", i + 1, per_round[-1])
                    if not profiled:
                        pipeline_s += p_s
                        bare_s += b_s
                        chunks += n
                        bare_chunks += len(part_texts)
                        embed_s += counting.seconds - encode_s
                        services_s += svc_s
                        own_s += my_s
            stats = ix.stats
        finally:
            ix.close()
        ctx.memo.put(texts, np.concatenate(vectors))

        # Retrieval on the pipeline's own index (hybrid search, live filter).
        searcher = Searcher(s, embedder, ix.store)
        queries = _queries(records, recall_queries)
        found = 0
        for doc_id, q in queries:
            hits = searcher.search(q, tenant="default", k=K)
            found += any(h.doc_id == doc_id for h in hits)
        pipeline_recall = found / len(queries) if queries else None

    pipeline_cps = chunks / pipeline_s
    bare_cps = bare_chunks / bare_s
    compared = _variants(ctx, embedder, records, sample, every=variants == "all")
    figures = {
        "corpus": "tldr snapshot",
        "embedder": embedder.variant,
        "docs": len(records),
        "chunks": chunks,
        "bare_chunks": bare_chunks,
        "chunks_indexed": stats.embedded,
        "batch_size": bs,
        "pipeline_s": round(pipeline_s, 2),
        "bare_s": round(bare_s, 2),
        "publish_s": round(publish_s, 2),
        "pipeline_cps": round(pipeline_cps, 2),
        "bare_cps": round(bare_cps, 2),
        "ratio": round(pipeline_cps / bare_cps, 3),
        # Same calls, same clock: the pipeline's own share of time spent embedding. Immune to
        # load swings between the bare and the pipeline passes, unlike `ratio`.
        "embed_s": round(embed_s, 2),
        "embed_share": round(embed_s / pipeline_s, 3),
        # Where the CPU went while the pipeline ran (2 cores = 2 CPU-seconds per second).
        # None when Kafka and Milvus are remote: their CPU is not this machine's to count.
        "services_cpu_s": round(services_s, 2) if services.procs else None,
        "pipeline_process_cpu_s": round(own_s, 2),
        "services_cpu_share": (
            round(services_s / (services_s + own_s), 3) if services.procs and own_s else None
        ),
        "rounds": per_round,
        "indexer_batches": stats.batches,
        "embed_calls": counting.calls,
        f"pipeline_recall_at_{K}": pipeline_recall,
        "recall_queries": len(queries),
        "variants": compared,
    }
    write_result(ctx, NAME, figures, started)
    return figures


def _profiler() -> Any:
    from pyinstrument import Profiler

    p = Profiler(interval=0.005)
    p.start()
    return p


def _queries(records: list[Any], n: int) -> list[tuple[str, str]]:
    """(doc_id, description line) of every len/n-th page that has one."""
    found = [(r.doc_id, d) for r in records if r.text and (d := description(r.text))]
    step = max(1, len(found) // max(1, n))
    return found[::step][:n]


VARIANTS = (
    ("torch", "fp32", 0, 1),
    ("torch", "int8", 0, 1),
    ("onnx", "fp32", 0, 1),
    ("onnx", "int8", 0, 1),
    ("onnx", "int8", 1, 1),
    ("onnx", "int8", 1, 2),
    ("openvino", "fp32", 0, 1),
    ("openvino", "int8", 0, 1),
)  # (backend, precision, intra-op threads (0: the backend's default), concurrent streams)
SLICE = 64  # one slice = one indexer embed call at the default batch size


def _variants(
    ctx: BenchContext, embedder: Any, records: list[Any], sample: int, *, every: bool = True
) -> dict[str, Any]:
    """Bare throughput and quality of every embedder variant on one sample, side by side.

    Without `every` (quick runs), only torch fp32 and the configured variant.

    The sample is whole pages (all their chunks), so each page's description query has its
    page among the candidates.
    """
    from concurrent.futures import ThreadPoolExecutor

    from index.chunker import chunk_document
    from index.embedder import Embedder

    pages: list[tuple[str, str]] = []  # (doc_id, embed_text)
    queries: list[tuple[str, str]] = []
    step = max(1, len(records) // max(1, sample))
    for r in records[::step]:
        if len(pages) >= sample:
            break
        chunks = chunk_document(
            "default", r.doc_id, r.text or "", count_tokens=embedder.count_tokens,
            target_tokens=200, max_tokens=embedder.max_tokens - 2,
        )  # fmt: skip
        pages += [(r.doc_id, c.embed_text) for c in chunks]
        if d := description(r.text or ""):
            queries.append((r.doc_id, d))
    texts = [t for _, t in pages]
    owners = np.array([d for d, _ in pages])
    s = ctx.settings

    models: dict[str, tuple[Embedder, int]] = {}
    out: dict[str, Any] = {"sample_chunks": len(texts), "sample_queries": len(queries)}
    configured = (s.embed_backend, s.embed_precision, 0, 1)
    for backend, precision, threads, streams in VARIANTS:
        if not every and (backend, precision, threads, streams) not in (VARIANTS[0], configured):
            continue
        key = f"{backend}_{precision}" + (f"_{threads}thread" if threads else "")
        key += f"_x{streams}" if streams > 1 else ""
        try:
            loaded = Embedder(
                s.embedder, backend=backend, precision=precision, batch_size=s.embed_batch_size,
                cache_dir=s.cache_dir, threads=threads,
            )  # fmt: skip
            loaded.encode(texts[:8])  # warm-up (first calls allocate); not counted
            models[key] = (loaded, streams)
        except Exception as exc:  # e.g. openvino not installed
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}

    def encode(model: Embedder, streams: int, part: list[str]) -> np.ndarray:
        if streams == 1:
            return model.encode(part)
        # Concurrent calls on one session: onnxruntime runs them side by side.
        halves = [part[i::streams] for i in range(streams)]
        with ThreadPoolExecutor(streams) as pool:
            done = list(pool.map(model.encode, halves))
        v = np.zeros((len(part), model.dim), dtype=np.float32)
        for i, h in enumerate(done):
            v[i::streams] = h
        return v

    seconds = dict.fromkeys(models, 0.0)
    vectors: dict[str, list[np.ndarray]] = {k: [] for k in models}
    keys = list(models)
    for n, lo in enumerate(range(0, len(texts), SLICE)):
        part = texts[lo : lo + SLICE]
        for key in keys[n % len(keys) :] + keys[: n % len(keys)]:  # rotated order
            model, streams = models[key]
            t0 = time.perf_counter()
            vectors[key].append(encode(model, streams, part))
            seconds[key] += time.perf_counter() - t0
    reference = np.concatenate(vectors["torch_fp32"]) if "torch_fp32" in vectors else None
    base_cps = None
    for key, (model, _) in models.items():
        v = np.concatenate(vectors[key])
        q = model.encode([x for _, x in queries])
        top = np.argsort(-(q @ v.T), axis=1)[:, :K]
        hits = [d in set(owners[row]) for (d, _), row in zip(queries, top, strict=True)]
        cps = len(texts) / seconds[key]
        base_cps = base_cps or (cps if key == "torch_fp32" else None)
        out[key] = {
            "cps": round(cps, 2),
            f"dense_recall_at_{K}": round(float(np.mean(hits)), 3) if hits else None,
            # How far a variant's vectors are from torch fp32's: 1.0 means the same index.
            "cos_to_fp32": (
                round(float(np.mean(np.sum(v * reference, axis=1))), 4)
                if reference is not None else None
            ),
            "x_torch_fp32": round(cps / base_cps, 2) if base_cps else None,
        }  # fmt: skip
    return out
