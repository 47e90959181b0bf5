"""Concurrent answers: tokens/s and first-token latency with 1, 4 and 8 answers at once.

The query consumer's generator (SmolLM2-135M, the settings' dtype and thread share) answers
prompts built as the answerer builds them (`build_prompt`: the system prompt, k tldr pages as
numbered passages, the question). For each concurrency n, n answers start at the same moment;
the figure is every generated token over the wall time from the start to the last answer's end
(prefills included), and each answer's time to its first text. The concurrencies alternate
round by round in one process, so their ratio is measured side by side. Each answer's text is
also compared with the same prompt answered alone (greedy: batching must not change it).

The dtype section times the base model's numeric type on this CPU: the one `auto` chose (and
why), against the other one, on the same matmul and the same forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from bench.common import BenchContext, corpus, description, percentiles, write_result

log = logging.getLogger(__name__)

NAME = "answers"
STACK = False  # the generator alone: no Kafka, no Milvus
K = 3


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"concurrency": [1, 4, 8], "rounds": 1, "max_new_tokens": 24}
    # Answers as long as the product lets them be (settings.max_new_tokens' default).
    return {"concurrency": [1, 4, 8], "rounds": 2, "max_new_tokens": 160}


def prompts(n: int) -> list[list[dict[str, str]]]:
    """`n` answer prompts: a tldr page's summary as the question, that page and the next two
    as the passages."""
    from consumers.answerer import build_prompt
    from headwater.events import Hit

    snapshot, _ = corpus("tldr")
    pages = [r for r in snapshot if r.text and description(r.text)]
    out = []
    for i in range(n):
        summary = description(pages[i].text) or ""
        question = f"How do I {summary[:1].lower()}{summary[1:]}"
        hits = [
            Hit(doc_id=r.doc_id, version=1, chunk_id=f"c{i}-{j}", score=1.0, text=r.text[:1200])
            for j, r in enumerate(pages[i : i + K])
        ]
        out.append(build_prompt(question, hits))
    return out


def run(ctx: BenchContext, *, concurrency: list[int], rounds: int, max_new_tokens: int
        ) -> dict[str, Any]:  # fmt: skip
    from consumers.generation import load_generator
    from headwater.threads import use_threads
    from models.base import dtype_choice

    started = time.monotonic()
    s = ctx.settings.model_copy(
        update={"max_new_tokens": max_new_tokens, "generate_max_batch": max(concurrency)}
    )
    threads = use_threads(s, "generate")
    dtype, why = dtype_choice(s.train_dtype)
    generator = load_generator(s)
    if generator is None:
        from headwater.errors import BenchError

        raise BenchError('settings.generator is "" (extractive answers): nothing to measure')
    asks = prompts(max(concurrency))
    alone = {}
    for i, p in enumerate(asks):  # the reference texts, and a warm-up
        alone[i] = "".join(generator.stream(p, adapter=None))
    per_n: dict[int, list[dict[str, Any]]] = {n: [] for n in concurrency}
    for r in range(rounds):
        for n in concurrency:
            per_n[n].append(_together(generator, asks[:n], alone))
            log.info("answers: round %d, %d at once: %s", r, n, per_n[n][-1])
    by_n = {str(n): _summary(runs) for n, runs in per_n.items()}
    one = by_n[str(min(concurrency))]
    for x in by_n.values():
        x["speedup"] = round(x["tokens_per_s"] / one["tokens_per_s"], 2)
        x["decode_speedup"] = round(x["decode_tokens_per_s"] / one["decode_tokens_per_s"], 2)
        x["cpu_speedup"] = round(x["tokens_per_cpu_s"] / one["tokens_per_cpu_s"], 2)
    top = by_n[str(max(concurrency))]
    bound = _bound(generator, asks, by_n, per_n)
    figures = {
        "generator": s.generator,
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": why,
        "torch_threads": threads,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens_mean": round(
            sum(int(generator.encode(p)["input_ids"].shape[1]) for p in asks) / len(asks)
        ),
        "by_concurrency": by_n,
        "speedup": top["speedup"],
        "decode_speedup": top["decode_speedup"],
        "cpu_speedup": top["cpu_speedup"],
        "target_speedup": 4.0,
        "identical_to_alone": sum(x["identical"] for x in by_n.values()),
        "answers_compared": sum(x["answers"] for x in by_n.values()),
        "bound": bound,
        "dtypes": _dtypes(s, generator),
    }
    generator.close()
    write_result(ctx, NAME, figures, started)
    return figures


def _bound(
    generator: Any, asks: list[Any], by_n: dict[str, Any], per_n: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    """What batching can give at best with this model on this CPU, from this run's own costs.

    n answers of T tokens each cost n prefills (a prompt's prefill is already a matrix-matrix
    product: batching prompts saves no arithmetic) plus T decode steps of n rows; one answer
    costs one prefill plus T one-row steps. The bound is the ratio of the two.
    """
    import torch

    from consumers.batch import prefill

    times = []
    with torch.inference_mode():
        for p in asks:
            ids = generator.encode(p)["input_ids"]
            t0 = time.perf_counter()
            prefill(generator.base, ids, None, False)
            times.append(time.perf_counter() - t0)
    pre = sum(times) / len(times)
    n = max(per_n)
    step1, stepn = by_n["1"]["decode_step_ms"] / 1000, by_n[str(n)]["decode_step_ms"] / 1000
    tokens = sum(r["tokens"] for r in per_n[n]) / sum(len(r["first_s"]) for r in per_n[n])
    return {
        "prefill_ms": round(1000 * pre, 1),
        "tokens_per_answer": round(tokens, 1),
        "at_once": n,
        "speedup": round(n * (pre + tokens * step1) / (n * pre + tokens * stepn), 2),
        "decode_only_speedup": round(n * step1 / stepn, 2),
    }


def _together(generator: Any, asks: list[Any], alone: dict[int, str]) -> dict[str, Any]:
    """Start every prompt at once; tokens, wall time, first-text latencies, identical texts."""
    firsts: list[float] = [float("nan")] * len(asks)
    texts: list[str] = [""] * len(asks)
    counts = [0] * len(asks)
    steps0, rows0, step_s0 = generator.steps, generator.rows_stepped, generator.step_seconds
    t0, c0 = time.perf_counter(), time.process_time()
    streams = [generator.stream(p, adapter=None) for p in asks]

    def read(i: int) -> None:
        parts = []
        for piece in streams[i]:
            if not parts:
                firsts[i] = time.perf_counter() - t0
            parts.append(piece)
        texts[i] = "".join(parts)
        counts[i] = len(streams[i].produced)

    workers = [threading.Thread(target=read, args=(i,)) for i in range(len(asks))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    steps = generator.steps - steps0
    return {
        "tokens": sum(counts),
        "wall_s": wall,
        "cpu_s": cpu,
        "first_s": firsts,
        "identical": sum(texts[i] == alone[i] for i in range(len(asks))),
        "rows_per_step": (generator.rows_stepped - rows0) / steps if steps else None,
        "step_ms": 1000 * (generator.step_seconds - step_s0) / steps if steps else None,
        "step_rows": generator.rows_stepped - rows0,
        "step_s": generator.step_seconds - step_s0,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    firsts = percentiles([f for r in runs for f in r["first_s"]])
    return {
        "tokens_per_s": round(tokens / wall, 2),
        # Per CPU second of this process: what batching saves, however loaded the machine is.
        "tokens_per_cpu_s": round(tokens / max(1e-9, sum(r["cpu_s"] for r in runs)), 2),
        "first_token_p50_s": round(firsts["p50"], 2),
        "first_token_max_s": round(firsts["max"], 2),
        "decode_step_ms": round(sum(r["step_ms"] or 0 for r in runs) / len(runs), 1),
        "rows_per_step": round(sum(r["rows_per_step"] or 0 for r in runs) / len(runs), 2),
        "identical": sum(r["identical"] for r in runs),
        "answers": sum(len(r["first_s"]) for r in runs),
        "rounds": [round(r["tokens"] / r["wall_s"], 2) for r in runs],
        # Decoding alone (the batched steps, without the prompts' prefill).
        "decode_tokens_per_s": round(
            sum(r["step_rows"] for r in runs) / max(1e-9, sum(r["step_s"] for r in runs)), 2
        ),
    }


def _dtypes(s: Any, generator: Any) -> dict[str, Any]:
    """The chosen dtype against the other one on this CPU: a model-sized matmul, and one
    forward pass of the base model over a 64-token prompt (the generator is done with)."""
    import torch

    from models.base import matmul_seconds, native_bf16

    ids = torch.randint(0, 1000, (1, 64))
    out: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
    }
    base = generator.base
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = base.to(dtype)
        with torch.inference_mode():
            model(input_ids=ids)  # warm-up
            t0 = time.perf_counter()
            model(input_ids=ids)
            forward = time.perf_counter() - t0
        out[name] = {
            "matmul_ms": round(1000 * matmul_seconds(dtype), 2),
            "forward_64_tokens_ms": round(1000 * forward, 1),
        }
    out["bf16_over_fp32"] = round(
        out["bfloat16"]["forward_64_tokens_ms"] / out["float32"]["forward_64_tokens_ms"], 1
    )
    return out
