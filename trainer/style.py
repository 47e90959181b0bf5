"""The style the examples agree on, and how well a generated answer follows it.

The rule is learned from the example responses themselves, so no one writes the style down twice:

- **sign-off**: when at least half the (weighted) responses end with the same short last line,
  a generation must end with exactly that line (after stripping whitespace);
- **JSON body**: when at least half the responses, without that sign-off line, parse as a JSON
  object, a generation's body must parse as a JSON object too.

A generation scores the fraction of the profile's rules it meets; the adherence of a set of
generations is the mean. A profile without rules has no adherence (the gate then uses loss only).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

MIN_SHARE = 0.5
MAX_SIGN_OFF_CHARS = 80
MIN_SUPPORT = 3  # fewer examples than this say nothing about a style


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


@dataclass(frozen=True)
class StyleProfile:
    sign_off: str | None = None
    json_body: bool = False
    support: float = 0.0  # total weight of the responses learned from

    @classmethod
    def learn(cls, responses: Iterable[tuple[str, float]]) -> StyleProfile:
        """Learn from (response, weight) pairs; weight 0 responses do not vote."""
        voted = [(text, w) for text, w in responses if w > 0]
        total = sum(w for _, w in voted)
        if len(voted) < MIN_SUPPORT or total <= 0:
            return cls(support=total)
        endings: Counter[str] = Counter()
        for text, w in voted:
            lines = _lines(text)
            # A one-line answer has no sign-off: its last line is the answer.
            if len(lines) >= 2 and len(lines[-1]) <= MAX_SIGN_OFF_CHARS:
                endings[lines[-1]] += w
        sign_off = None
        if endings:
            line, weight = endings.most_common(1)[0]
            if weight / total >= MIN_SHARE:
                sign_off = line
        probe = cls(sign_off=sign_off)
        json_weight = sum(w for text, w in voted if _is_json_object(probe.body(text)))
        return cls(sign_off=sign_off, json_body=json_weight / total >= MIN_SHARE, support=total)

    @property
    def rules(self) -> list[str]:
        return [r for r, on in (("sign_off", self.sign_off), ("json_body", self.json_body)) if on]

    def body(self, text: str) -> str:
        """The text without a trailing sign-off line."""
        lines = text.strip().splitlines()
        if self.sign_off and lines and lines[-1].strip() == self.sign_off:
            lines = lines[:-1]
        return "\n".join(lines).strip()

    def score(self, text: str) -> float | None:
        """Fraction of the rules `text` meets; None when the profile has no rules."""
        rules = self.rules
        if not rules:
            return None
        met = 0
        if self.sign_off:
            lines = _lines(text)
            met += bool(lines) and lines[-1] == self.sign_off
        if self.json_body:
            met += _is_json_object(self.body(text))
        return met / len(rules)

    def adherence(self, texts: Iterable[str]) -> float | None:
        scores = [self.score(t) for t in texts]
        known = [s for s in scores if s is not None]
        return sum(known) / len(known) if known else None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StyleProfile:
        return cls(**data)  # type: ignore[arg-type]
