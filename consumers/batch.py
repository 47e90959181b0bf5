"""The decoding batch: the key/value cache of every running answer, one row per answer.

Each answer is prefilled alone (its prompt through the model, batch of one), then joins the batch
between two steps; every step then runs one forward pass for all rows, one new token each. Rows
have prompts of different lengths, so the batch is left-padded: padding keys are masked out and
each row keeps its own positions, so a row computes what it would compute alone. A row that ends
(finished, cancelled) leaves between steps and the padding no row needs any more is cut off.

Only the generator's decoding thread touches a batch; nothing here is thread-safe.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class Prefill:
    """One prompt's cache and next-token logits, computed alone, ready to join a batch."""

    def __init__(self, cache: Any, length: int, logits: torch.Tensor) -> None:
        self.cache, self.length, self.logits = cache, length, logits


def prefill(model: Any, input_ids: torch.Tensor, adapter: str | None, peft: bool) -> Prefill:
    """Run one prompt ([1, L] ids) through the model under `adapter` (peft slot name or None)."""
    cache = DynamicCache(config=getattr(model, "config", None))
    extra = {"adapter_names": [adapter or BASE]} if peft else {}
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg(model): cache},
        **extra,
    )
    return Prefill(cache, int(input_ids.shape[1]), out.logits[:, -1, :].float())


def cache_arg(model: Any) -> str:
    """The forward argument that takes the cache: `cache` (transformers ≥ 5.2x), else the old
    `past_key_values`. The cache object is updated in place either way."""
    # A PeftModel wraps a tuner that wraps the transformers model (get_base_model() would need
    # a valid active adapter, which a mixed-adapter batch does not use).
    base = model.base_model.model if getattr(model, "peft_config", None) is not None else model
    return _cache_arg(type(base))


@functools.cache
def _cache_arg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecodeBatch:
    """Rows of running answers: their cache, attention mask, positions and adapters."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [rows, cached tokens]: 1 = real
        self.positions = torch.zeros(0, dtype=torch.long)  # next position of each row
        self.adapters: list[str] = []  # peft slot name or BASE, per row

    def __len__(self) -> int:
        return len(self.adapters)

    def join(self, p: Prefill, adapter: str | None) -> None:
        """Append a prefilled prompt as the last row (both sides left-padded to one width)."""
        if not self.adapters:
            self.cache = p.cache
            self.mask = torch.ones((1, p.length), dtype=torch.long)
        else:
            width = max(self.mask.shape[1], p.length)
            for mine, theirs in zip(self.cache.layers, p.cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat(
                    [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
                )
            row = torch.ones((1, p.length), dtype=torch.long)
            self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(row, width)])
        self.positions = torch.cat([self.positions, torch.tensor([p.length])])
        self.adapters.append(adapter or BASE)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); drop padding that no remaining row needs."""
        if len(rows) == len(self.adapters):
            return
        if not rows:
            self.__init__()  # type: ignore[misc]
            return
        idx = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask[idx]
        # The leading columns every remaining row pads: never attended to, so cut them off.
        first = int(self.mask.argmax(dim=1).min())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:, :]
            layer.values = layer.values[idx, :, first:, :]
        self.positions = self.positions[idx]
        self.adapters = [self.adapters[i] for i in rows]

    def step(self, model: Any, tokens: torch.Tensor, peft: bool) -> torch.Tensor:
        """One forward pass: each row's last token ([rows]) in, each row's next logits out."""
        self.mask = torch.cat([self.mask, torch.ones((len(self), 1), dtype=torch.long)], dim=1)
        extra = {"adapter_names": list(self.adapters)} if peft else {}
        out = model(
            input_ids=tokens.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.positions.view(-1, 1),
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg(model): self.cache},
            **extra,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1, :].float()


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, tokens, dim] left-padded with zeros to `width` tokens."""
    missing = width - t.shape[2]
    if missing <= 0:
        return t
    pad = torch.zeros((t.shape[0], t.shape[1], missing, t.shape[3]), dtype=t.dtype)
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([torch.zeros((mask.shape[0], missing), dtype=mask.dtype), mask], dim=1)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row ([V] logits, ids seen so far)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)
