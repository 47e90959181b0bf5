"""One training run, in its own process: `python -m trainer.run --job JOBDIR`.

The parent (the scheduler or `headwater train`) writes JOBDIR/job.json with everything the run
needs, starts this module with `launch` (killed after a bounded timeout) and reads
JOBDIR/result.json. Running apart keeps the parent small and lets a stuck or runaway run be
killed without harm: the adapter is written to `.tmp-<version>` and renamed to its final folder
only once complete, and nothing is promoted here. It also lets the parent put the run in the
background: it runs niced (idle scheduling class on Linux) with the training share of the thread
budget, and `launch` stops it (SIGSTOP) while a `hold` callback says so (the indexer's backlog)
and resumes it after (SIGCONT); paused time does not count toward the timeout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from trainer.dataset import Item, RunData
from trainer.style import StyleProfile

log = logging.getLogger("trainer.run")

TARGET_MODULES = ["q_proj", "v_proj"]


class JobSpec(BaseModel):
    """Everything a run needs; no Settings or environment reach the training process."""

    version: str
    scope: str = ""  # the tenant (or _house) whose adapter this is
    out_dir: str
    base_model: str  # name or path (settings.train_base_model)
    cache_dir: str  # where the default base model's converted weights live
    parent_version: str | None = None
    parent_dir: str | None = None
    new: list[Item] = Field(default_factory=list)
    replay: list[Item] = Field(default_factory=list)
    heldout: list[Item] = Field(default_factory=list)
    docs: list[str] = Field(default_factory=list)
    profile: dict[str, Any] = Field(default_factory=dict)
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int
    max_seq_tokens: int
    gate_max_new_tokens: int
    dtype: str = "auto"
    seed: int = 0
    threads: int = 0
    nice: int = 0  # added to the run's OS niceness: it yields to indexing and answers
    trigger: str = ""
    drift: dict[str, Any] = Field(default_factory=dict)

    def data(self) -> RunData:
        return RunData(
            new=self.new,
            replay=self.replay,
            heldout=self.heldout,
            docs=self.docs,
            profile=StyleProfile.from_dict(self.profile),
        )

    def lora_config(self) -> dict[str, Any]:
        return {
            "task_type": "CAUSAL_LM",
            "r": self.lora_r,
            "lora_alpha": 2 * self.lora_r,
            "lora_dropout": 0.05,
            "target_modules": TARGET_MODULES,
        }


def lora_settings(model: Any) -> dict[str, Any]:
    """The LoRA configuration actually trained (a continued adapter keeps its parent's)."""
    cfg = model.peft_config["default"]
    return {
        "task_type": getattr(cfg.task_type, "value", cfg.task_type),
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
    }


def _fsync_tree(folder: Path, files: bool = True) -> None:
    if files:
        for path in folder.iterdir():
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job_dir / "result.json")


def read_result(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- in the training process ---------------------------------------------------------------


def execute(job: JobSpec) -> dict[str, Any]:
    """Train, score before/after, save the adapter; returns the result (status "trained")."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.base import pick_dtype, resolve_model
    from trainer.dataset import Batches, training_items
    from trainer.gate import evaluate

    started = time.monotonic()
    if job.threads:
        # The training share of the machine's thread budget (headwater.threads).
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    dtype = pick_dtype(job.dtype)
    where = resolve_model(job.base_model, Path(job.cache_dir))
    log.info("loading %s (%s)", where, str(dtype).removeprefix("torch."))
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    if job.parent_dir:
        # Continue from the current adapter: the run only has to learn what is new.
        try:
            model = PeftModel.from_pretrained(base, job.parent_dir, is_trainable=True)
        except (OSError, KeyError, ValueError) as exc:
            msg = f"cannot load the current adapter {job.parent_version}: {exc!r}"
            raise RuntimeError(msg) from exc
        log.info("continuing from %s", job.parent_version)
    else:
        model = get_peft_model(base, LoraConfig(**job.lora_config()))
    data = job.data()
    score = lambda: evaluate(  # noqa: E731
        model, tokenizer, data.heldout, data.profile, job.gate_max_new_tokens, job.max_seq_tokens
    )
    before = score()
    log.info("before: loss %s adherence %s (%d held out)", before.loss, before.adherence, before.n)

    encoded, weights = training_items(tokenizer, data, job.max_seq_tokens)
    batches = Batches(encoded, weights, tokenizer.pad_token_id, job.batch_size, job.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, job.steps // 10)),  # short warm-up
    )
    model.train()
    t0 = time.monotonic()
    losses: list[float] = []
    every = max(1, job.steps // 10)
    for step in range(1, job.steps + 1):
        loss = model(**batches.next()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == job.steps:
            per = (time.monotonic() - t0) / step
            recent = losses[-every:]
            log.info(
                "step %d/%d loss %.4f (%.2f s/step, eta %.0f s)",
                step, job.steps, sum(recent) / len(recent), per, per * (job.steps - step),
            )  # fmt: skip
    train_s = time.monotonic() - t0
    after = score()
    log.info("after: loss %s adherence %s", after.loss, after.adherence)

    out = Path(job.out_dir)
    tmp = out.parent / f".tmp-{job.version}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        meta = {
            "version": job.version,
            "tenant": job.scope,
            "base_model": job.base_model,
            "parent": job.parent_version,
            "created": datetime.now(UTC).isoformat(),
            "trigger": job.trigger,
            "drift": job.drift,
            "data": data.counts(),
            "profile": data.profile.to_dict(),
            "metrics": {"before": before.to_dict(), "after": after.to_dict()},
            "config": {
                **lora_settings(model),
                "steps": job.steps,
                "batch_size": job.batch_size,
                "learning_rate": job.learning_rate,
                "max_seq_tokens": job.max_seq_tokens,
                "dtype": str(dtype).removeprefix("torch."),
                "seed": job.seed,
            },
            "train_seconds": round(train_s, 2),
        }
        (tmp / "headwater.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)  # on disk before the rename makes the folder count as complete
        os.replace(tmp, out)  # the folder appears complete or not at all
        _fsync_tree(out.parent, files=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "status": "trained",
        "version": job.version,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "data": data.counts(),
        "steps": job.steps,
        "final_loss": sum(losses[-every:]) / len(losses[-every:]),
        "train_seconds": round(train_s, 2),
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.run")
    parser.add_argument("--job", type=Path, required=True, help="job folder with job.json")
    parser.add_argument("--parent-pid", type=int, help="exit when this process dies")
    args = parser.parse_args(argv)
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "peft", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Progress bars and deprecation chatter would drown the run's own progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    job_dir: Path = args.job
    # Before torch loads: an idle OpenMP pool must sleep, not spin on the cores we yield.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        job = JobSpec.model_validate_json((job_dir / "job.json").read_text())
        result = execute(job)
    except Exception as exc:
        log.exception("run failed")
        write_result(job_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    write_result(job_dir, result)
    log.info("done: %s", job.version)
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """A run whose trainer died has no one to judge it: let the kernel end it too (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


# -- in the parent ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    returncode: int | None
    timed_out: bool
    seconds: float
    paused_s: float = 0.0
    pauses: int = 0


def launch(
    job_dir: Path,
    timeout_s: float,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    hold: Callable[[], str | None] | None = None,
    check_s: float = 2.0,
    on_hold: Callable[[str | None], None] | None = None,
) -> Launch:
    """Run the job in a child process; kill it after timeout_s of running. Its output goes to
    run.log. Every `check_s`, `hold()` may pause the run (a reason) or resume it (None);
    `on_hold` hears each change."""
    started = time.monotonic()
    parent = ["--parent-pid", str(os.getpid())]
    with (job_dir / "run.log").open("a", encoding="utf-8") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.run", "--job", str(job_dir), *parent],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                logfile.write(line)
                logfile.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))

        reader = threading.Thread(target=pump, name="trainer-run-output", daemon=True)
        reader.start()
        _renice(proc.pid, job_dir)  # before anyone sees the run: it never competes at our priority
        if on_start is not None:
            on_start(proc)
        clock = _RunClock()
        timed_out = False
        try:
            while True:
                wait = timeout_s - clock.running_s
                if wait <= 0:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(wait, check_s) if hold is not None else wait)
                    break
                except subprocess.TimeoutExpired:
                    clock.tick()
                if hold is not None and clock.running_s < timeout_s:
                    reason = hold()
                    if bool(reason) != clock.paused:
                        # A stopped process keeps its memory and gives back its cores at once.
                        os.kill(proc.pid, signal.SIGSTOP if reason else signal.SIGCONT)
                        clock.pause(bool(reason))
                        log.info("run %s: %s", "paused" if reason else "resumed", reason or "")
                        if on_hold is not None:
                            on_hold(reason)
        finally:
            # Timeout, or the parent is being interrupted: never leave a run behind.
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    return Launch(
        proc.returncode, timed_out, time.monotonic() - started, round(clock.paused_s, 2),
        clock.pauses,
    )  # fmt: skip


def _renice(pid: int, job_dir: Path) -> None:
    """Lower the run's OS priority by the job's `nice` (relative to ours), and on Linux make it
    SCHED_IDLE: a niced process still takes ~10 % of a busy core from the indexer, an idle-class
    one only cycles nobody else wants (measured: freshness p99 during a run's start-up)."""
    nice = JobSpec.model_validate_json((job_dir / "job.json").read_text()).nice
    if nice:
        try:
            own = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, pid, min(19, own + nice))
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            pass  # it is gone already; its exit code says why


class _RunClock:
    """Running and paused time of a run (only running time counts toward its timeout)."""

    def __init__(self) -> None:
        self.running_s = self.paused_s = 0.0
        self.paused = False
        self.pauses = 0
        self._last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self.paused:
            self.paused_s += now - self._last
        else:
            self.running_s += now - self._last
        self._last = now

    def pause(self, paused: bool) -> None:
        self.tick()
        self.paused = paused
        self.pauses += paused


if __name__ == "__main__":
    sys.exit(main())
