"""Test helpers for the indexing pipeline on the real broker and Milvus Lite."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

from consumers.indexer import Indexer
from consumers.truth import read_documents_topic
from headwater.events import DocumentEvent
from headwater.runtime.clients import producer
from headwater.settings import Settings
from index.verify import Report, expected_index, verify

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def drain(ix: Indexer, timeout: float = 120.0) -> None:
    """Run the indexer until it has consumed and committed everything on its topic now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ix.run_once()
        assigned = ix.consumer.assignment()
        if not assigned or ix.pending:
            continue
        end = ix.consumer.end_offsets(list(assigned))
        if len(assigned) == ix.settings.partitions and all(
            ix.consumer.position(tp) >= end[tp] for tp in assigned
        ):
            return
    raise TimeoutError("indexer did not catch up")


def send(settings: Settings, events: list[DocumentEvent | tuple[bytes | None, bytes]]) -> None:
    """Put events (or raw key/value pairs) on the documents topic, acknowledged."""
    p = producer(settings)
    try:
        for e in events:
            if isinstance(e, DocumentEvent):
                p.send(settings.documents_topic, key=e.key, value=e.to_bytes())
            else:
                p.send(settings.documents_topic, key=e[0], value=e[1])
        p.flush(timeout=60)
    finally:
        p.close()


def check_truth(ix: Indexer) -> Report:
    expected = expected_index(read_documents_topic(ix.settings), ix.writer.chunk)
    return verify(ix.store, expected)


def corpus_records(name: str, limit: int | None = None) -> Iterator[dict]:
    """Records of a shared corpus in seq order (raw dicts)."""
    files = sorted((CORPORA / name).glob("*.jsonl.gz"))
    rows: list[dict] = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh)
    rows.sort(key=lambda r: r["seq"])
    yield from rows[:limit] if limit else rows


def corpus_event(rec: dict, tenant: str = "default") -> DocumentEvent:
    return DocumentEvent(
        tenant=tenant,
        doc_id=rec["doc_id"],
        op=rec["op"],
        version=int(rec["seq"]),
        text=rec["text"] if rec["op"] == "upsert" else None,
        source="corpus",
    )
