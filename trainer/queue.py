"""Which adapter trains next: every due scope gets its turn, least recently trained first.

One run at a time (a small machine). At each check every scope (each tenant, and `_house`) is
judged on its own drift by `trainer.policy`; an operator's request (`Requests`) makes a scope
due whatever its drift. The due scopes are ordered fairly: scopes never trained first, then the
one whose last run started longest ago, then the one whose drift has waited longest. So a busy
tenant cannot starve a quiet one: after its run it goes to the back of the queue.

The scheduler saves what it decided in `trainer/schedule.json` (`Schedule`): the queue, every
scope's decision, a deferral (freshness first) and the run in progress, paused or not, so that
`headwater drift --json` and `headwater adapters list --tenant T --json` can show it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headwater.settings import Settings
from models.adapters import valid_scope
from trainer.drift import DriftTracker, Figures, atomic_write_json
from trainer.policy import Decision, decide
from trainer.registry import Registry

_NEVER = datetime.min.replace(tzinfo=UTC)


def data_mark(tracker: DriftTracker, scope: str) -> str:
    """Identifies the data a run is built from: the example log length and chunk sequence."""
    state = tracker.load(scope)
    return f"{state.examples_len}:{state.chunk_seq}"


@dataclass(frozen=True)
class Due:
    scope: str
    reason: str
    last_run: datetime | None
    waiting_since: datetime


def fair_order(due: list[Due]) -> list[Due]:
    """Never trained first, then least recently trained, then longest waiting."""
    return sorted(
        due, key=lambda d: (d.last_run is not None, d.last_run or _NEVER, d.waiting_since, d.scope)
    )


@dataclass
class Plan:
    """Every scope's decision and the fair order of the due ones."""

    decisions: dict[str, Decision] = field(default_factory=dict)
    queue: list[Due] = field(default_factory=list)

    def position(self, scope: str) -> int | None:
        """1-based place of `scope` in the queue; None when it is not due."""
        return next((i for i, d in enumerate(self.queue, 1) if d.scope == scope), None)

    def summary(self) -> str:
        """One line for a check that starts no run."""
        if not self.decisions:
            return "nothing changed"
        return "; ".join(f"{scope}: {d.reason}" for scope, d in sorted(self.decisions.items()))


def plan(
    settings: Settings,
    tracker: DriftTracker,
    figures: dict[str, Figures],
    now: datetime,
    requested: set[str] = frozenset(),  # type: ignore[assignment]
) -> Plan:
    """Decide for every scope with drift (or a request); order the due ones fairly."""
    out = Plan()
    for scope in sorted(set(figures) | set(requested)):
        fig = figures.get(scope) or Figures()
        registry = Registry(settings, scope)
        last = registry.last_run()
        if scope in requested:
            decision = Decision(True, "requested")
        else:
            decision = decide(fig, last.created if last else None, now, settings)
            if (
                decision.train
                and last is not None
                and last.status == "rejected"
                and last.data_mark == data_mark(tracker, scope)
            ):
                # The gate already said no to exactly this data; wait for more (or a request).
                decision = Decision(False, f"same data as the rejected run {last.version}")
        out.decisions[scope] = decision
        if decision.train:
            out.queue.append(Due(scope, decision.reason, last.created if last else None, fig.since))
    out.queue = fair_order(out.queue)
    return out


class Requests:
    """Runs asked for by an operator or a tenant (CLI, HTTP); the scheduler takes them in turn."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.data_dir / "trainer" / "requests"

    def add(self, scope: str) -> None:
        if not valid_scope(scope):
            raise ValueError(f"not an adapter scope: {scope[:80]!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / scope).touch()

    def pending(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if valid_scope(p.name)}

    def clear(self, scope: str) -> None:
        (self.root / scope).unlink(missing_ok=True)


@dataclass
class Schedule:
    """The scheduler's last decision, as `headwater drift --json` shows it."""

    checked: str | None = None
    action: str = "wait"  # train, deferred, wait
    reason: str = ""
    scope: str | None = None
    queue: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, Any] | None = None

    @classmethod
    def path(cls, settings: Settings) -> Path:
        return settings.data_dir / "trainer" / "schedule.json"

    @classmethod
    def load(cls, settings: Settings) -> Schedule:
        path = cls.path(settings)
        if not path.exists():
            return cls()
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, settings: Settings) -> None:
        atomic_write_json(self.path(settings), asdict(self))


def queue_rows(p: Plan) -> list[dict[str, Any]]:
    """The queue as JSON rows: tenant, reason, 1-based position."""
    return [
        {"tenant": d.scope, "reason": d.reason, "position": i} for i, d in enumerate(p.queue, 1)
    ]
