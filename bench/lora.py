"""LoRA refresh cost: seconds and peak RSS of one training run against the number of new examples.

Each run is the trainer's own: a `JobSpec` as the scheduler builds it (new examples, a fixed
replay buffer, held-out examples for the gate, document texts, steps from `plan_steps`), run by
`trainer.run.launch` in its own process on the real SmolLM2 base model. The child's peak RSS is
its kernel high-water mark (VmHWM), read while it runs. Then the adapters are hot-swapped into a
serving `Generator` and each swap (load + make current) is timed.

Examples are built from tldr pages: "How do I ...?" -> the page's summary and first command,
signed off in a fixed house style so the gate has a style rule to check.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BenchContext, corpus, description, plot, scoped, write_result

log = logging.getLogger(__name__)

NAME = "lora"
SIGN_OFF = "-- answered from the tldr pages"
_EXAMPLE = re.compile(r"^- (.+?):?\s*\n+`(.+?)`", re.M)


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [50], "replay": 10, "heldout": 1, "docs": 2, "steps": 3, "gate_tokens": 16}
    return {"sizes": [50, 200, 800], "replay": 200, "heldout": 8, "docs": 32, "steps": None,
            "gate_tokens": None}  # fmt: skip


def examples(n: int, offset: int = 0) -> list[Any]:
    """`n` (prompt, response) items from tldr pages, starting at page `offset`."""
    from trainer.dataset import Item

    snapshot, _ = corpus("tldr")
    items = []
    for r in snapshot[offset:]:
        if len(items) >= n:
            break
        text = r.text or ""
        summary = description(text)
        m = _EXAMPLE.search(text)
        if not summary or not m:
            continue
        task, command = m.group(1).strip(), m.group(2).strip()
        items.append(
            Item(
                example_id=f"tldr:{r.doc_id}",
                prompt=f"How do I {task[0].lower()}{task[1:]}?",
                response=f"{summary}\n\n`{command}`\n\n{SIGN_OFF}",
            )
        )
    return items


def run(
    ctx: BenchContext, *, sizes: list[int], replay: int, heldout: int, docs: int,
    steps: int | None, gate_tokens: int | None,
) -> dict[str, Any]:  # fmt: skip
    started = time.monotonic()
    pool = examples(max(sizes) + replay + heldout)
    held, rest = pool[:heldout], pool[heldout:]
    buffer, fresh = rest[:replay], rest[replay:]
    snapshot, _ = corpus("tldr")
    doc_texts = [r.text[:2000] for r in snapshot[-docs:] if r.text] if docs else []
    runs: list[dict[str, Any]] = []
    with scoped(ctx.settings, NAME) as s:
        adapters: list[tuple[str, Path]] = []
        for n in sizes:
            version = f"v{len(adapters) + 1:04d}-bench"
            runs.append(refresh(s, version, fresh[:n], buffer, held, doc_texts, steps, gate_tokens))
            log.info("lora: %s", runs[-1])
            if runs[-1]["status"] == "trained":
                adapters.append((version, s.data_dir / "adapters" / version))
        swaps = _swaps(s, adapters)
    figures = {
        "base_model": ctx.settings.train_base_model,
        "runs": runs,
        "seconds": {str(r["new_examples"]): r["seconds"] for r in runs},
        "peak_rss_mib": {str(r["new_examples"]): r["peak_rss_mib"] for r in runs},
        "swap": swaps,
        "batch_size": ctx.settings.train_batch_size,
        "lora_r": ctx.settings.train_lora_r,
        "dtype": ctx.settings.train_dtype,
    }
    write_result(ctx, NAME, figures, started)
    if len(runs) > 1:
        _plot(ctx, runs)
    return figures


def refresh(
    s: Any, version: str, new: list[Any], buffer: list[Any], held: list[Any],
    doc_texts: list[str], steps: int | None = None, gate_tokens: int | None = None,
    hold: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """One training run as the scheduler builds it, in its own process; its figures.

    `hold` is the scheduler's freshness check (trainer.freshness.Backlog.hold): the run is
    paused while it says so, as the trainer service pauses it."""
    from headwater.threads import budget
    from trainer.dataset import plan_steps
    from trainer.run import JobSpec, launch, read_result
    from trainer.style import StyleProfile

    profile = StyleProfile.learn((e.response, e.weight) for e in buffer + new)
    n_steps = steps or plan_steps(s, len(new) + len(buffer) + len(doc_texts))
    job_dir = s.data_dir / "jobs" / version
    job_dir.mkdir(parents=True, exist_ok=True)
    job = JobSpec(
        version=version,
        out_dir=str(s.data_dir / "adapters" / version),
        base_model=s.train_base_model,
        cache_dir=str(s.cache_dir),
        new=new,
        replay=buffer,
        heldout=held,
        docs=doc_texts,
        profile=profile.to_dict(),
        steps=n_steps,
        batch_size=s.train_batch_size,
        learning_rate=s.train_learning_rate,
        lora_r=s.train_lora_r,
        max_seq_tokens=s.train_max_seq_tokens,
        gate_max_new_tokens=gate_tokens or s.gate_max_new_tokens,
        dtype=s.train_dtype,
        seed=s.train_seed,
        threads=budget(s).train,
        nice=s.train_nice,  # as the scheduler launches it
        trigger="bench",
    )
    (job_dir / "job.json").write_text(job.model_dump_json())
    peak = _PeakRss()
    holds: list[tuple[float, str | None]] = []
    t0 = time.monotonic()
    outcome = launch(
        job_dir, s.train_timeout_s, on_start=peak.watch, hold=hold, check_s=s.train_lag_check_s,
        on_hold=lambda why: holds.append((round(time.monotonic() - t0, 1), why)),
    )  # fmt: skip
    peak.stop()
    result = read_result(job_dir) or {}
    if result.get("status") != "trained":
        log.warning("lora run with %d examples failed: %s", len(new), result.get("error"))
    return {
        "new_examples": len(new),
        "replay_examples": len(buffer),
        "doc_texts": len(doc_texts),
        "heldout": len(held),
        "steps": n_steps,
        "status": result.get("status", f"exit {outcome.returncode}"),
        "error": result.get("error"),
        "seconds": round(outcome.seconds, 1),
        "train_seconds": result.get("train_seconds"),
        "seconds_per_step": round(result["train_seconds"] / n_steps, 2)
        if result.get("train_seconds")
        else None,
        "peak_rss_mib": round(peak.peak / 2**20),
        "paused": outcome.pauses,
        "paused_s": outcome.paused_s,
        "holds": holds[:20],
        "final_loss": result.get("final_loss"),
        "heldout_loss": [
            (result.get("before") or {}).get("loss"),
            (result.get("after") or {}).get("loss"),
        ],
    }


class _PeakRss:
    """Polls the child's VmHWM (the kernel's peak-RSS record) until it exits."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, proc: Any) -> None:
        self._thread = threading.Thread(target=self._poll, args=(proc.pid,), daemon=True)
        self._thread.start()

    def _poll(self, pid: int) -> None:
        status = Path(f"/proc/{pid}/status")
        while not self._done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _swaps(s: Any, adapters: list[tuple[str, Path]]) -> dict[str, Any]:
    """Seconds to load each adapter into a serving generator and make it current."""
    if not adapters:
        return {"skipped": "no adapter was trained"}
    from consumers.generation import load_generator

    generator = load_generator(s)
    if generator is None:
        return {"skipped": "settings.generator is empty"}
    times = []
    # Twice round the list: the first swap also wraps the base model in peft.
    for version, path in adapters * (1 if len(adapters) > 2 else 2):
        name = f"{version}-{len(times)}"
        t0 = time.perf_counter()
        generator.load_adapter(name, path)
        generator.set_current(name)
        times.append(round((time.perf_counter() - t0) * 1000, 1))
    return {"ms": times, "first_ms": times[0], "later_max_ms": max(times[1:], default=None)}


def _plot(ctx: BenchContext, runs: list[dict[str, Any]]) -> None:
    plt = plot()
    xs = [r["new_examples"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, [r["seconds"] for r in runs], marker="o", color="C0", label="seconds per refresh")
    ax.set_xscale("log")
    ax.set_xlabel(f"new examples (replay buffer fixed at {runs[0]['replay_examples']})")
    ax.set_ylabel("seconds", color="C0")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["peak_rss_mib"] for r in runs], marker="s", color="C1", label="peak RSS")
    ax2.set_ylabel("peak RSS, MiB", color="C1")
    ax2.set_ylim(0, max(r["peak_rss_mib"] for r in runs) * 1.3)
    ax.set_ylim(0, max(r["seconds"] for r in runs) * 1.3)
    ax.set_title("LoRA refresh (SmolLM2-135M, own process) vs new examples")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "lora.png", dpi=110)
    plt.close(fig)
