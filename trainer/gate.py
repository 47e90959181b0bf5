"""The eval gate: score the adapter before and after a run on held-out examples; promote or not.

Two figures on the same held-out examples (never trained on), before (the current adapter, or
the bare base model) and after (the candidate):

- mean response loss (cross-entropy on the response tokens given the chat-formatted prompt);
- style adherence (see `trainer.style`): greedy generations scored against the style profile
  learned from the examples.

The candidate is promoted only if adherence does not drop and the loss is not worse than
before by more than `gate_margin` (relative: after ≤ before × (1 + margin)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.dataset import Item, collate, encode_example
from trainer.style import StyleProfile


@dataclass(frozen=True)
class Metrics:
    loss: float | None
    adherence: float | None
    n: int
    samples: list[str] = field(default_factory=list)  # a few generations, for the record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        return cls(**data)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def judge(before: Metrics, after: Metrics, margin: float) -> GateDecision:
    if after.n == 0 or after.loss is None or before.loss is None:
        return GateDecision(False, "no held-out examples to judge the candidate on")
    if not math.isfinite(after.loss):
        return GateDecision(False, f"candidate loss is {after.loss}")
    style = ""
    if before.adherence is not None and after.adherence is not None:
        if after.adherence < before.adherence - 1e-9:
            return GateDecision(
                False, f"style adherence dropped {before.adherence:.2f} → {after.adherence:.2f}"
            )
        style = f"adherence {before.adherence:.2f} → {after.adherence:.2f}, "
    if after.loss > before.loss * (1 + margin):
        return GateDecision(
            False,
            f"held-out loss worse {before.loss:.3f} → {after.loss:.3f} (margin {margin:.0%})",
        )
    return GateDecision(True, f"{style}loss {before.loss:.3f} → {after.loss:.3f}")


def evaluate(
    model: Any,
    tokenizer: Any,
    heldout: list[Item],
    profile: StyleProfile,
    max_new_tokens: int,
    max_tokens: int,
) -> Metrics:
    """Loss and adherence of `model` (in eval mode, no grad) on the held-out examples."""
    import torch

    if not heldout:
        return Metrics(None, None, 0)
    was_training = model.training
    model.eval()
    losses = []
    generations = []
    with torch.no_grad():
        for ex in heldout:
            ids, labels = encode_example(tokenizer, ex.prompt, ex.response, max_tokens)
            batch = collate([(ids, labels)], tokenizer.pad_token_id)
            losses.append(float(model(**batch).loss))
            if profile.rules:
                generations.append(generate(model, tokenizer, ex.prompt, max_new_tokens))
    if was_training:
        model.train()
    return Metrics(
        loss=sum(losses) / len(losses),
        adherence=profile.adherence(generations),
        n=len(heldout),
        samples=generations[:3],
    )


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one prompt (deterministic, so before/after compare like for like)."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
