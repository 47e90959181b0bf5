"""Incremental re-embedding: embeddings computed per edit, against two ways of doing without.

The rust-book history (long chapters, small edits) is replayed through the real pipeline, one
event applied at a time (so headwater gets no credit for coalescing a burst of edits), and the
texts the indexer asks the embedder for are counted. In the same run, on the same chunks:

* whole-document baseline: every upsert re-embeds all chunks of the document (counted, not
  computed: the figure is exactly the number of chunks of every upserted version);
* LangChain `index()` with a `SQLRecordManager` (SQLite) and `cleanup="incremental"` over an
  `InMemoryVectorStore`, embedding through a counting wrapper around the same real model.
  Deletes are applied the way a LangChain user must (record-manager keys of the source, then
  `delete` on both), because `index()` never sees a document that no longer exists.

Both systems' vectors come from one memo of real embeddings, so a text is computed once per
run; the counts are of texts each system asked to embed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from bench.common import (
    BenchContext,
    CountingEmbedder,
    corpus,
    index_through,
    join_group,
    plot,
    scoped,
    write_result,
)

log = logging.getLogger(__name__)

NAME = "incremental"
SNAPSHOT_SLICE = 10


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"docs": 4, "window": 300}
    return {"docs": None, "window": None}


def pick(snapshot: list[Any], history: list[Any], docs: int | None, window: int | None):
    """The slice: `docs` chapters edited most in the first `window` events, and those events."""
    history = history[:window] if window else history
    if not docs:
        return snapshot, history
    small = {r.doc_id for r in snapshot if r.text and len(r.text) < 25_000}
    edits = Counter(r.doc_id for r in history if r.doc_id in small)
    chosen = {d for d, _ in edits.most_common(docs)}
    return [r for r in snapshot if r.doc_id in chosen], [r for r in history if r.doc_id in chosen]


def run(ctx: BenchContext, *, docs: int | None, window: int | None) -> dict[str, Any]:
    from consumers.indexer import Indexer
    from producers.corpus import replay, to_event
    from producers.publisher import DocumentPublisher

    started = time.monotonic()
    snapshot, history = pick(*corpus("rust-book"), docs, window)
    embedder = CountingEmbedder(ctx.embedder(), ctx.memo)

    # batch_max_ms=0: one event per batch returns at once instead of waiting to fill a batch.
    with scoped(ctx.settings, NAME, batch_max_ms=0) as s:
        ix = Indexer(s, embedder=embedder)
        hw: dict[str, Any] = {}
        try:
            join_group(ix)
            with DocumentPublisher(s) as pub:
                t0 = time.monotonic()
                # In slices: one batch of 105 long chapters takes longer to embed here than
                # max.poll.interval.ms, and the group would evict the indexer mid-batch.
                for lo in range(0, len(snapshot), SNAPSHOT_SLICE):
                    token = replay(pub, snapshot[lo : lo + SNAPSHOT_SLICE], tenant="default")
                    index_through(ix, token, timeout=3600)
                hw["snapshot"] = embedder.texts
                hw["snapshot_s"] = time.monotonic() - t0
                t0 = time.monotonic()
                for record in history:
                    index_through(ix, pub.publish(to_event(record, "default")), timeout=900)
                hw["events"] = embedder.texts - hw["snapshot"]
                hw["events_s"] = time.monotonic() - t0
            stats = ix.stats
            live = _headwater_live(ix.store)
            consumed = stats.consumed
        finally:
            ix.close()

        chunk = ix.writer.chunk
        whole = {"snapshot": 0, "events": 0}
        # The least any chunk-level scheme must embed: chunks not in the previous live version.
        diff = {"snapshot": 0, "events": 0}
        paragraphs = 0  # paragraphs of the new text not in the old one (edits' own size)
        expected: dict[str, list[Any]] = {}  # doc_id -> chunks of its live version
        texts: dict[str, str] = {}
        for phase, records in (("snapshot", snapshot), ("events", history)):
            for r in records:
                if r.op == "upsert":
                    chunks = chunk(to_event(r, "default"))
                    whole[phase] += len(chunks)
                    before = {c.chunk_id for c in expected.get(r.doc_id, [])}
                    diff[phase] += sum(c.chunk_id not in before for c in chunks)
                    if phase == "events":
                        old = {p.strip() for p in texts.get(r.doc_id, "").split("\n\n")}
                        paragraphs += sum(
                            bool(p.strip()) and p.strip() not in old
                            for p in (r.text or "").split("\n\n")
                        )
                    expected[r.doc_id] = chunks
                    texts[r.doc_id] = r.text or ""
                else:
                    expected.pop(r.doc_id, None)
                    texts.pop(r.doc_id, None)
        lc = _langchain(ctx, embedder.inner, snapshot, history, chunk, to_event)

    expected_ids = {c.chunk_id for cs in expected.values() for c in cs}
    if live["ids"] != expected_ids:
        log.warning(
            "headwater's final index differs from the replayed history: %d stale, %d missing",
            len(live["ids"] - expected_ids), len(expected_ids - live["ids"]),
        )  # fmt: skip
    expected_pairs = {(d, c.embed_text) for d, cs in expected.items() for c in cs}
    figures = {
        "corpus": "rust-book",
        "snapshot_docs": len(snapshot),
        "events": len(history),
        "upserts": sum(r.op == "upsert" for r in history),
        "deletes": sum(r.op == "delete" for r in history),
        "headwater_embeddings": hw["events"],
        "whole_doc_embeddings": whole["events"],
        "langchain_embeddings": lc["events"],
        "chunk_diff_embeddings": diff["events"],
        "changed_paragraphs": paragraphs,
        "ratio_vs_whole_doc": round(hw["events"] / max(1, whole["events"]), 4),
        "ratio_vs_langchain": round(hw["events"] / max(1, lc["events"]), 4),
        "per_event": {
            "headwater": round(hw["events"] / max(1, len(history)), 2),
            "whole_doc": round(whole["events"] / max(1, len(history)), 2),
            "langchain": round(lc["events"] / max(1, len(history)), 2),
        },
        "snapshot_embeddings": {
            "headwater": hw["snapshot"],
            "whole_doc": whole["snapshot"],
            "langchain": lc["snapshot"],
        },
        "seconds": {
            "headwater_snapshot": round(hw["snapshot_s"], 1),
            "headwater_events": round(hw["events_s"], 1),
            "langchain_events": round(lc["events_s"], 1),
        },
        "indexer": {
            "embedded": stats.embedded,
            "reused": stats.reused,
            "removed": stats.removed,
            "stale": stats.stale,
            "coalesced": stats.coalesced,
            "consumed": consumed,
            "published": len(snapshot) + len(history),
        },
        "final": {
            "expected_live_chunks": len(expected_ids),
            "headwater_chunks": live["rows"],
            "headwater_stale_rows": len(live["ids"] - expected_ids),
            "headwater_missing": len(expected_ids - live["ids"]),
            "headwater_duplicates": live["rows"] - len(live["ids"]),
            "langchain_expected": len(expected_pairs),
            "langchain_chunks": lc["size"],
            "langchain_stale_rows": len(lc["pairs"] - expected_pairs),
            "langchain_missing": len(expected_pairs - lc["pairs"]),
            "langchain_duplicates": lc["size"] - len(lc["pairs"]),
            "langchain_record_manager_keys": lc["keys"],
        },
        "langchain": lc["what"],
        "memo_computed": ctx.memo.computed,
    }
    write_result(ctx, NAME, figures, started)
    _plot(ctx, figures)
    return figures


def _headwater_live(store: Any) -> dict[str, Any]:
    ids = [r["chunk_id"] for r in store.iter_chunks()]
    return {"rows": len(ids), "ids": set(ids)}


def _langchain(
    ctx: BenchContext, model: Any, snapshot: list[Any], history: list[Any], chunk: Any,
    to_event: Any,
) -> dict[str, Any]:  # fmt: skip
    from langchain_classic.indexes import SQLRecordManager, index
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    memo = ctx.memo

    class Counting(Embeddings):
        """The real model behind LangChain's interface, counting the texts it embeds."""

        texts = 0

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            Counting.texts += len(texts)
            return memo.encode(model, texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return model.encode([text])[0].tolist()

    db = ctx.settings.data_dir / "langchain-records.sqlite"
    db.unlink(missing_ok=True)
    rm = SQLRecordManager("headwater-bench/rust-book", db_url=f"sqlite:///{db}")
    rm.create_schema()
    store = InMemoryVectorStore(embedding=Counting())

    def apply(r: Any) -> None:
        if r.op == "upsert":
            docs = [
                Document(page_content=c.embed_text, metadata={"source": r.doc_id})
                for c in chunk(to_event(r, "default"))
            ]
            index(docs, rm, store, cleanup="incremental", source_id_key="source")
        else:
            keys = rm.list_keys(group_ids=[r.doc_id])
            if keys:
                store.delete(keys)
                rm.delete_keys(keys)

    for r in snapshot:
        apply(r)
    snap = Counting.texts
    t0 = time.monotonic()
    for r in history:
        apply(r)
    events_s = time.monotonic() - t0
    pairs = [(v["metadata"]["source"], v["text"]) for v in store.store.values()]
    return {
        "snapshot": snap,
        "events": Counting.texts - snap,
        "events_s": events_s,
        "size": len(store.store),
        "pairs": set(pairs),
        "keys": len(rm.list_keys()),
        "what": "langchain_classic.indexes.index + SQLRecordManager(sqlite) + InMemoryVectorStore, "
        'cleanup="incremental", source_id_key="source"',
    }


def _plot(ctx: BenchContext, f: dict[str, Any]) -> None:
    plt = plot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = ["headwater", "LangChain index()\n+ SQLRecordManager", "whole document"]
    values = [f["headwater_embeddings"], f["langchain_embeddings"], f["whole_doc_embeddings"]]
    bars = ax.barh(names[::-1], values[::-1], color=["#999", "#7a9cc6", "#2a7"])
    ax.bar_label(bars, labels=[f"{v:,}" for v in values[::-1]], padding=3)
    ax.set_xlabel(f"chunk embeddings for {f['events']:,} edit events (rust-book)")
    ax.set_title(
        f"Re-embedding per edit: headwater = {f['ratio_vs_whole_doc']:.3f} x whole-document"
    )
    ax.set_xlim(0, max(values) * 1.18 or 1)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "incremental.png", dpi=110)
    plt.close(fig)
