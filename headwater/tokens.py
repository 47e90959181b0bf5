"""Freshness tokens: where a publisher's writes landed on the documents topic.

A token maps each partition to the offset of the last record written there. Once the indexer
group's committed offset on every such partition is past that offset, the writes are searchable.
The string form (`"0:15,3:7"`) travels through the API and query events.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType

_PAIR_RE = re.compile(r"^(\d{1,9}):(\d{1,19})$")


class FreshnessToken(Mapping[int, int]):
    """Immutable `{partition: offset_of_last_written_record}`; empty means "nothing to wait for"."""

    __slots__ = ("_offsets",)

    def __init__(self, offsets: Mapping[int, int] | None = None) -> None:
        clean: dict[int, int] = {}
        for partition, offset in (offsets or {}).items():
            if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
                raise ValueError(f"token partition must be an int >= 0, not {partition!r}")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"token offset must be an int >= 0, not {offset!r}")
            clean[partition] = offset
        self._offsets = MappingProxyType(dict(sorted(clean.items())))

    @classmethod
    def parse(cls, text: str | FreshnessToken | None) -> FreshnessToken:
        """Read `"0:15,3:7"` (whitespace tolerated; "" is the empty token)."""
        if isinstance(text, FreshnessToken):
            return text
        if text is None:
            return cls()
        if not isinstance(text, str):
            raise ValueError(f"freshness token must be a string, not {type(text).__name__}")
        if not text.strip():
            return cls()
        offsets: dict[int, int] = {}
        for part in text.split(","):
            match = _PAIR_RE.match(part.strip())
            if match is None:
                raise ValueError(
                    f"invalid freshness token {_shorten(text)!r}: expected 'partition:offset,...'"
                )
            partition, offset = int(match[1]), int(match[2])
            if partition in offsets:
                raise ValueError(
                    f"invalid freshness token {_shorten(text)!r}: partition {partition} repeated"
                )
            offsets[partition] = offset
        return cls(offsets)

    @classmethod
    def of(cls, partition: int, offset: int) -> FreshnessToken:
        return cls({partition: offset})

    def merge(self, other: Mapping[int, int]) -> FreshnessToken:
        """The later of both offsets on every partition (a token covering both writes)."""
        merged = dict(self._offsets)
        for partition, offset in other.items():
            merged[partition] = max(offset, merged.get(partition, offset))
        return FreshnessToken(merged)

    def __or__(self, other: Mapping[int, int]) -> FreshnessToken:
        return self.merge(other)

    def __getitem__(self, partition: int) -> int:
        return self._offsets[partition]

    def __iter__(self) -> Iterator[int]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str(self) == other
        if isinstance(other, Mapping):
            return dict(self._offsets) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __str__(self) -> str:
        return ",".join(f"{p}:{o}" for p, o in self._offsets.items())

    def __repr__(self) -> str:
        return f"FreshnessToken({str(self)!r})"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
