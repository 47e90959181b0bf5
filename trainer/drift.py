"""How far the corpus and the examples have moved since the current adapter was trained.

`DriftTracker` reads the changes topic (one ChangeEvent per document the indexer applied) and the
examples topic with manually assigned partitions. The figures, the next offset of every partition
and the committed length of the example log are saved together in one JSON file (temp file +
os.replace), so after a restart it seeks to exactly where the saved figures end: nothing is
counted twice or lost. Processes share the file under a file lock.

The embedding shift is the distance between the centroid of every added chunk so far and the
centroid the current adapter was trained on (0 while there is no such snapshot): it grows when
the corpus moves, not with every single chunk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, Field, ValidationError

from headwater.errors import EventError, KafkaUnavailable
from headwater.events import ChangeEvent, ExampleEvent, parse_example
from headwater.runtime.reader import Tail
from headwater.settings import Settings
from trainer.examples import ExampleLog

log = logging.getLogger(__name__)

RECENT_CHUNKS = 256  # chunk ids remembered for a run's document text (a sample, not the corpus)


def _now() -> datetime:
    return datetime.now(UTC)


class Counts(BaseModel):
    docs_added: int = 0
    docs_changed: int = 0
    docs_deleted: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    examples: int = 0
    example_weight: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(
            **{k: max(0, getattr(self, k) - getattr(other, k)) for k in Counts.model_fields}
        )


class Figures(BaseModel):
    """Drift since the current adapter: what the policy decides on and `headwater drift` shows."""

    docs_added: int = 0
    docs_changed: int = 0
    docs_deleted: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    new_terms: int = 0
    examples: int = 0
    example_weight: float = 0.0
    embedding_shift: float = 0.0
    skipped_events: int = 0
    since: datetime = Field(default_factory=_now)

    @property
    def changed_docs(self) -> int:
        return self.docs_added + self.docs_changed + self.docs_deleted

    @property
    def anything_changed(self) -> bool:
        return bool(self.changed_docs or self.chunks_added or self.chunks_removed or self.examples)

    def flat(self) -> dict[str, object]:
        """Flat JSON-able counts and scores (`headwater drift --json`)."""
        data = self.model_dump(mode="json")
        data["changed_docs"] = self.changed_docs
        return data


class DriftState(BaseModel):
    """Everything persisted: figures, the adapter's snapshot and the consumed offsets."""

    offsets: dict[str, int] = Field(default_factory=dict)  # "topic:partition" -> next offset
    counts: Counts = Field(default_factory=Counts)
    new_terms: list[str] = Field(default_factory=list)
    new_sum: list[float] | None = None
    new_count: int = 0
    base_vocab: list[str] = Field(default_factory=list)
    base_sum: list[float] | None = None
    base_count: int = 0
    chunk_seq: int = 0
    recent_chunks: list[tuple[int, str]] = Field(default_factory=list)
    examples_len: int = 0  # committed bytes of the example log
    examples_base: int = 0  # where the examples the current adapter has not seen start
    skipped: int = 0
    since: datetime = Field(default_factory=_now)
    updated: datetime | None = None

    def figures(self) -> Figures:
        return Figures(
            **self.counts.model_dump(),
            new_terms=len(self.new_terms),
            embedding_shift=self.embedding_shift(),
            skipped_events=self.skipped,
            since=self.since,
        )

    def embedding_shift(self) -> float:
        if not self.base_count or not self.new_count or self.base_sum is None:
            return 0.0
        if self.new_sum is None or len(self.new_sum) != len(self.base_sum):
            return 0.0
        n_all = self.base_count + self.new_count
        return math.sqrt(
            sum(
                ((b + n) / n_all - b / self.base_count) ** 2
                for b, n in zip(self.base_sum, self.new_sum, strict=True)
            )
        )

    def recent_chunk_ids(self) -> list[str]:
        return [cid for _, cid in self.recent_chunks]


def _add(a: list[float] | None, b: list[float], sign: float = 1.0) -> list[float]:
    if a is None or len(a) != len(b):
        return [sign * x for x in b]
    return [x + sign * y for x, y in zip(a, b, strict=True)]


def atomic_write_json(path: Path, data: object) -> None:
    """Write JSON so readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DriftTracker:
    """Drift figures since the current adapter, kept in `data_dir/trainer/drift.json`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.data_dir / "trainer"
        self.path = self.root / "drift.json"
        self.examples = ExampleLog(self.root / "examples.jsonl")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / "drift.lock"), timeout=600)

    # -- state ------------------------------------------------------------------------------
    def load(self) -> DriftState:
        if not self.path.exists():
            return DriftState()
        return DriftState.model_validate_json(self.path.read_text(encoding="utf-8"))

    def _save(self, state: DriftState) -> None:
        state.updated = _now()
        atomic_write_json(self.path, state.model_dump(mode="json"))

    def figures(self) -> Figures:
        """The saved figures (no consuming)."""
        return self.load().figures()

    # -- consuming --------------------------------------------------------------------------
    def update(self, timeout_s: float = 60.0) -> Figures:
        """Consume both topics up to their current end (bounded by timeout_s); save; figures."""
        with self._lock:
            state = self.load()
            self.examples.truncate(state.examples_len)
            self._consume(state, timeout_s)
            return state.figures()

    def _consume(self, state: DriftState, timeout_s: float) -> None:
        s = self.settings
        deadline = time.monotonic() + timeout_s
        examples: list[ExampleEvent] = []
        known = set(state.base_vocab) | set(state.new_terms)
        fresh: set[str] = set()
        positions: dict[str, int] = {}
        for topic in (s.changes_topic, s.examples_topic):
            start = {int(k.rsplit(":", 1)[1]): v for k, v in state.offsets.items()
                     if k.rsplit(":", 1)[0] == topic}  # fmt: skip
            with Tail(s, topic, start=start, client_id="headwater-drift",
                      request_timeout_ms=30_000) as tail:  # fmt: skip
                try:
                    for r in tail.read_to_end(max(1.0, deadline - time.monotonic())):
                        if topic == s.changes_topic:
                            self._apply_change(state, r.value, known, fresh)
                        else:
                            ex = self._apply_example(state, r.value)
                            if ex is not None:
                                examples.append(ex)
                except KafkaUnavailable as exc:
                    log.warning("drift: %s; the rest comes next time", exc)
                positions |= {f"{topic}:{p}": o for p, o in tail.positions.items()}
        # Example log first (past its committed length until the state says otherwise), then
        # the state with offsets: a crash in between re-reads these examples, once.
        if fresh:
            state.new_terms = sorted(set(state.new_terms) | fresh)
        if examples:
            state.examples_len = self.examples.append(examples)
        state.offsets.update(positions)
        self._save(state)

    def _apply_change(
        self, state: DriftState, raw: bytes | None, known: set[str], fresh: set[str]
    ) -> None:
        try:
            ev = ChangeEvent.model_validate_json(raw or b"")
        except ValidationError:
            state.skipped += 1
            return
        counts = state.counts
        if ev.op == "added":
            counts.docs_added += 1
        elif ev.op == "changed":
            counts.docs_changed += 1
        else:
            counts.docs_deleted += 1
        counts.chunks_added += len(ev.added_chunk_ids)
        counts.chunks_removed += len(ev.removed_chunk_ids)
        if ev.embedding_sum and ev.added_chunk_ids:
            state.new_sum = _add(state.new_sum, ev.embedding_sum)
            state.new_count += len(ev.added_chunk_ids)
        for term in ev.terms:
            if term not in known:
                known.add(term)
                fresh.add(term)
        removed = set(ev.removed_chunk_ids)
        recent = [(seq, cid) for seq, cid in state.recent_chunks if cid not in removed]
        for cid in ev.added_chunk_ids:
            state.chunk_seq += 1
            recent.append((state.chunk_seq, cid))
        state.recent_chunks = recent[-RECENT_CHUNKS:]

    def _apply_example(self, state: DriftState, raw: bytes | None) -> ExampleEvent | None:
        try:
            ex = parse_example(raw)
        except EventError as exc:
            log.warning("drift: skipping a bad example: %s", exc)
            state.skipped += 1
            return None
        if not self.settings.tenant_known(ex.tenant):
            state.skipped += 1
            return None
        state.counts.examples += 1
        state.counts.example_weight += ex.weight
        return ex

    # -- adapters ---------------------------------------------------------------------------
    def mark(self) -> DriftState:
        """The saved state a run is built from; hand it back to `rebase` on promotion."""
        with self._lock:
            return self.load()

    def rebase(self, mark: DriftState) -> Figures:
        """A run built from `mark` was promoted: its data becomes the new snapshot.

        What arrived after the mark (while the run trained) stays counted as new.
        """
        with self._lock:
            state = self.load()
            state.counts = state.counts.minus(mark.counts)
            state.base_vocab = sorted(set(state.base_vocab) | set(mark.new_terms))
            state.new_terms = sorted(set(state.new_terms) - set(mark.new_terms))
            if mark.new_sum is not None:
                state.base_sum = _add(state.base_sum, mark.new_sum)
                state.base_count += mark.new_count
                state.new_sum = _add(state.new_sum, mark.new_sum, -1.0)
                state.new_count = max(0, state.new_count - mark.new_count)
            state.recent_chunks = [(s, c) for s, c in state.recent_chunks if s > mark.chunk_seq]
            state.examples_base = mark.examples_len
            state.since = mark.updated or _now()
            self._save(state)
            return state.figures()
