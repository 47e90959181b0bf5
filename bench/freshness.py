"""Freshness: seconds from a publish being acknowledged to the first search that sees it.

An indexer runs in a thread against the real broker and Milvus. The tldr snapshot is loaded in
bulk first (not timed; vectors already computed in this run are reused for it), then the edit
history is replayed through `DocumentPublisher` at a steady rate, one acknowledged publish at a
time. A checker polls the document states of every pending event: an upsert is visible once
its document's live version reaches the event's (search reads through that state, so it is the
moment a search returns the new text), a delete once the tombstone is there. Every Nth upsert
(when no other sample is pending) is also confirmed by a real search for its page's summary
line, timed the same way.

With `lora` > 0, a LoRA refresh on that many new examples (the lora benchmark's job, in its own
process as the scheduler runs it: niced, its thread share, paused while the indexer lags) starts
half-way through the timed replay: the first half is the same-run baseline without training,
the second half measures freshness while training competes for the cores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (
    BenchContext,
    BenchError,
    CountingEmbedder,
    corpus,
    description,
    percentiles,
    plot,
    scoped,
    wait_caught_up,
    write_result,
)

log = logging.getLogger(__name__)

NAME = "freshness"
POLL_S = 0.02
# One sampled search in flight at a time, polling every 0.2 s: searches embed and hit Milvus on
# the indexer's cores, and one loop per sample let a backlog breed more loops (observer effect).
SEARCH_POLL_S = 0.2
VISIBLE_TIMEOUT_S = 120.0


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"events": 150, "rate": 5.0, "sample_every": 10, "snapshot": "touched", "lora": 0}
    return {"events": None, "rate": 20.0, "sample_every": 25, "snapshot": "all", "lora": 0}


@dataclass
class _Pending:
    n: int
    key: str
    doc_id: str
    op: str
    version: int
    sent: float
    acked: float
    seen: float | None = None


def run(
    ctx: BenchContext, *, events: int | None, rate: float, sample_every: int,
    snapshot: str = "all", lora: int = 0,
) -> dict:  # fmt: skip
    from consumers.indexer import Indexer
    from index.embedder import load_embedder
    from index.search import Searcher
    from index.store import ChunkStore, doc_key
    from producers.corpus import replay, to_event
    from producers.publisher import DocumentPublisher

    started = time.monotonic()
    if snapshot not in ("all", "touched"):
        raise BenchError(f"snapshot must be 'all' or 'touched', not {snapshot!r}")
    pages, history = corpus("tldr")
    history = history[:events] if events else history
    if snapshot == "touched":
        # Only the pages the replayed events touch need to exist beforehand.
        touched = {r.doc_id for r in history}
        pages = [r for r in pages if r.doc_id in touched]
    embedder = CountingEmbedder(ctx.embedder(), ctx.memo)

    with scoped(ctx.settings, NAME) as s:
        stop = threading.Event()
        ix = Indexer(s, embedder=embedder)
        worker = threading.Thread(target=ix.run, args=(stop,), name="bench-indexer", daemon=True)
        worker.start()
        try:
            with DocumentPublisher(s) as pub:
                t0 = time.monotonic()
                replay(pub, pages, tenant="default")
                wait_caught_up(s, timeout=7200, worker=worker)
                snapshot_s = time.monotonic() - t0
                embedder.use_memo = False  # from here on every chunk is embedded for real
                # With a LoRA refresh: the first half of the history is replayed alone (the
                # same-run baseline), the second half while the refresh runs.
                half = len(history) // 2 if lora else 0
                baseline = None
                if half:
                    alone = _replay_timed(s, pub, history[:half], rate, sample_every, to_event,
                                          doc_key, ChunkStore, Searcher, load_embedder,
                                          embedder, worker)  # fmt: skip
                    baseline = _latencies(alone)
                before = ix.stats.embedded
                training = _Training(s, lora) if lora else None
                timed = _replay_timed(s, pub, history[half:], rate, sample_every, to_event,
                                      doc_key, ChunkStore, Searcher, load_embedder, embedder,
                                      worker)  # fmt: skip
                embedded = ix.stats.embedded - before
                trained = training.result() if training else None
        finally:
            stop.set()
            worker.join(timeout=120)

    pending, searches, _, publish_ms = timed
    lat = [p.seen - p.acked for p in pending if p.seen is not None]
    lat_sent = [p.seen - p.sent for p in pending if p.seen is not None]
    figures = {
        "corpus": "tldr",
        "snapshot_docs": len(pages),
        "snapshot": snapshot,
        "snapshot_load_s": round(snapshot_s, 1),
        **_latencies(timed),
        "upserts": sum(p.op == "upsert" for p in pending),
        "deletes": sum(p.op == "delete" for p in pending),
        "visible": len(lat),
        "rate_target_eps": rate,
        "from_send_p99_s": round(percentiles(lat_sent)["p99"], 3),
        "publish_ack_p50_ms": round(percentiles(publish_ms)["p50"], 2),
        "search_confirmed": len(searches),
        "search_p50_s": round(percentiles(searches)["p50"], 3),
        "chunks_embedded": embedded,
        "chunks_per_event": round(embedded / max(1, len(pending)), 3),
        "batch_max_ms": ctx.settings.batch_max_ms,
        "batch_max_events": ctx.settings.batch_max_events,
        "embedder": getattr(embedder, "variant", None),
        "coalesced": ix.stats.coalesced,
        "indexer_batches": ix.stats.batches,
        "lora_during_replay": trained,
        "without_training": baseline,
    }
    write_result(ctx, NAME, figures, started)
    _plot(ctx, lat, searches, figures)
    return figures


def _latencies(timed: tuple[list[_Pending], list[float], float, list[float]]) -> dict[str, Any]:
    """Seconds from ack to visible of one timed replay: the figures both halves report."""
    pending, searches, held_rate, _ = timed
    pct = percentiles([p.seen - p.acked for p in pending if p.seen is not None])
    return {
        "events": len(pending),
        "never_visible": sum(p.seen is None for p in pending),
        "rate_eps": round(held_rate, 2),
        **{f"{k}_s": round(pct[k], 3) for k in ("p50", "p95", "p99", "max", "mean")},
        "search_p99_s": round(percentiles(searches)["p99"], 3),
    }


class _Training:
    """A LoRA refresh running next to the replay: started now, joined with `result`."""

    def __init__(self, s: Any, n: int) -> None:
        from bench import lora

        pool = lora.examples(n + 24)
        held, buffer, new = pool[:4], pool[4:24], pool[24:]
        self.started = time.monotonic()
        self.out: dict[str, Any] = {}

        def run() -> None:
            from trainer.freshness import Backlog

            backlog = Backlog(s)  # what the trainer service consults: freshness first
            try:
                self.out = lora.refresh(s, "v0001-fresh", new, buffer, held, [],
                                        hold=backlog.hold)  # fmt: skip
            except Exception as exc:  # reported in the figures, not fatal to the replay
                self.out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            finally:
                backlog.close()
            self.out["finished_after_s"] = round(time.monotonic() - self.started, 1)

        self.thread = threading.Thread(target=run, name="bench-lora", daemon=True)
        self.thread.start()

    def result(self) -> dict[str, Any]:
        """The run's figures, with the replay's length to compare its duration with."""
        replay_s = time.monotonic() - self.started
        self.thread.join()
        return self.out | {"replay_s": round(replay_s, 1)}


def _replay_timed(
    s: Any, pub: Any, history: list[Any], rate: float, sample_every: int, to_event: Any,
    doc_key: Any, ChunkStore: Any, Searcher: Any, load_embedder: Any, embedder: Any,
    worker: threading.Thread,
) -> tuple[list[_Pending], list[float], float, list[float]]:  # fmt: skip
    pending: list[_Pending] = []
    waiting: dict[int, _Pending] = {}
    lock = threading.Lock()
    done = threading.Event()
    store = ChunkStore(s, embedder.model_id, embedder.dim)  # own client: no lock shared
    # The searches that confirm samples get their own model instance, as a gateway process
    # would: sharing the indexer's would queue each query behind a whole embedding batch.
    searcher = Searcher(s, load_embedder(s), ChunkStore(s, embedder.model_id, embedder.dim))
    searches: list[float] = []
    search_threads: list[threading.Thread] = []

    def check() -> None:
        while not (done.is_set() and not waiting):
            with lock:
                todo = list(waiting.values())
            if todo:
                # Version and tombstone only: parsing the chunk ids of a backlog of hundreds
                # 50 times a second took the indexer's CPU (and GIL) from under it.
                states = store.doc_versions(p.key for p in todo)
                now = time.monotonic()
                with lock:
                    for p in todo:
                        st = states.get(p.key)
                        if st is None or st[0] < p.version:
                            continue
                        if p.op == "upsert" or st[1] or st[0] > p.version:
                            p.seen = now
                            waiting.pop(p.n, None)
            time.sleep(POLL_S)

    def confirm(p: _Pending, query: str) -> None:
        deadline = p.acked + VISIBLE_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                hits = searcher.search(query, tenant="default", k=10)
                if any(h.doc_id == p.doc_id and h.version >= p.version for h in hits):
                    searches.append(time.monotonic() - p.acked)
                    return
            time.sleep(SEARCH_POLL_S)

    checker = threading.Thread(target=check, name="bench-checker", daemon=True)
    checker.start()
    publish_ms: list[float] = []
    t_start = time.monotonic()
    first = last = t_start
    upserts = 0
    for n, record in enumerate(history):
        if not worker.is_alive():
            done.set()
            raise BenchError("the indexer thread died during the timed replay (see the log)")
        due = t_start + n / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        event = to_event(record, "default")
        sent = time.monotonic()
        pub.publish(event)
        acked = time.monotonic()
        publish_ms.append((acked - sent) * 1000)
        first = sent if n == 0 else first
        last = sent
        p = _Pending(n, doc_key("default", event.doc_id), event.doc_id, event.op,
                     event.version, sent, acked)  # fmt: skip
        with lock:
            pending.append(p)
            waiting[n] = p
        if event.op == "upsert":
            upserts += 1
            query = description(event.text or "")
            busy = bool(search_threads) and search_threads[-1].is_alive()  # one at a time
            if query and upserts % sample_every == 0 and not busy:
                t = threading.Thread(target=confirm, args=(p, query), daemon=True)
                t.start()
                search_threads.append(t)
    done.set()
    deadline = time.monotonic() + VISIBLE_TIMEOUT_S
    while waiting and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.1)
    if waiting:
        log.warning("%d events never became visible", len(waiting))
        with lock:
            waiting.clear()
    checker.join(timeout=10)
    for t in search_threads:
        t.join(timeout=VISIBLE_TIMEOUT_S)
    if not pending:
        raise BenchError("no events to replay")
    held = (len(pending) - 1) / (last - first) if last > first else float("nan")
    return pending, searches, held, publish_ms


def _plot(ctx: BenchContext, lat: list[float], searches: list[float], f: dict) -> None:
    import numpy as np

    if not lat:
        return
    plt = plot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for values, label in ((lat, "document state (every event)"),
                          (searches, "real search (sampled upserts)")):  # fmt: skip
        if values:
            xs = np.sort(values)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)
    ax.axvline(2.0, color="grey", ls="--", lw=1, label="target p99 = 2 s")
    ax.set_xscale("log")
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120) if t <= 2 * max(lat)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("seconds from publish acknowledged to visible in search")
    ax.set_ylabel("fraction of events")
    ax.set_title(
        f"Freshness, tldr replay at {f['rate_eps']} events/s "
        f"(p50 {f['p50_s']} s, p99 {f['p99_s']} s, n={f['events']})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "freshness.png", dpi=110)
    plt.close(fig)
