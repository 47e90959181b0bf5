"""What one run trains and judges on, and how it becomes token batches.

A run trains one scope's adapter on that scope's data only (a tenant's, or the house style's),
bounded by what is new, never by the corpus: the scope's examples since its current adapter, a
bounded random replay of its earlier examples (so the adapter does not forget), a few chunk
texts of the tenant's changed documents (vocabulary; never for the house adapter), and the
held-out examples the gate scores (never trained on: `is_heldout` splits by example id hash).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from headwater.errors import StoreError
from headwater.events import HOUSE
from headwater.settings import Settings
from index.store import ChunkStore
from trainer.examples import ExampleLog, is_heldout
from trainer.style import StyleProfile

log = logging.getLogger(__name__)

DOC_SHARE = 0.1  # document text's share of the sampling weight: vocabulary, not behaviour
DOC_CHARS = 2000  # chunk texts are cut to this before tokenizing


class Item(BaseModel):
    """One example as the run sees it."""

    example_id: str
    prompt: str
    response: str
    weight: float = 1.0


@dataclass
class RunData:
    new: list[Item] = field(default_factory=list)
    replay: list[Item] = field(default_factory=list)
    heldout: list[Item] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    profile: StyleProfile = field(default_factory=StyleProfile)

    @property
    def train_size(self) -> int:
        return len(self.new) + len(self.replay) + len(self.docs)

    def counts(self) -> dict[str, int]:
        return {
            "new_examples": len(self.new),
            "replay_examples": len(self.replay),
            "doc_texts": len(self.docs),
            "heldout_examples": len(self.heldout),
        }


def select(log_: ExampleLog, base: int, end: int, settings: Settings, seed: int = 0) -> RunData:
    """Split the example log at byte offsets: [base, end) is new, [0, base) is history."""
    frac = settings.gate_holdout_fraction
    # Examples reach the log in partition-interleaving order, which differs from run to run;
    # a canonical order makes a run over the same examples train and gate the same way.
    earlier = sorted(log_.read(0, base), key=_order)
    fresh = sorted(log_.read(base, end), key=_order)
    heldout = [e for e in earlier + fresh if is_heldout(e.example_id, frac)]
    train_earlier = [e for e in earlier if not is_heldout(e.example_id, frac) and e.weight > 0]
    new = [e for e in fresh if not is_heldout(e.example_id, frac) and e.weight > 0]
    rng = random.Random(seed)
    replay = rng.sample(train_earlier, min(len(train_earlier), settings.train_replay_buffer))
    # The established style: every training-side example so far, not just this run's batch, so
    # one batch of odd examples cannot redefine what the gate checks.
    profile = StyleProfile.learn((e.response, e.weight) for e in train_earlier + new)

    def item(e: Any) -> Item:
        return Item(example_id=e.example_id, prompt=e.prompt, response=e.response, weight=e.weight)

    return RunData(
        new=[item(e) for e in new],
        replay=[item(e) for e in replay],
        heldout=[item(e) for e in heldout[-settings.gate_max_holdout :]],
        profile=profile,
    )


def _order(e: Any) -> bytes:
    return hashlib.sha256(e.example_id.encode()).digest()


def plan_steps(settings: Settings, train_size: int) -> int:
    """Steps scale with the run's data (a few passes), capped at settings.train_steps."""
    passes = settings.train_epochs * train_size / settings.train_batch_size
    return max(1, min(settings.train_steps, round(passes + 0.4999)))


def fetch_chunk_texts(
    settings: Settings, tenant: str, chunk_ids: list[str], limit: int, timeout_s: float = 10.0
) -> list[str]:
    """Texts of some chunks `tenant` added, read through the index; [] when there is no index.

    Only rows of `tenant` come back, whatever the ids: another tenant's text never enters this
    tenant's run (and the house adapter never gets document text at all). A run must work
    without Milvus: an unreachable one only costs the run its document text.
    """
    ids = chunk_ids[-limit:] if limit and tenant != HOUSE else []
    if not ids:
        return []
    try:
        store = ChunkStore.existing(settings, timeout_s=timeout_s)
    except StoreError as exc:
        log.warning("no document text for this run: %s", exc)
        return []
    if store is None:
        return []
    try:
        texts = {r["chunk_id"]: r["text"] for r in store.chunk_rows(ids) if r["tenant"] == tenant}
    except StoreError as exc:
        log.warning("document text fetch failed, training without it: %s", exc)
        return []
    finally:
        store.close()
    return [texts[c][:DOC_CHARS] for c in ids if texts.get(c)][:limit]


# -- tokens (runs in the training process) ---------------------------------------------------


def encode_example(
    tokenizer: Any, prompt: str, response: str, max_tokens: int
) -> tuple[list, list]:
    """Chat-formatted ids and labels; the loss is on the response (and its end token) only."""
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    r = r[:max_tokens]
    p = p[-max(1, max_tokens - len(r)) :]  # keep the prompt's end (its question and role tag)
    return p + r, [-100] * len(p) + r


def encode_text(tokenizer: Any, text: str, max_tokens: int) -> tuple[list, list]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return ids, list(ids)


class Batches:
    """Endless batches sampled with replacement in proportion to item weight."""

    def __init__(self, encoded: list[tuple[list, list]], weights: list[float], pad_id: int,
                 batch_size: int, seed: int) -> None:  # fmt: skip
        if not encoded:
            raise ValueError("no training items")
        self.encoded, self.weights = encoded, weights
        self.pad_id, self.batch_size = pad_id, batch_size
        self.rng = random.Random(seed)

    def next(self) -> dict[str, Any]:
        picks = self.rng.choices(self.encoded, weights=self.weights, k=self.batch_size)
        return collate(picks, self.pad_id)


def collate(picks: list[tuple[list, list]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in picks)
    input_ids = torch.full((len(picks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(picks), width), -100, dtype=torch.long)
    mask = torch.zeros((len(picks), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(picks):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def training_items(
    tokenizer: Any, data: RunData, max_tokens: int
) -> tuple[list[tuple[list, list]], list[float]]:
    """Encoded items and their sampling weights (document text gets DOC_SHARE of the total)."""
    examples = data.new + data.replay
    encoded = [encode_example(tokenizer, e.prompt, e.response, max_tokens) for e in examples]
    weights = [e.weight for e in examples]
    if data.docs:
        doc_weight = (DOC_SHARE * sum(weights) / len(data.docs)) if weights else 1.0
        encoded += [encode_text(tokenizer, t, max_tokens) for t in data.docs]
        weights += [doc_weight] * len(data.docs)
    return encoded, weights
