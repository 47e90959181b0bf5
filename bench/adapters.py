"""Many adapters in one query consumer: memory per adapter, first-use load, switching cost.

On the real SmolLM2-135M base, synthetic LoRA adapters of the default rank and target modules
(random weights, each its own folder as the registry writes them) are loaded into one serving
`Generator` until 10, 50 and 200 are held. At each level:

- memory per adapter: the process's RSS growth per adapter loaded, beside the adapter's own
  parameter bytes;
- first-use load time: each `load_adapter` (read the files, inject the LoRA weights);
- per-request switch overhead: requests one after another, each under the same adapter vs each
  under a different (held) one, and the base model; and a batch of 8 answers under one adapter
  vs 8 different adapters in the same forward passes (peft's mixed-adapter batch).

Everything runs in one process in alternation, so the comparisons are side by side.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BenchContext, percentiles, write_result

log = logging.getLogger(__name__)

NAME = "adapters"
STACK = False  # one process and its adapters: no Kafka, no Milvus
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How do I list the files in a directory, including hidden ones?"},
]


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"levels": [10, 50], "tokens": 4, "requests": 4, "batch": 4}
    return {"levels": [10, 50, 200], "tokens": 8, "requests": 6, "batch": 8}


def make_adapters(template: Path, out: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` adapter folders with the template's config and fresh random weights."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(template / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    folders = []
    for i in range(n):
        folder = out / f"v{i + 1:04d}-20260101T0000"
        folder.mkdir(parents=True, exist_ok=True)
        fresh = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in weights.items()}
        save_file(fresh, str(folder / "adapter_model.safetensors"))
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        (folder / "headwater.json").write_text(json.dumps({"synthetic": True}))
        folders.append(folder)
    return folders


def template_adapter(s: Any, out: Path) -> Path:
    """One adapter of the trainer's configuration (rank, alpha, targets) on the base model."""
    from peft import LoraConfig, get_peft_model

    from models.base import load_generator as load_model
    from trainer.run import TARGET_MODULES

    model, _ = load_model(s)
    r = s.train_lora_r
    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.05,
                     target_modules=TARGET_MODULES, init_lora_weights=False)  # fmt: skip
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def run(ctx: BenchContext, *, levels: list[int], tokens: int, requests: int, batch: int
        ) -> dict[str, Any]:  # fmt: skip
    import psutil

    from consumers.generation import load_generator
    from headwater.threads import use_threads

    started = time.monotonic()
    s = ctx.settings.model_copy(update={
        "max_new_tokens": tokens, "generate_max_batch": batch, "adapter_cache_mb": 1e6,
    })  # fmt: skip
    threads = use_threads(s, "generate")
    work = s.data_dir / "bench-adapters"
    template = template_adapter(s, work / "template")
    folders = make_adapters(template, work / "tenants", max(levels))
    generator = load_generator(s)
    assert generator is not None
    process = psutil.Process()
    names = [f"t{i:04d}/{f.name}" for i, f in enumerate(folders)]
    for name, folder in zip(names, folders, strict=True):
        generator.offer(name, folder)
    "".join(generator.stream(MESSAGES, adapter=None))  # warm-up: the base model's first pass
    rss0 = process.memory_info().rss
    loaded = 0
    per_level: dict[str, Any] = {}
    for level in levels:
        load_ms, load_cpu_ms = [], []
        for name in names[loaded:level]:
            t0, c0 = time.perf_counter(), time.process_time()
            generator.load_adapter(name)
            load_ms.append(1000 * (time.perf_counter() - t0))
            load_cpu_ms.append(1000 * (time.process_time() - c0))
        loaded = level
        rss = process.memory_info().rss
        x: dict[str, Any] = {
            "held": len(generator.loaded),
            "rss_mib": round(rss / 2**20),
            "rss_per_adapter_mib": round((rss - rss0) / 2**20 / level, 3),
            "param_mib_per_adapter": round(generator.adapter_bytes / 2**20 / level, 3),
            "load_ms": _stats(load_ms),
            # CPU time of the process: what a load costs, whatever else the machine runs.
            "load_cpu_ms": _stats(load_cpu_ms),
        }
        x |= _switching(generator, names[:level], requests)
        x |= _batches(generator, names[:level], batch)
        per_level[str(level)] = x
        log.info("adapters: %d held: %s", level, x)
    top = per_level[str(max(levels))]
    figures = {
        "base_model": s.generator,
        "lora_r": s.train_lora_r,
        "torch_threads": threads,
        "tokens_per_request": tokens,
        "levels": per_level,
        "rss_per_adapter_mib": top["rss_per_adapter_mib"],
        "load_p50_ms": top["load_ms"]["p50"],
        "load_cpu_p50_ms": top["load_cpu_ms"]["p50"],
        "switch_overhead_ms": top["switch_overhead_ms"],
        "mixed_batch_overhead": top["mixed_over_same"],
    }
    generator.close()
    shutil.rmtree(work, ignore_errors=True)
    write_result(ctx, NAME, figures, started)
    return figures


def _stats(values: list[float]) -> dict[str, float]:
    p = percentiles(values)
    return {k: round(p[k], 2) for k in ("p50", "p99", "max", "mean")}


def _switching(generator: Any, names: list[str], requests: int) -> dict[str, Any]:
    """Milliseconds per request: base, the same adapter each time, a different one each time."""
    ms: dict[str, list[float]] = {"base": [], "same": [], "switching": []}
    cpu: dict[str, list[float]] = {"base": [], "same": [], "switching": []}
    for i in range(requests):  # interleaved, so the machine's load hits all three alike
        for kind, adapter in (("base", None), ("same", names[0]),
                              ("switching", names[1 + i % (len(names) - 1)])):  # fmt: skip
            t0, c0 = time.perf_counter(), time.process_time()
            "".join(generator.stream(MESSAGES, adapter=adapter))
            ms[kind].append(1000 * (time.perf_counter() - t0))
            cpu[kind].append(1000 * (time.process_time() - c0))
    med = {k: percentiles(v)["p50"] for k, v in ms.items()}
    med_cpu = {k: percentiles(v)["p50"] for k, v in cpu.items()}
    return {
        "request_ms": {k: round(v, 1) for k, v in med.items()},
        "request_cpu_ms": {k: round(v, 1) for k, v in med_cpu.items()},
        "switch_overhead_ms": round(med["switching"] - med["same"], 1),
        "switch_overhead_cpu_ms": round(med_cpu["switching"] - med_cpu["same"], 1),
        "adapter_overhead_ms": round(med["same"] - med["base"], 1),
    }


def _batches(generator: Any, names: list[str], batch: int) -> dict[str, Any]:
    """Decode-step milliseconds of `batch` answers together: base, one adapter, all different."""
    out: dict[str, float] = {}
    for kind, adapters in (("base", [None] * batch), ("same", [names[0]] * batch),
                           ("mixed", [names[i % len(names)] for i in range(batch)])):  # fmt: skip
        steps0, secs0 = generator.steps, generator.step_seconds
        streams = [generator.stream(MESSAGES, adapter=a) for a in adapters]
        readers = [threading.Thread(target=lambda st=st: "".join(st)) for st in streams]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        steps = generator.steps - steps0
        out[kind] = round(1000 * (generator.step_seconds - secs0) / max(1, steps), 1)
    return {
        "batch_step_ms": out,
        "mixed_over_same": round(out["mixed"] / out["same"], 2) if out["same"] else None,
    }
