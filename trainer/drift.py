"""How far each tenant's corpus and examples have moved since its current adapter was trained.

Every tenant has its own drift (its scope), and so does the shared house-style adapter (scope
`_house`, fed only by examples marked shared, never by documents): a tenant's examples and
document changes count toward its own next refresh and nobody else's.

`DriftTracker` reads the changes topic (one ChangeEvent per document the indexer applied) and the
examples topic with manually assigned partitions, and routes each record to its scope. A scope's
figures, its example log's committed length and the offsets it has counted through are saved
together in `trainer/scopes/<scope>/drift.json` (temp file + os.replace); the tracker's read
position is saved last, in `trainer/position.json`. After a crash it re-reads from that position
and each scope skips what it already counted: nothing is counted twice or lost, and an update
rewrites only the scopes it touched. Processes share the files under a file lock.

The embedding shift is the distance between the centroid of every chunk a tenant added so far
and the centroid its current adapter was trained on (0 while there is no such snapshot): it
grows when the corpus moves, not with every single chunk.
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
from models.adapters import valid_scope
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
    """One scope's persisted drift: figures, its adapter's snapshot and what it has counted."""

    # "topic:partition" -> next offset this scope has counted (records below it are in)
    offsets: dict[str, int] = Field(default_factory=dict)
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
    since: datetime = Field(default_factory=_now)
    updated: datetime | None = None

    def figures(self) -> Figures:
        return Figures(
            **self.counts.model_dump(),
            new_terms=len(self.new_terms),
            embedding_shift=self.embedding_shift(),
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
    """Drift since each scope's current adapter, kept under `data_dir/trainer`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.data_dir / "trainer"
        self.scopes_root = self.root / "scopes"
        self.position_path = self.root / "position.json"
        self.scopes_root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / "drift.lock"), timeout=600)

    # -- state ------------------------------------------------------------------------------
    def path(self, scope: str) -> Path:
        if not valid_scope(scope):
            raise ValueError(f"not a tenant or adapter scope: {scope[:80]!r}")
        return self.scopes_root / scope / "drift.json"

    def examples(self, scope: str) -> ExampleLog:
        """The scope's example log (read up to its state's `examples_len`)."""
        return ExampleLog(self.path(scope).parent / "examples.jsonl")

    def load(self, scope: str) -> DriftState:
        path = self.path(scope)
        if not path.exists():
            return DriftState()
        return DriftState.model_validate_json(path.read_text(encoding="utf-8"))

    def _save(self, scope: str, state: DriftState) -> None:
        state.updated = _now()
        atomic_write_json(self.path(scope), state.model_dump(mode="json"))

    def scopes(self) -> list[str]:
        """Every scope with drift state, sorted."""
        return sorted(
            p.name for p in self.scopes_root.iterdir()
            if (p / "drift.json").is_file() and valid_scope(p.name)
        )  # fmt: skip

    def figures(self, scope: str) -> Figures:
        """A scope's saved figures (no consuming)."""
        return self.load(scope).figures()

    def all_figures(self) -> dict[str, Figures]:
        return {scope: self.figures(scope) for scope in self.scopes()}

    # -- consuming --------------------------------------------------------------------------
    def update(self, timeout_s: float = 60.0) -> dict[str, Figures]:
        """Consume both topics up to their current end (bounded by timeout_s); save; figures of
        every scope."""
        with self._lock:
            self._consume(timeout_s)
        return self.all_figures()

    def _position(self) -> dict[str, object]:
        if not self.position_path.exists():
            return {"offsets": {}, "skipped": 0}
        return json.loads(self.position_path.read_text(encoding="utf-8"))

    def skipped(self) -> int:
        """Records no scope could take: malformed, or of an unknown tenant."""
        return int(self._position().get("skipped", 0))  # type: ignore[call-overload]

    def _consume(self, timeout_s: float) -> None:
        s = self.settings
        deadline = time.monotonic() + timeout_s
        saved = self._position()
        position: dict[str, int] = dict(saved["offsets"])  # type: ignore[call-overload]
        batch = _Batch(self)
        for topic in (s.changes_topic, s.examples_topic):
            start = {int(k.rsplit(":", 1)[1]): v for k, v in position.items()
                     if k.rsplit(":", 1)[0] == topic}  # fmt: skip
            with Tail(s, topic, start=start, client_id="headwater-drift",
                      request_timeout_ms=30_000) as tail:  # fmt: skip
                try:
                    for r in tail.read_to_end(max(1.0, deadline - time.monotonic())):
                        where = f"{topic}:{r.partition}"
                        if topic == s.changes_topic:
                            self._apply_change(batch, where, r.offset, r.value)
                        else:
                            self._apply_example(batch, where, r.offset, r.value)
                except KafkaUnavailable as exc:
                    log.warning("drift: %s; the rest comes next time", exc)
                position |= {f"{topic}:{p}": o for p, o in tail.positions.items()}
        # Per scope: example log first (past its committed length until the state says
        # otherwise), then its state with offsets; the read position last. A crash in between
        # re-reads these records, and each scope skips those it already counted.
        for scope, state in batch.states.items():
            if batch.fresh_terms.get(scope):
                state.new_terms = sorted(set(state.new_terms) | batch.fresh_terms[scope])
            if batch.examples.get(scope):
                state.examples_len = self.examples(scope).append(batch.examples[scope])
            state.offsets.update(position)
            self._save(scope, state)
        skipped = int(saved.get("skipped", 0)) + batch.skipped  # type: ignore[call-overload]
        atomic_write_json(
            self.position_path,
            {"offsets": position, "skipped": skipped, "updated": _now().isoformat()},
        )

    def _apply_change(self, batch: _Batch, where: str, offset: int, raw: bytes | None) -> None:
        try:
            ev = ChangeEvent.model_validate_json(raw or b"")
        except ValidationError:
            batch.skipped += 1
            return
        state = batch.state(ev.tenant, where, offset)
        if state is None:
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
        known, fresh = batch.terms(ev.tenant)
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

    def _apply_example(self, batch: _Batch, where: str, offset: int, raw: bytes | None) -> None:
        try:
            ex = parse_example(raw)
        except EventError as exc:
            log.warning("drift: skipping a bad example: %s", exc)
            batch.skipped += 1
            return
        if not self.settings.tenant_known(ex.tenant):
            batch.skipped += 1  # never a scope of its own: junk cannot create state
            return
        state = batch.state(ex.scope, where, offset)
        if state is None:
            return
        state.counts.examples += 1
        state.counts.example_weight += ex.weight
        batch.examples.setdefault(ex.scope, []).append(ex)

    # -- adapters ---------------------------------------------------------------------------
    def mark(self, scope: str) -> DriftState:
        """The saved state a run is built from; hand it back to `rebase` on promotion."""
        with self._lock:
            return self.load(scope)

    def rebase(self, scope: str, mark: DriftState) -> Figures:
        """A run built from `mark` was promoted: its data becomes the new snapshot.

        What arrived after the mark (while the run trained) stays counted as new.
        """
        with self._lock:
            state = self.load(scope)
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
            self._save(scope, state)
            return state.figures()


class _Batch:
    """The scopes one update touches, loaded on first use, and what it adds to each."""

    def __init__(self, tracker: DriftTracker) -> None:
        self.tracker = tracker
        self.states: dict[str, DriftState] = {}
        self.examples: dict[str, list[ExampleEvent]] = {}
        self.fresh_terms: dict[str, set[str]] = {}
        self._known: dict[str, set[str]] = {}
        self.skipped = 0

    def state(self, scope: str, where: str, offset: int) -> DriftState | None:
        """The scope's state to count a record at `where`/`offset` into; None when the scope
        counted it already (before a crash cut the update short)."""
        state = self.states.get(scope)
        if state is None:
            state = self.tracker.load(scope)
            self.tracker.examples(scope).truncate(state.examples_len)
            self.states[scope] = state
        if offset < state.offsets.get(where, 0):
            return None
        return state

    def terms(self, scope: str) -> tuple[set[str], set[str]]:
        if scope not in self._known:
            state = self.states[scope]
            self._known[scope] = set(state.base_vocab) | set(state.new_terms)
            self.fresh_terms[scope] = set()
        return self._known[scope], self.fresh_terms[scope]
