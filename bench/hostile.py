"""Hostile input through the whole indexer: each class's outcome, and other tenants meanwhile.

An indexer runs in a thread against the real broker and Milvus with the default limits
(`chunk_budget_s`, `max_doc_chunks`, `max_text_bytes`). Each input class is published for
tenant `hostile`, one at a time, while a steady stream of small documents of tenant `other`
goes on (one every `other_every_s`). Reported per class: its size, the seconds from its
acknowledged publish until the indexer committed past it, the outcome (indexed with N chunks,
deleted, or dead-lettered with the stage and reason), and the slowest publish-to-applied
latency of tenant `other`'s documents published while the class was in hand.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import BenchContext, BenchError, scoped, wait_caught_up, write_result

log = logging.getLogger(__name__)

NAME = "hostile"
MB = 1_000_000
CLASS_TIMEOUT_S = 900.0


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"size": 200_000, "ordinary_size": 20_000, "largest_chunks": 300}
    # Hostile classes at the largest size the limits allow; the ordinary document and the
    # largest chunk count are embedded, which is what costs (minutes on 2 busy cores).
    return {"size": 1_990_000, "ordinary_size": 100_000, "largest_chunks": 1_600}


def _prose(i: int) -> str:
    return f"The river carries water from the hills to the sea, in season {i}. "


def _ordinary(size: int) -> str:
    """Markdown as people write it: a heading every ~2 KB of paragraphs."""
    return _fill(lambda i: (f"\n\n## Section {i // 30}\n\n" if i % 30 == 0 else "")
                 + _prose(i) + ("\n\n" if i % 6 == 5 else ""), size)  # fmt: skip


def _fill(unit: Callable[[int], str], size: int) -> str:
    parts, n, i = [], 0, 0
    while n < size:
        parts.append(unit(i))
        n += len(parts[-1])
        i += 1
    return "".join(parts)[:size]


def _sections(n: int) -> str:
    """About `n` chunks: sections of a few words (the chunker keeps sections apart)."""
    return "# Largest\n\n" + "".join(f"## Part {i}\n\nitem {i} of the long list.\n\n"
                                      for i in range(n))  # fmt: skip


def classes(
    size: int, ordinary_size: int, largest_chunks: int, max_text: int
) -> dict[str, tuple[str, Any]]:
    """name -> (what it is, text | (key, raw value))."""
    raw = random.Random(11).randbytes(size * 3 // 4)
    return {
        "ordinary": ("ordinary Markdown (baseline)", _ordinary(ordinary_size)),
        "tiny-sections": ("`# h<i>` headings", _fill(lambda i: f"# h{i}\n", size)),
        "one-line-sections": (
            "`## Part i` sections of one line",
            _fill(lambda i: f"## Part {i}\n\nline {i}\n\n", size),
        ),
        "heading-spaces": ("one heading of spaces", "# a" + " " * (size - 5) + " #"),
        "data-uri": (
            "one base64 image (a word without whitespace)",
            "![i](data:image/png;base64," + base64.b64encode(raw).decode()[: size - 40] + ")",
        ),
        "largest-allowed": (
            f"{largest_chunks:,} chunks: past one state row's list, paged",
            _sections(largest_chunks),
        ),
        "over-size-limit": ("text over max_text_bytes", "x" * (max_text + 1)),
        "not-json": ("bytes that are not JSON", (None, b"\xff\xfe not json {")),
        "tombstone": ("a null value under the ordinary document's key", (None, None)),
    }


class _Other(threading.Thread):
    """Publishes tenant `other`'s documents steadily (one every `every_s`, whether or not the
    previous one is applied yet); records (published, applied) times of each."""

    def __init__(self, settings: Any, every_s: float) -> None:
        super().__init__(name="bench-other", daemon=True)
        self.settings, self.every_s = settings, every_s
        self.samples: list[tuple[float, float]] = []
        self.pending: list[tuple[float, int, int]] = []  # (published, partition, offset)
        self.stop = threading.Event()

    def run(self) -> None:
        from headwater.progress import Progress
        from producers.publisher import DocumentPublisher

        i = 0
        with DocumentPublisher(self.settings) as pub, Progress(self.settings) as progress:
            while not self.stop.is_set():
                t0 = time.monotonic()
                token = pub.upsert(f"other-{i % 50}.md", _ordinary(400 + i % 7), tenant="other")
                self.pending += [(t0, part, off) for part, off in token.items()]
                applied = progress.applied_offsets()
                now = time.monotonic()
                done = [x for x in self.pending if applied.get(x[1], 0) > x[2]]
                self.samples += [(t, now) for t, _, _ in done]
                self.pending = [x for x in self.pending if x not in done]
                i += 1
                self.stop.wait(max(0.0, self.every_s - (time.monotonic() - t0)))

    def worst_between(self, start: float, end: float) -> float | None:
        """The slowest of `other`'s documents in hand at some point of [start, end]."""
        mine = [b - a for a, b in self.samples if a <= end and b >= start]
        mine += [end - a for a, _, _ in self.pending if a <= end]  # not applied yet
        return round(max(mine), 2) if mine else None


def run(
    ctx: BenchContext,
    size: int,
    ordinary_size: int,
    largest_chunks: int,
    other_every_s: float = 1.0,
) -> dict:
    from consumers.indexer import Indexer
    from headwater.events import DocumentEvent
    from headwater.progress import Progress
    from headwater.runtime.clients import producer
    from headwater.runtime.deadletter import DeadLetter
    from headwater.runtime.reader import read_to_end
    from headwater.tokens import FreshnessToken
    from index.store import doc_key

    started = time.monotonic()
    embedder = ctx.embedder()
    rows = []
    with scoped(ctx.settings, NAME, tenants=["hostile", "other"]) as s:
        ix = Indexer(s, embedder=embedder)
        stop = threading.Event()
        worker = threading.Thread(target=ix.run, args=(stop,), name="bench-indexer", daemon=True)
        worker.start()
        other = _Other(s, other_every_s)
        other.start()
        p = producer(s)
        try:
            for name, (what, body) in classes(
                size, ordinary_size, largest_chunks, s.max_text_bytes
            ).items():
                doc_id = "ordinary.md" if name == "tombstone" else f"{name}.md"
                key = doc_key("hostile", doc_id)
                if isinstance(body, tuple):
                    value = body[1]
                else:
                    # Built by hand: the event schema itself refuses the over-size text.
                    event = DocumentEvent(tenant="hostile", doc_id=doc_id, op="upsert", text="-")
                    value = json.dumps(event.model_dump(mode="json") | {"text": body}).encode()
                t0 = time.monotonic()
                meta = p.send(s.documents_topic, key=f"hostile/{doc_id}".encode(),
                              value=value).get(timeout=60)  # fmt: skip
                token = FreshnessToken({meta.partition: meta.offset})
                with Progress(s) as progress:
                    while not progress.is_applied(token):
                        if not worker.is_alive():
                            raise BenchError("the indexer thread died (see the log above)")
                        if time.monotonic() - t0 > CLASS_TIMEOUT_S:
                            raise BenchError(f"{name}: not applied in {CLASS_TIMEOUT_S:.0f} s")
                        time.sleep(0.05)
                took = time.monotonic() - t0
                letters = [
                    DeadLetter.from_record(r)
                    for r in read_to_end(s, s.dlq_topic, timeout_s=60, client_id="bench-hostile")
                ]
                at = (meta.partition, meta.offset)
                mine = [d for d in letters if (d.partition, d.offset) == at]
                state = ix.store.doc_states([key]).get(key)
                if mine:
                    outcome = f"dead-lettered ({mine[0].stage}): {mine[0].error}"
                elif state is not None and state.deleted:
                    outcome = "deleted"
                elif state is not None:
                    outcome = f"indexed: {len(state.chunk_ids):,} chunks"
                else:
                    outcome = "not applied (?)"
                row = {
                    "class": name, "what": what, "bytes": len(value or b""),
                    "seconds": round(took, 2), "outcome": outcome[:300],
                    "other_tenant_worst_s": other.worst_between(t0, t0 + took),
                }  # fmt: skip
                log.info("hostile %s", row)
                worst = row["other_tenant_worst_s"]
                print(
                    f"   {name}: {row['bytes']:,} B, {row['seconds']} s, "
                    f"{row['outcome'][:90]}; other tenant worst {worst} s",
                    flush=True,
                )
                rows.append(row)
            wait_caught_up(s, 120, worker)
        finally:
            p.close()
            other.stop.set()
            other.join(60)
            stop.set()
            worker.join(120)
            ix.close()
    figures = {
        "params": {
            "size": size,
            "ordinary_size": ordinary_size,
            "largest_chunks": largest_chunks,
            "other_every_s": other_every_s,
        },
        "limits": {
            "chunk_budget_s": s.chunk_budget_s,
            "max_doc_chunks": s.max_doc_chunks,
            "max_text_bytes": s.max_text_bytes,
        },
        "classes": rows,
        "other_tenant_samples": len(other.samples),
        "other_tenant_worst_s": max((b - a for a, b in other.samples), default=None),
    }
    write_result(ctx, NAME, figures, started)
    return figures
