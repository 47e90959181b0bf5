"""Freshness first: training waits while the indexer has a backlog, and a run pauses when one
appears.

The backlog is the indexer group's lag on the documents topic (`headwater.progress`): document
events written but not yet applied. Above `train_max_index_lag` no run starts (the scheduler
says "deferred" and why), and a run in progress is stopped (SIGSTOP) until the lag is back
within half the bound (SIGCONT): on a small machine a LoRA run would otherwise take the cores the
embedder needs, and searches would fall behind. A lag that cannot be read (the broker away, no
documents topic yet) holds nothing back: the freshness path has nothing to protect then.
"""

from __future__ import annotations

import logging

from kafka.errors import KafkaError

from headwater.errors import HeadwaterError
from headwater.progress import Progress
from headwater.settings import Settings

log = logging.getLogger(__name__)


class Backlog:
    """Reads the indexer's lag; `hold()` says whether training must wait, and why."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._progress: Progress | None = None
        self.last_lag: int | None = None
        self._holding = False

    def lag(self) -> int | None:
        """Document events the indexer has not applied yet; None when unknown."""
        if self._progress is None:
            self._progress = Progress(self.settings)
        try:
            self.last_lag = sum(self._progress.consumer_lag().values())
        except (KafkaError, HeadwaterError, OSError) as exc:
            log.debug("indexer lag unknown: %s", exc)
            self.close()  # a fresh admin client next time
            self.last_lag = None
        return self.last_lag

    def hold(self) -> str | None:
        """Why training must wait now (the indexer's backlog), or None."""
        lag = self.lag()
        # Hysteresis: once holding, wait until the indexer has nearly caught up, or the run
        # takes the cores back at the bound and the backlog never drains (measured: a run
        # resumed at the bound kept a 5 ev/s replay ~20 s behind).
        limit = self.settings.train_max_index_lag
        if lag is not None and lag > limit:
            self._holding = True
            return f"indexer lag {lag} document events > {limit}: freshness first"
        if self._holding and lag is not None and lag > limit // 2:
            return f"indexer lag {lag} document events, not yet ≤ {limit // 2}: freshness first"
        self._holding = False
        return None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
