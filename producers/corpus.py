"""Replayable document-change corpora: read them and replay them through a publisher.

A corpus is one or more gzip JSONL files (`seq, ts, commit, op, doc_id, text` per line): the
snapshot first, then the edit history, ordered by `seq`. See /work/shared/corpora/README.md.
"""

from __future__ import annotations

import gzip
import heapq
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import IO

from pydantic import ValidationError

import headwater
from headwater.errors import CorpusError
from headwater.events import DocumentEvent
from headwater.tokens import FreshnessToken
from producers.publisher import DocumentPublisher

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = Path(headwater.__file__).resolve().parent / "sample"  # package data
BATCH_SIZE = 500
# At most this much missed schedule is made up in a burst after a stall; beyond it the rate
# restarts, so a paused replay does not flood the indexer when it resumes.
MAX_CATCH_UP_S = 1.0


@dataclass(frozen=True, slots=True)
class CorpusRecord:
    seq: int
    ts: datetime
    commit: str
    op: str
    doc_id: str
    text: str | None


def default_corpus_dir(name: str) -> Path:
    """The shared corpus `../shared/corpora/<name>` next to the repo, else the bundled sample."""
    shared = REPO.parent / "shared" / "corpora" / name
    if shared.is_dir() and any(shared.glob("*.jsonl.gz")):
        return shared
    sample = SAMPLE_DIR / f"{name}-sample.jsonl.gz"
    if sample.is_file():
        return sample
    raise CorpusError(f"no corpus named {name!r}: neither {shared} nor {sample} exists")


def corpus_files(path: Path) -> list[Path]:
    """The JSONL files of a corpus folder (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"corpus {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl.gz", ".jsonl")))
    if not files:
        raise CorpusError(f"corpus folder {path} has no *.jsonl.gz files")
    return files


def read_corpus(path: Path, limit: int | None = None) -> Iterator[CorpusRecord]:
    """Records of a corpus folder or file in `seq` order (the files are merged); first `limit`."""
    if limit is not None and limit < 0:
        raise CorpusError(f"limit must be >= 0, not {limit}")
    streams = [_read_file(f) for f in corpus_files(path)]
    merged = heapq.merge(*streams, key=lambda r: r.seq)
    return islice(merged, limit)


def count_records(path: Path) -> int:
    """Number of records (lines) in a corpus, without parsing them (for progress bars)."""
    total = 0
    for file in corpus_files(path):
        with _open(file) as fh:
            total += sum(1 for line in fh if line.strip())
    return total


def to_event(record: CorpusRecord, tenant: str, source: str = "corpus") -> DocumentEvent:
    """The document event for one record; the doc_id is kept exactly as the corpus gives it.

    The version is `seq + 1`: `seq` grows along the history, so a document's later edits always
    win, and replaying the same corpus again produces the same versions (an idempotent replay).
    The record's commit and time go to metadata; the event's own `ts` is the publish time.
    """
    try:
        return DocumentEvent(
            tenant=tenant,
            doc_id=record.doc_id,
            op=record.op,  # type: ignore[arg-type]
            version=record.seq + 1,
            text=record.text,
            metadata={"commit": record.commit, "ts": record.ts.isoformat()},
            source=source,
        )
    except ValidationError as exc:
        reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise CorpusError(f"record seq {record.seq} ({record.doc_id!r}): {reason}") from exc


def replay(
    publisher: DocumentPublisher,
    records: Iterable[CorpusRecord],
    rate: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    *,
    tenant: str | None = None,
    source: str = "corpus",
) -> FreshnessToken:
    """Publish `records` in order; returns the token covering all of them.

    Without `rate` events go out in batches of `BATCH_SIZE` (send all, then await the acks).
    With `rate` (events per second) they go out on a steady schedule in small batches.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s, not {rate}")
    tenant = publisher.settings.default_tenant if tenant is None else tenant
    events = (to_event(r, tenant, source) for r in records)
    token = FreshnessToken()
    if rate is None:
        while batch := list(islice(events, BATCH_SIZE)):
            token = token.merge(publisher.publish_many(batch, on_progress))
        return token
    # Small batches (~50 ms worth) keep the rate steady without one ack round trip per event.
    per_batch = max(1, min(BATCH_SIZE, round(rate * 0.05)))
    start = time.monotonic()
    sent = 0
    while batch := list(islice(events, per_batch)):
        due = start + sent / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > MAX_CATCH_UP_S:
            start, sent = now, 0
        token = token.merge(publisher.publish_many(batch, on_progress))
        sent += len(batch)
    return token


# -- reading ----------------------------------------------------------------------------------


def _open(file: Path) -> IO[str]:
    if file.name.endswith(".gz"):
        return gzip.open(file, "rt", encoding="utf-8")
    return file.open("r", encoding="utf-8")


def _read_file(file: Path) -> Iterator[CorpusRecord]:
    last_seq = -1
    try:
        with _open(file) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = _record(line, f"{file.name}:{lineno}")
                if record.seq <= last_seq:
                    raise CorpusError(
                        f"{file.name}:{lineno}: seq {record.seq} after {last_seq} (not increasing)"
                    )
                last_seq = record.seq
                yield record
    except (OSError, EOFError) as exc:
        raise CorpusError(f"cannot read {file}: {exc}") from exc


def _record(line: str, where: str) -> CorpusRecord:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: not JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise CorpusError(f"{where}: expected a JSON object")
    try:
        seq, op, doc_id, text = raw["seq"], raw["op"], raw["doc_id"], raw.get("text")
        ts = datetime.fromisoformat(raw["ts"])
        commit = str(raw.get("commit") or "")
    except KeyError as exc:
        raise CorpusError(f"{where}: missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise CorpusError(f"{where}: bad ts {raw.get('ts')!r}") from exc
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise CorpusError(f"{where}: seq must be an int >= 0, not {seq!r}")
    if op not in ("upsert", "delete"):
        raise CorpusError(f"{where}: op must be upsert or delete, not {op!r}")
    if not isinstance(doc_id, str) or not doc_id:
        raise CorpusError(f"{where}: doc_id must be a non-empty string")
    if (op == "upsert") != isinstance(text, str) or (op == "delete" and text is not None):
        raise CorpusError(f"{where}: {op} with {'no ' if text is None else ''}text")
    return CorpusRecord(seq=seq, ts=ts, commit=commit, op=op, doc_id=doc_id, text=text)
