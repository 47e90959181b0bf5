"""The embedder exported to ONNX once, from its local weights, into `cache_dir` (no hub).

The graph is the whole sentence-transformers model (transformer, pooling and, where the model
has it, normalisation), so every backend returns the same vectors as `SentenceTransformer.encode`.
Next to it: an int8 copy (dynamic quantisation with one weight scale per output channel; one
scale per tensor cost ~0.06 of cosine to the fp32 vectors, per channel ~0.007: see
BENCHMARKS.md, ingest), the tokenizer, and a completion mark written last. Exporting takes
~15 s; one process exports while the others wait on a file lock and then find the finished
folder, like `models.base`'s GGUF conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from headwater.errors import EmbedderError
from headwater.settings import DEFAULT_EMBEDDER

log = logging.getLogger(__name__)

COMPLETE_MARK = "headwater-exported.json"
# Bumped when the recipe changes, so an old export is redone rather than trusted.
RECIPE = 1
FP32_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
OPSET = 17


@dataclass(frozen=True)
class Exported:
    """A finished export: where its files are and what the graph expects."""

    folder: Path
    inputs: tuple[str, ...]
    dim: int
    max_tokens: int
    normalized: bool

    def model_file(self, precision: str) -> Path:
        return self.folder / (INT8_FILE if precision == "int8" else FP32_FILE)


def export_folder(name: str, source: str, cache_dir: Path) -> Path:
    """`<cache_dir>/models/<slug>-onnx-<hash of the source>`: one folder per source weights."""
    from index.embedder import model_slug

    digest = hashlib.sha1(f"{name}\x00{source}".encode()).hexdigest()[:10]
    return Path(cache_dir) / "models" / f"{model_slug(name)}-onnx-{digest}"


def resolve_onnx(name: str, source: str, cache_dir: Path) -> Exported:
    """The export of model `name` (weights at `source`), made now if missing or outdated."""
    target = export_folder(name, source, cache_dir)
    found = _read_mark(target, source)
    if found is not None:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        found = _read_mark(target, source)
        if found is None:
            export(source, target, name=name)
            found = _read_mark(target, source)
    if found is None:  # pragma: no cover - export writes the mark last or raises
        raise EmbedderError(f"exporting {name!r} to {target} left no completion mark")
    return found


def _read_mark(target: Path, source: str) -> Exported | None:
    try:
        mark = json.loads((target / COMPLETE_MARK).read_text())
    except (OSError, ValueError):
        return None
    if mark.get("recipe") != RECIPE or mark.get("source") != _source_id(source):
        return None
    return Exported(target, tuple(mark["inputs"]), int(mark["dim"]), int(mark["max_tokens"]),
                    bool(mark["normalized"]))  # fmt: skip


def _source_id(source: str) -> str:
    """The weights' path with their size and time: a reinstalled package exports again."""
    path = Path(source)
    if not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".md")
    return source + ":" + ",".join(f"{p.name}={p.stat().st_size}" for p in files)


def export(source: str, target: Path, *, name: str = DEFAULT_EMBEDDER) -> None:
    """Export the model at `source` to ONNX (fp32 and int8) into `target`, atomically."""
    import torch
    from sentence_transformers import SentenceTransformer

    started = time.monotonic()
    log.info("exporting embedder %s to ONNX in %s (once)", name, target)
    try:
        st = SentenceTransformer(source, device="cpu")
    except Exception as exc:
        raise EmbedderError(f"cannot load embedder {name!r} to export it: {exc}") from exc
    tokenizer = st.tokenizer
    inputs = tuple(tokenizer.model_input_names)
    dim = int(st.get_embedding_dimension() or 0)
    if not dim:
        raise EmbedderError(f"embedder {name!r} does not report its dimension")
    normalized = any(type(m).__name__ == "Normalize" for m in st)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        graph = _graph(st, inputs).eval()
        example = tokenizer(["an example", "another, longer example"], padding=True,
                            return_tensors="pt")  # fmt: skip
        axes = {n: {0: "batch", 1: "tokens"} for n in inputs} | {"embedding": {0: "batch"}}
        with torch.no_grad():
            # The TorchScript exporter: the dynamo one needs onnxscript and traced this graph's
            # attention mask into fixed shapes in our trials.
            torch.onnx.export(
                graph, tuple(example[n] for n in inputs), str(tmp / FP32_FILE),
                input_names=list(inputs), output_names=["embedding"], dynamic_axes=axes,
                opset_version=OPSET, dynamo=False,
            )  # fmt: skip
        quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
        tokenizer.save_pretrained(tmp)
        mark = {
            "recipe": RECIPE, "source": _source_id(source), "name": name, "inputs": list(inputs),
            "dim": dim, "max_tokens": int(st.max_seq_length or 256), "normalized": normalized,
            "torch": torch.__version__, "exported": time.time(),
        }  # fmt: skip
        (tmp / COMPLETE_MARK).write_text(json.dumps(mark))
        if target.exists():
            shutil.rmtree(target)  # a leftover without a valid mark
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported in %.1f s", time.monotonic() - started)


def quantize_int8(fp32: Path, out: Path) -> None:
    """Dynamic int8 with per-channel weight scales (activations quantised per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "-pre.onnx")
    # Symbolic shape inference fails on this graph; ONNX's own inference is enough here.
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)


def _graph(st: Any, inputs: tuple[str, ...]) -> Any:
    """What is exported: token ids in, the model's sentence embedding out."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *tensors: Any) -> Any:
            return self.st(dict(zip(inputs, tensors, strict=True)))["sentence_embedding"]

    return Graph()
