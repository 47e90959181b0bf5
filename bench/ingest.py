"""Bulk ingest: chunks/s through the whole pipeline against bare `SentenceTransformer.encode`.

The tldr snapshot goes through in rounds. In each, the round's pages are published
(acknowledged, not timed), then an indexer that already owns its partitions is timed from its
first poll until it has applied them, and the bare embedder encodes exactly the chunk texts of
those pages with the same batch size, right before or right after (alternating), so a load
change on the shared machine hits both sides alike. Batch sizes, one torch thread and an int8
(dynamically quantised) model are compared on a sample, with dense recall@5 on page-summary
queries, so speed is never bought with quality.
"""

from __future__ import annotations

import copy
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
        return {"docs": 160, "sample": 40, "recall_queries": 40, "rounds": 2}
    return {"docs": None, "sample": 512, "recall_queries": 300, "rounds": 6}


def run(
    ctx: BenchContext, *, docs: int | None, sample: int, recall_queries: int, rounds: int = 2
) -> dict[str, Any]:
    from consumers.indexer import Indexer
    from index.search import Searcher
    from producers.corpus import replay, to_event
    from producers.publisher import DocumentPublisher

    started = time.monotonic()
    snapshot, _ = corpus("tldr")
    records = snapshot[:docs] if docs else snapshot
    embedder = ctx.embedder()
    bs = embedder.batch_size
    st = embedder.model

    def bare(texts: list[str]) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        v = st.encode(
            texts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
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
    variants = _variants(embedder, records, sample)
    figures = {
        "corpus": "tldr snapshot",
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
        "variants": variants,
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


def _variants(embedder: Any, records: list[Any], sample: int) -> dict[str, Any]:
    """Bare throughput per batch size and for an int8 model, with dense recall@K of each.

    The sample is whole pages (all their chunks), so each page's description query has its
    page among the candidates.
    """
    import torch

    from index.chunker import chunk_document

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

    reference: list[np.ndarray] = []

    def measure(model: Any, batch_size: int) -> dict[str, Any]:
        model.encode(texts[:8], batch_size=batch_size, show_progress_bar=False)  # warm-up
        t0 = time.perf_counter()
        v = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        cps = len(texts) / (time.perf_counter() - t0)
        q = model.encode(
            [x for _, x in queries], normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        top = np.argsort(-(q @ v.T), axis=1)[:, :K]
        hits = [d in set(owners[row]) for (d, _), row in zip(queries, top, strict=True)]
        recall = float(np.mean(hits)) if hits else float("nan")
        if not reference:
            reference.append(v)
        # How far a variant's vectors are from fp32's: 1.0 means the same index.
        cos = float(np.mean(np.sum(v * reference[0], axis=1)))
        return {"cps": round(cps, 2), f"dense_recall_at_{K}": round(recall, 3),
                "cos_to_fp32": round(cos, 4)}  # fmt: skip

    st = embedder.model
    out: dict[str, Any] = {"sample_chunks": len(texts), "sample_queries": len(queries)}
    for bs in (32, 64, 128):
        out[f"fp32_bs{bs}"] = measure(st, bs)
    threads = torch.get_num_threads()
    if threads > 1:
        # On a shared machine fewer OpenMP threads than cores can be faster: see query.json.
        torch.set_num_threads(1)
        try:
            out["fp32_bs64_1thread"] = measure(st, 64)
        finally:
            torch.set_num_threads(threads)
    try:
        q8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(st), {torch.nn.Linear}, dtype=torch.qint8
        )
        out["int8_bs64"] = measure(q8, 64)
    except Exception as exc:  # no quantised kernels on this CPU/torch build
        out["int8_bs64"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import onnxruntime  # noqa: F401

        out["onnx"] = "onnxruntime installed but not measured"
    except ImportError:
        out["onnx"] = "not measured: onnxruntime/optimum are not installed"
    return out
