"""When to retrain: a pure function of the drift figures, the last run and the clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from headwater.settings import Settings
from trainer.drift import Figures


@dataclass(frozen=True)
class Decision:
    train: bool
    reason: str


def decide(
    figures: Figures, last_run: datetime | None, now: datetime, settings: Settings
) -> Decision:
    """Retrain on enough new examples, changed documents or embedding shift; never more often
    than train_min_interval_s; and at least every train_max_age_days when anything changed.

    `last_run` is the start of the last run whatever its outcome (a rejected run still used the
    machine); with none, the age counts from when drift tracking began (`figures.since`).
    """
    if last_run is not None:
        wait = timedelta(seconds=settings.train_min_interval_s) - (now - last_run)
        if wait > timedelta(0):
            return Decision(False, f"last run {_ago(now - last_run)} ago; next in {_ago(wait)}")
    if figures.examples >= settings.train_min_examples:
        return Decision(True, f"{figures.examples} new examples (≥ {settings.train_min_examples})")
    if figures.changed_docs >= settings.train_min_changed_docs:
        return Decision(
            True, f"{figures.changed_docs} changed documents (≥ {settings.train_min_changed_docs})"
        )
    shift = figures.embedding_shift
    if shift > 0 and shift >= settings.train_min_embedding_shift:
        return Decision(
            True, f"embedding shift {shift:.3f} (≥ {settings.train_min_embedding_shift})"
        )
    if not figures.anything_changed:
        return Decision(False, "nothing changed")
    age = now - (last_run or figures.since)
    if age >= timedelta(days=settings.train_max_age_days):
        return Decision(
            True, f"changes pending and adapter {_ago(age)} old (≥ {settings.train_max_age_days} d)"
        )
    return Decision(False, "below every threshold")


def _ago(delta: timedelta) -> str:
    s = max(0, int(delta.total_seconds()))
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s // 60} min"
    return f"{s} s"
