"""The trainer service: on a schedule, update drift, ask the policy, and run, gate and promote.

One job per trigger (the interval, and the optional crontab) on an APScheduler BackgroundScheduler
with max_instances=1 and coalesce=True; a lock in the service keeps the two triggers from
checking at once, and a file lock keeps runs of different processes (`headwater train --now`
next to `headwater trainer`) from overlapping.
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
from headwater.settings import Settings
from models.adapters import adapter_path, is_complete
from trainer.dataset import RunData, fetch_chunk_texts, plan_steps, select
from trainer.drift import DriftState, DriftTracker, Figures
from trainer.gate import Metrics, judge
from trainer.policy import Decision, decide
from trainer.registry import Registry, announce
from trainer.run import JobSpec, Launch, launch, read_result

log = logging.getLogger(__name__)

KEEP_JOBS = 20  # job folders (inputs and logs of past runs) kept for inspection

RUNS = Counter("headwater_training_runs_total", "Training runs by outcome", ["outcome"])
RUN_SECONDS = Histogram(
    "headwater_training_run_seconds",
    "Duration of a training run (data, training, gate)",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)


def data_mark(state: DriftState) -> str:
    """Identifies the data a run is built from: the example log length and chunk sequence."""
    return f"{state.examples_len}:{state.chunk_seq}"


@dataclass(frozen=True)
class RunOutcome:
    version: str
    status: str  # accepted (and promoted), rejected, failed
    reason: str
    promoted: bool
    metrics: dict[str, Any] = field(default_factory=dict)


class TrainerService:
    def __init__(
        self,
        settings: Settings,
        on_line: Callable[[str], None] | None = None,
        launcher: Callable[..., Launch] = launch,
    ) -> None:
        self.settings = settings
        self.launcher = launcher  # how a job runs: a child process (tests may run it in-process)
        self.tracker = DriftTracker(settings)
        self.registry = Registry(settings)
        self.on_line = on_line
        self.root = settings.data_dir / "trainer"
        self._run_lock = FileLock(str(self.root / "run.lock"))
        self._check_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._scheduler: BackgroundScheduler | None = None
        self.last_decision: Decision | None = None

    @property
    def running_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- one check -------------------------------------------------------------------------
    def check(self, now: datetime | None = None) -> RunOutcome | None:
        """Update drift; run if the policy says so."""
        figures = self.tracker.update()
        decision = decide(
            figures, self.registry.last_run_time(), now or datetime.now(UTC), self.settings
        )
        last = self.registry.last_run()
        if (
            decision.train
            and last is not None
            and last.status == "rejected"
            and last.data_mark == data_mark(self.tracker.load())
        ):
            # The gate already said no to exactly this data; wait for more (or a manual run).
            decision = Decision(False, f"same data as the rejected run {last.version}")
        self.last_decision = decision
        log.info("trainer check: %s: %s", "train" if decision.train else "wait", decision.reason)
        return self.train(decision.reason, figures) if decision.train else None

    def train(self, trigger: str, figures: Figures | None = None) -> RunOutcome:
        """One run now: build the job, train in a child process, gate, maybe promote."""
        try:
            self._run_lock.acquire(timeout=0)
        except Timeout:
            raise RunBusy("a training run is already in progress") from None
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = self._train(trigger, figures)
            outcome = "promoted" if result.promoted else result.status
            return result
        except NothingToTrain:
            outcome = "nothing"
            raise
        finally:
            self._run_lock.release()
            if outcome != "nothing":
                RUNS.labels(outcome).inc()
                RUN_SECONDS.observe(time.monotonic() - t0)

    def _train(self, trigger: str, figures: Figures | None) -> RunOutcome:
        s = self.settings
        self.registry.cleanup()  # leftovers of a run killed with its parent
        self._prune_jobs()
        mark = self.tracker.mark()
        data = select(
            self.tracker.examples, mark.examples_base, mark.examples_len, s, seed=s.train_seed
        )
        data.docs = fetch_chunk_texts(s, mark.recent_chunk_ids(), s.train_doc_chunks)
        if not data.new and not data.docs:
            raise NothingToTrain("no new examples or document text since the current adapter")
        current = self.registry.current()
        parent_dir = adapter_path(s, current) if current else None
        if parent_dir is not None and not is_complete(parent_dir):
            log.warning("current adapter %s is incomplete on disk; training from scratch", current)
            parent_dir = None
        version = self.registry.begin(parent=current, trigger=trigger, data_mark=data_mark(mark))
        try:
            return self._run(version, current, parent_dir, data, mark, trigger, figures)
        except BaseException as exc:
            # Whatever broke here (or an interrupt), the record must not stay "training".
            record = self.registry.load().get(version)
            if record is not None and record.status == "training":
                self.registry.finish(version, "failed", f"{type(exc).__name__}: {exc}")
            raise

    def _run(
        self,
        version: str,
        current: str | None,
        parent_dir: Path | None,
        data: RunData,
        mark: DriftState,
        trigger: str,
        figures: Figures | None,
    ) -> RunOutcome:
        s = self.settings
        job_dir = self.root / "jobs" / version
        job_dir.mkdir(parents=True, exist_ok=True)
        steps = plan_steps(s, data.train_size)
        job = JobSpec(
            version=version,
            out_dir=str(adapter_path(s, version)),
            base_model=s.train_base_model,
            cache_dir=str(s.cache_dir),
            parent_version=current if parent_dir else None,
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
            threads=s.train_threads,
            trigger=trigger,
            drift=(figures or mark.figures()).flat(),
        )
        (job_dir / "job.json").write_text(job.model_dump_json(indent=1))
        log.info(
            "run %s: %s; %d new + %d replay examples, %d doc texts, %d held out, %d steps",
            version, trigger, len(data.new), len(data.replay), len(data.docs),
            len(data.heldout), steps,
        )  # fmt: skip
        try:
            run = self.launcher(job_dir, s.train_timeout_s, self.on_line, self._started)
        finally:
            self._proc = None
        result = read_result(job_dir)
        if run.timed_out or run.returncode != 0 or not result or result["status"] != "trained":
            if run.timed_out:
                reason = f"timed out after {s.train_timeout_s:.0f} s (killed)"
            elif result and result.get("error"):
                reason = result["error"]
            elif run.returncode is not None and run.returncode < 0:
                reason = f"run killed by signal {-run.returncode}"
            else:
                reason = f"run exited with code {run.returncode} and no result"
            self.registry.finish(version, "failed", reason)
            log.warning("run %s failed: %s", version, reason)
            return RunOutcome(version, "failed", reason, promoted=False)
        before, after = Metrics.from_dict(result["before"]), Metrics.from_dict(result["after"])
        gate = judge(before, after, s.gate_margin)
        metrics = {k: result[k] for k in ("before", "after", "data", "steps", "seconds")}
        status = "accepted" if gate.promote else "rejected"
        record = self.registry.finish(version, status, gate.reason, metrics)
        if record.status != status:  # the folder vanished under us
            return RunOutcome(version, record.status, record.reason, False, metrics)
        log.info("run %s %s: %s", version, status, gate.reason)
        if not gate.promote:
            return RunOutcome(version, status, gate.reason, promoted=False, metrics=metrics)
        self.registry.make_current(version)
        self.tracker.rebase(mark)
        announce(s, version)
        return RunOutcome(version, status, gate.reason, promoted=True, metrics=metrics)

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def _prune_jobs(self) -> None:
        jobs = sorted((self.root / "jobs").glob("v*"))
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
