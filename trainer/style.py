"""The style the examples agree on, and how well a generated answer follows it.

The rule is learned from the example responses themselves, so no one writes the style down twice:

- **sign-off**: when at least half the (weighted) responses end with the same short last line,
  a generation must end with exactly that line (after stripping whitespace);
- **opening**: likewise, when at least half start with the same short first line (a greeting),
  a generation must start with exactly that line;
- **JSON body**: when at least half the responses, without that sign-off line, parse as a JSON
  object, a generation's body must parse as a JSON object too.

A generation scores the fraction of the profile's rules it meets; the adherence of a set of
generations is the mean. A profile without rules has no adherence (the gate then uses loss only).
Each tenant's profile is learned from its own examples only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

MIN_SHARE = 0.5
MAX_SIGN_OFF_CHARS = 80  # also the longest opening line
MIN_SUPPORT = 3  # fewer examples than this say nothing about a style


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _common_line(voted: list[tuple[str, float]], total: float, at: int, drop: str | None = None
                 ) -> str | None:  # fmt: skip
    """The short line at position `at` (0 first, -1 last) that at least MIN_SHARE of the weight
    shares, after dropping a trailing `drop` line; a one-line answer has none (its only line is
    the answer)."""
    lines: Counter[str] = Counter()
    for text, w in voted:
        found = _lines(text)
        if drop is not None and found and found[-1] == drop:
            found = found[:-1]
        if len(found) >= 2 and len(found[at]) <= MAX_SIGN_OFF_CHARS:
            lines[found[at]] += w
    if lines:
        line, weight = lines.most_common(1)[0]
        if weight / total >= MIN_SHARE:
            return line
    return None


@dataclass(frozen=True)
class StyleProfile:
    sign_off: str | None = None
    json_body: bool = False
    support: float = 0.0  # total weight of the responses learned from
    opening: str | None = None

    @classmethod
    def learn(cls, responses: Iterable[tuple[str, float]]) -> StyleProfile:
        """Learn from (response, weight) pairs; weight 0 responses do not vote."""
        voted = [(text, w) for text, w in responses if w > 0]
        total = sum(w for _, w in voted)
        if len(voted) < MIN_SUPPORT or total <= 0:
            return cls(support=total)
        sign_off = _common_line(voted, total, -1)
        opening = _common_line(voted, total, 0, drop=sign_off)  # a greeting needs a body after
        probe = cls(sign_off=sign_off, opening=opening)
        json_weight = sum(w for text, w in voted if _is_json_object(probe.body(text)))
        return cls(
            sign_off=sign_off,
            json_body=json_weight / total >= MIN_SHARE,
            support=total,
            opening=opening,
        )

    @property
    def rules(self) -> list[str]:
        named = (("sign_off", self.sign_off), ("json_body", self.json_body),
                 ("opening", self.opening))  # fmt: skip
        return [r for r, on in named if on]

    def body(self, text: str) -> str:
        """The text without a leading opening line and a trailing sign-off line."""
        lines = text.strip().splitlines()
        if self.sign_off and lines and lines[-1].strip() == self.sign_off:
            lines = lines[:-1]
        if self.opening and lines and lines[0].strip() == self.opening:
            lines = lines[1:]
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
        if self.opening:
            lines = _lines(text)
            met += bool(lines) and lines[0] == self.opening
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
