"""The trainer service: on a schedule, update drift, plan, and run, gate and promote.

Every tenant's adapter (and the shared house adapter) is trained on its own data and judged by
its own gate; `trainer.queue` decides which due scope goes next, fairly, one run at a time. A
tenant's first adapter starts from the house adapter when there is one (the house style sits
underneath); later ones continue from the tenant's current adapter.

Freshness comes first (`trainer.freshness`): no run starts while the indexer has a backlog (the
decision says "deferred" and why), and a run in progress is paused while one lasts. Runs are
niced child processes with the training share of the thread budget.

One job per trigger (the interval, and the optional crontab) on an APScheduler BackgroundScheduler
with max_instances=1 and coalesce=True, plus a short one that re-checks soon after a deferral, a
finished run with more due, or a request; a lock in the service keeps them from checking at once,
and a file lock keeps runs of different processes (`headwater train --now` next to `headwater
trainer`) from overlapping.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from filelock import FileLock, Timeout
from prometheus_client import Counter, Histogram

from headwater.errors import NothingToTrain, RunBusy, TrainerError
from headwater.events import HOUSE
from headwater.settings import Settings
from headwater.threads import budget
from models.adapters import adapter_name, is_complete
from trainer.dataset import RunData, fetch_chunk_texts, plan_steps, select
from trainer.drift import DriftState, DriftTracker, Figures
from trainer.freshness import Backlog
from trainer.gate import Metrics, judge
from trainer.policy import Decision
from trainer.queue import Plan, Requests, Schedule, data_mark, plan, queue_rows
from trainer.registry import Registry, announce
from trainer.run import JobSpec, Launch, launch, read_result

log = logging.getLogger(__name__)

KEEP_JOBS = 20  # job folders per scope (inputs and logs of past runs) kept for inspection

RUNS = Counter("headwater_training_runs_total", "Training runs by outcome", ["outcome"])
RUN_SECONDS = Histogram(
    "headwater_training_run_seconds",
    "Duration of a training run (data, training, gate)",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)


@dataclass(frozen=True)
class RunOutcome:
    version: str
    status: str  # accepted (and promoted), rejected, failed
    reason: str
    promoted: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""
    paused_s: float = 0.0


class TrainerService:
    def __init__(
        self,
        settings: Settings,
        on_line: Callable[[str], None] | None = None,
        launcher: Callable[..., Launch] = launch,
        backlog: Backlog | None = None,
    ) -> None:
        self.settings = settings
        self.launcher = launcher  # how a job runs: a child process (tests may run it in-process)
        self.tracker = DriftTracker(settings)
        self.requests = Requests(settings)
        self.backlog = backlog or Backlog(settings)
        self.on_line = on_line
        self.root = settings.data_dir / "trainer"
        self._run_lock = FileLock(str(self.root / "run.lock"))
        self._check_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._recheck = False  # a deferral or more due scopes: check again soon
        self._schedule = Schedule()
        self.last_decision: Decision | None = None
        self.last_plan: Plan | None = None

    @property
    def running_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def registry(self, scope: str) -> Registry:
        return Registry(self.settings, scope)

    # -- one check -------------------------------------------------------------------------
    def check(self, now: datetime | None = None) -> RunOutcome | None:
        """Update drift, plan every scope, and run the first due one unless freshness says wait."""
        now = now or datetime.now(UTC)
        figures = self.tracker.update()
        p = plan(self.settings, self.tracker, figures, now, self.requests.pending())
        self.last_plan = p
        self._schedule = Schedule(checked=now.isoformat(), queue=queue_rows(p))
        hold = self.backlog.hold() if p.queue else None
        if not p.queue:
            action, decision = "wait", Decision(False, p.summary())
        elif hold:
            action, decision = "deferred", Decision(False, f"deferred: {hold}")
        else:
            first = p.queue[0]
            action, decision = "train", Decision(True, f"{first.scope}: {first.reason}")
            self._schedule.scope = first.scope
        self._recheck = action == "deferred"
        self.last_decision = decision
        self._schedule.action, self._schedule.reason = action, decision.reason
        self._schedule.save(self.settings)
        log.info("trainer check: %s: %s", action, decision.reason)
        if action != "train":
            return None
        for i, due in enumerate(p.queue):
            try:
                outcome = self.train(due.scope, due.reason, figures.get(due.scope))
            except NothingToTrain as exc:  # due by drift with nothing to learn: the next one
                log.info("trainer check: %s", exc)
                continue
            self._recheck = i + 1 < len(p.queue)  # the others' turn comes soon, not next interval
            return outcome
        return None

    def train(self, scope: str, trigger: str, figures: Figures | None = None) -> RunOutcome:
        """One run of `scope`'s adapter now: build the job, train in a child process, gate,
        maybe promote."""
        try:
            self._run_lock.acquire(timeout=0)
        except Timeout:
            raise RunBusy("a training run is already in progress") from None
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = self._train(scope, trigger, figures)
            outcome = "promoted" if result.promoted else result.status
            return result
        except NothingToTrain:
            outcome = "nothing"
            raise
        finally:
            self.requests.clear(scope)
            self._run_lock.release()
            if outcome != "nothing":
                RUNS.labels(outcome).inc()
                RUN_SECONDS.observe(time.monotonic() - t0)

    def _train(self, scope: str, trigger: str, figures: Figures | None) -> RunOutcome:
        s = self.settings
        registry = self.registry(scope)
        registry.cleanup()  # leftovers of a run killed with its parent
        self._prune_jobs(scope)
        mark = self.tracker.mark(scope)
        data = select(
            self.tracker.examples(scope), mark.examples_base, mark.examples_len, s,
            seed=s.train_seed,
        )  # fmt: skip
        data.docs = fetch_chunk_texts(s, scope, mark.recent_chunk_ids(), s.train_doc_chunks)
        if not data.new and not data.docs:
            raise NothingToTrain(
                f"{scope}: no new examples or document text since its current adapter"
            )
        parent, parent_dir = self._parent(scope, registry)
        version = registry.begin(parent=parent, trigger=trigger, data_mark=data_mark(
            self.tracker, scope))  # fmt: skip
        try:
            return self._run(scope, version, parent, parent_dir, data, mark, trigger, figures)
        except BaseException as exc:
            # Whatever broke here (or an interrupt), the record must not stay "training".
            record = registry.load().get(version)
            if record is not None and record.status == "training":
                registry.finish(version, "failed", f"{type(exc).__name__}: {exc}")
            raise

    def _parent(self, scope: str, registry: Registry) -> tuple[str | None, Path | None]:
        """What the run continues from: the scope's current adapter, else (for a tenant) the
        house adapter, else nothing (a fresh LoRA on the base model)."""
        current = registry.current()
        if current is not None:
            if is_complete(registry.folder(current)):
                return current, registry.folder(current)
            log.warning("%s: current adapter %s is incomplete on disk", scope, current)
        if scope != HOUSE:
            house = self.registry(HOUSE)
            under = house.current()
            if under is not None and is_complete(house.folder(under)):
                return adapter_name(HOUSE, under), house.folder(under)
        return None, None

    def _run(
        self,
        scope: str,
        version: str,
        parent: str | None,
        parent_dir: Path | None,
        data: RunData,
        mark: DriftState,
        trigger: str,
        figures: Figures | None,
    ) -> RunOutcome:
        s = self.settings
        registry = self.registry(scope)
        job_dir = self.root / "jobs" / scope / version
        job_dir.mkdir(parents=True, exist_ok=True)
        steps = plan_steps(s, data.train_size)
        job = JobSpec(
            version=version,
            scope=scope,
            out_dir=str(registry.folder(version)),
            base_model=s.train_base_model,
            cache_dir=str(s.cache_dir),
            parent_version=parent,
            parent_dir=str(parent_dir) if parent_dir else None,
            new=data.new,
            replay=data.replay,
            heldout=data.heldout,
            docs=data.docs,
            profile=data.profile.to_dict(),
            steps=steps,
            batch_size=s.train_batch_size,
            learning_rate=s.train_learning_rate,
            lora_r=s.train_lora_r,
            max_seq_tokens=s.train_max_seq_tokens,
            gate_max_new_tokens=s.gate_max_new_tokens,
            dtype=s.train_dtype,
            seed=s.train_seed,
            threads=budget(s).train,
            nice=s.train_nice,
            trigger=trigger,
            drift=(figures or mark.figures()).flat(),
        )
        (job_dir / "job.json").write_text(job.model_dump_json(indent=1))
        log.info(
            "run %s/%s: %s; %d new + %d replay examples, %d doc texts, %d held out, %d steps",
            scope, version, trigger, len(data.new), len(data.replay), len(data.docs),
            len(data.heldout), steps,
        )  # fmt: skip
        self._running(scope, version)
        try:
            run = self.launcher(
                job_dir, s.train_timeout_s, self.on_line, self._started,
                hold=self.backlog.hold, check_s=s.train_lag_check_s, on_hold=self._on_hold,
            )  # fmt: skip
        finally:
            self._proc = None
            self._running(None, None)
        result = read_result(job_dir)
        paused = {"paused_s": run.paused_s, "pauses": run.pauses}
        if run.timed_out or run.returncode != 0 or not result or result["status"] != "trained":
            if run.timed_out:
                reason = f"timed out after {s.train_timeout_s:.0f} s (killed)"
            elif result and result.get("error"):
                reason = result["error"]
            elif run.returncode is not None and run.returncode < 0:
                reason = f"run killed by signal {-run.returncode}"
            else:
                reason = f"run exited with code {run.returncode} and no result"
            registry.finish(version, "failed", reason, paused)
            log.warning("run %s/%s failed: %s", scope, version, reason)
            return RunOutcome(version, "failed", reason, False, paused, scope, run.paused_s)
        before, after = Metrics.from_dict(result["before"]), Metrics.from_dict(result["after"])
        gate = judge(before, after, s.gate_margin)
        metrics = {k: result[k] for k in ("before", "after", "data", "steps", "seconds")} | paused
        status = "accepted" if gate.promote else "rejected"
        record = registry.finish(version, status, gate.reason, metrics)
        if record.status != status:  # the folder vanished under us
            return RunOutcome(
                version, record.status, record.reason, False, metrics, scope, run.paused_s
            )
        log.info("run %s/%s %s: %s", scope, version, status, gate.reason)
        if not gate.promote:
            return RunOutcome(version, status, gate.reason, False, metrics, scope, run.paused_s)
        registry.make_current(version)
        self.tracker.rebase(scope, mark)
        announce(s, scope, version)
        return RunOutcome(version, status, gate.reason, True, metrics, scope, run.paused_s)

    def _running(self, scope: str | None, version: str | None) -> None:
        self._schedule.running = (
            {"tenant": scope, "version": version, "started": datetime.now(UTC).isoformat(),
             "paused": False, "reason": ""} if scope else None
        )  # fmt: skip
        self._schedule.save(self.settings)

    def _on_hold(self, reason: str | None) -> None:
        running = self._schedule.running
        if running is not None:
            running["paused"], running["reason"] = bool(reason), reason or ""
            self._schedule.save(self.settings)

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def _prune_jobs(self, scope: str) -> None:
        jobs = sorted((self.root / "jobs" / scope).glob("v*"))
        for old in jobs[:-KEEP_JOBS]:
            shutil.rmtree(old, ignore_errors=True)

    # -- the schedule ----------------------------------------------------------------------
    def start(self) -> None:
        """Check now, then every train_check_interval_s (and on train_cron), in the background."""
        s = self.settings
        scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True})
        scheduler.add_job(
            self._scheduled_check,
            IntervalTrigger(seconds=s.train_check_interval_s),
            id="trainer-interval",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            self._soon,
            IntervalTrigger(seconds=s.train_lag_check_s),
            id="trainer-soon",
            # While a run holds the check, the next tick returns at once (the check's lock)
            # instead of apscheduler warning every few seconds that it skipped one.
            max_instances=2,
            coalesce=True,
        )
        if s.train_cron:
            scheduler.add_job(
                self._scheduled_check,
                CronTrigger.from_crontab(s.train_cron),
                id="trainer-cron",
                max_instances=1,
                coalesce=True,
            )
        scheduler.start()
        self._scheduler = scheduler

    def _soon(self) -> None:
        """Re-check between intervals after a deferral or a run with more due, or on request."""
        if self._recheck or self.requests.pending():
            self._scheduled_check()

    def scheduling(self) -> str:
        """Liveness: the schedule runs (raises when it stopped)."""
        scheduler = self._scheduler
        if scheduler is None or not scheduler.running:
            raise RuntimeError("the training schedule is not running")
        return "scheduled"

    def _scheduled_check(self) -> None:
        if not self._check_lock.acquire(blocking=False):
            return  # the other trigger's check is running
        try:
            self.check()
        except TrainerError as exc:
            log.info("trainer check: %s", exc)
        except Exception:
            log.exception("trainer check failed")
        finally:
            self._check_lock.release()

    def stop(self) -> None:
        """Stop the schedule; a run in progress is killed (it is recorded as failed)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.backlog.close()
