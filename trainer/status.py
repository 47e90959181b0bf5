"""What the trainer shows: each scope's drift and turn, and its adapters (CLI and HTTP alike).

Both reports read the topics up to their end first (`DriftTracker.update`), then judge every
scope as the scheduler would (`trainer.queue.plan`), read the indexer's lag (freshness first)
and the scheduler's last saved decision. A tenant-scoped report holds nothing of another tenant
but its place in the queue.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from headwater.settings import Settings
from trainer.drift import DriftTracker, Figures
from trainer.freshness import Backlog
from trainer.queue import Plan, Requests, Schedule, plan, queue_rows
from trainer.registry import Registry


def _freshness(settings: Settings) -> dict[str, Any]:
    backlog = Backlog(settings)
    try:
        hold = backlog.hold()
    finally:
        backlog.close()
    return {"index_lag": backlog.last_lag, "max_index_lag": settings.train_max_index_lag,
            "hold": hold}  # fmt: skip


def _pending(scope: str, fig: Figures, p: Plan) -> dict[str, Any]:
    decision = p.decisions.get(scope)
    return {
        **fig.flat(),
        "due": bool(decision and decision.train),
        "reason": decision.reason if decision else "nothing changed",
        "queue_position": p.position(scope),
    }


def _scheduler(settings: Settings, scope: str | None) -> dict[str, Any]:
    """The scheduler's last decision; for one tenant, only what concerns it."""
    saved = Schedule.load(settings)
    out: dict[str, Any] = {"checked": saved.checked, "action": saved.action}
    mine = scope is None or saved.scope == scope
    out["reason"] = saved.reason if mine or saved.action == "deferred" else ""
    running = saved.running
    if running is not None and (scope is None or running.get("tenant") == scope):
        out["running"] = running
    elif running is not None:
        out["running"] = {"paused": running.get("paused", False)}  # someone else's run
    return out


def drift_report(settings: Settings, scope: str | None = None) -> dict[str, Any]:
    """`headwater drift --json`: every scope's drift and turn, or (`scope`) one tenant's."""
    tracker = DriftTracker(settings)
    figures = tracker.update()
    p = plan(settings, tracker, figures, datetime.now(UTC), Requests(settings).pending())
    common = {"freshness": _freshness(settings), "scheduler": _scheduler(settings, scope)}
    if scope is not None:
        fig = figures.get(scope) or Figures()
        return {"tenant": scope, **_pending(scope, fig, p), "queue_length": len(p.queue),
                **common}  # fmt: skip
    return {
        "tenants": {s: _pending(s, f, p) for s, f in sorted(figures.items())},
        "queue": queue_rows(p),
        "skipped_events": tracker.skipped(),
        **common,
    }


def adapters_report(settings: Settings, scope: str) -> dict[str, Any]:
    """`headwater adapters list --tenant T --json`: T's versions, current, and pending drift."""
    listing = Registry(settings, scope).listing()
    return listing | {"pending": drift_report(settings, scope)}
