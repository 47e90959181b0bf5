"""The tokenizer as the chunker uses it: exact counts, a bounded cache, cuts by token offsets.

Every function here reads each character it is given a bounded number of times, whatever the
text, so chunking stays linear on hostile input: a long run without whitespace (a data URI, an
inline image) is cut from one pass over the tokenizer's offsets (then, once its density is known,
at guessed lengths that are only counted), never by re-counting prefixes.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterator
from typing import Protocol

TokenCounter = Callable[[str], int]
Span = tuple[int, int, int]  # (start, end, tokens)

_WORD = re.compile(r"\S+")  # one character class, no alternation: cannot backtrack
# Counts of strings up to this long are remembered (the same line or block often recurs). The
# memory holds this many characters, each entry charged at least _CACHE_ENTRY, then starts again.
_CACHE_KEY_CHARS = 4096
_CACHE_CHARS = 1 << 21
_CACHE_ENTRY = 64
# Long spans are tokenized in slices of about this many characters, so that the offsets of a
# 2 MB word are never all in memory. Near a slice's end a word cut by the slice may tokenize
# differently, so no cut is placed within _MARGIN characters of it.
_SLICE = 1 << 15
_MARGIN = 128
# A guessed piece aims at this fraction of the budget, so that most guesses fit.
_GUESS = 0.9


class Tokenizer(Protocol):
    """What the chunker needs from a tokenizer; `index.embedder.Embedder` is one."""

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`, without special tokens."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character offsets in `text` of its tokens, in order."""
        ...


class Counter:
    """Exact token counts (remembered within a bound), offsets, and a deadline check."""

    def __init__(
        self,
        count: TokenCounter,
        offsets: Callable[[str], list[tuple[int, int]]] | None,
        check: Callable[[], None],
    ) -> None:
        self._count = count
        self._offsets = offsets
        self.check = check
        self._cache: dict[str, int] = {}
        self._cached = 0
        self._hits = 0

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is not None:
            self._hits += 1
            if self._hits % 1024 == 0:  # a run of remembered counts still looks at the clock
                self.check()
        else:
            self.check()
            n = int(self._count(text))
            if len(text) <= _CACHE_KEY_CHARS:
                if self._cached > _CACHE_CHARS:
                    self._cache.clear()
                    self._cached = 0
                self._cache[text] = n
                self._cached += max(len(text), _CACHE_ENTRY)
        return n

    def offsets(self, text: str) -> list[tuple[int, int]]:
        self.check()
        if self._offsets is None:
            return word_offsets(text, self)
        return self._offsets(text)

    def word_tokens(self, text: str, starts: array, ends: array, over: int) -> list[int]:
        """Tokens of each word text[starts[i]:ends[i]], from offsets of slices of words.

        Exact for tokenizers that never put a token across whitespace (WordPiece, byte-level BPE),
        an estimate otherwise; callers check what they cut with real counts. A word longer than
        `over` characters is not counted: its weight is `over` (callers take it as too long).
        """
        if self._offsets is None:
            return [
                self(text[s:e]) if e - s <= over else over
                for s, e in zip(starts, ends, strict=True)
            ]
        weights = [0] * len(starts)
        long = min(_SLICE, over)
        i = 0
        while i < len(starts):
            length = ends[i] - starts[i]
            if length > long:  # on its own, counted for real (see `windows`)
                weights[i] = over if length > over else self(text[starts[i] : ends[i]])
                i += 1
                continue
            j = i + 1
            while j < len(starts) and ends[j] - starts[j] <= long and ends[j] - starts[i] <= _SLICE:
                j += 1
            base, k = starts[i], i
            for a, _ in self.offsets(text[base : ends[j - 1]]):
                while k < j - 1 and base + a >= ends[k]:
                    k += 1
                weights[k] += 1
            i = j
        return weights


def word_offsets(text: str, count: TokenCounter) -> list[tuple[int, int]]:
    """Offsets for a tokenizer known only by its counts: each word's tokens spread evenly over it.

    Linear: every word is counted once. Exact for a word or character counter, an estimate
    otherwise (pieces cut by it are counted for real).
    """
    out: list[tuple[int, int]] = []
    for m in _WORD.finditer(text):
        s, e = m.span()
        n = count(text[s:e])
        out.extend((s + k * (e - s) // n, s + (k + 1) * (e - s) // n) for k in range(n))
    return out


def token_pieces(text: str, start: int, end: int, counter: Counter, budget: int) -> Iterator[Span]:
    """Consecutive pieces of text[start:end] of at most `budget` tokens, each counted for real.

    Pieces are cut where a token starts, from one pass over the tokenizer's offsets (in slices),
    and each is then counted once, since a piece on its own may tokenize a little differently
    than inside the whole (it is shortened in the rare case it is over). Once pieces are known to
    hold about `ratio` characters a token, the next piece is guessed at that length and only
    counted, which reads the text once instead of twice; after a guess over the budget, one piece
    is cut from offsets again. A piece is at least one character.
    """
    pos, size, ratio = start, _SLICE, 0.0
    while pos < end:
        most = None  # pieces to take from this slice
        if ratio:
            guessed = _guess(text, pos, end, counter, budget, ratio)
            if guessed is not None:
                yield guessed
                ratio = (ratio + (guessed[1] - pos) / max(guessed[2], 1)) / 2
                pos = guessed[1]
                continue
            size, most = min(_SLICE, max(4 * _MARGIN, int(3 * ratio * budget))), 1
        stop = min(end, pos + size)
        starts = _token_starts(counter.offsets(text[pos:stop]), pos)
        last = stop == end
        limit = end if last else stop - _MARGIN
        piece, k, tokens = pos, 0, 0  # the current piece starts at `piece`, with token k
        while piece < end and most != 0:
            if k + budget < len(starts) and starts[k + budget] <= limit:
                taken, cut = budget, starts[k + budget]
            elif last:
                taken, cut = len(starts) - k, end
            else:
                break
            n = counter(text[piece:cut])
            over = n - budget  # first drop the excess, then halve
            while n > budget and taken > 1:
                taken = max(1, taken - over if over else taken // 2)
                over = 0
                cut = starts[k + taken]
                n = counter(text[piece:cut])
            if n > budget:  # one token alone is over: a character is the least a piece can be
                cut = piece + 1
                n = counter(text[piece:cut])
                yield piece, cut, n
                piece = cut
                break  # the slice's offsets no longer line up with `piece`: slice again
            yield piece, cut, n
            tokens += n
            piece, k = cut, k + taken
            most = None if most is None else most - 1
        ratio = (piece - pos) / tokens if tokens else 0.0
        # No cut fitted in the slice (a few very long tokens): a longer slice has room for one.
        size = size * 2 if piece == pos else _SLICE
        pos = piece


def _guess(
    text: str, pos: int, end: int, counter: Counter, budget: int, ratio: float
) -> Span | None:
    """A piece from `pos` guessed from `ratio` characters a token, or None (over, or the end)."""
    length = ratio * budget * _GUESS
    for _ in range(2):  # a guess, then one correction scaled by its count
        cut = pos + max(1, min(_SLICE, int(length)))
        if cut >= end:
            return None
        n = counter(text[pos:cut])
        if n <= budget:
            return pos, cut, n
        length *= budget * _GUESS / n
    return None


def _token_starts(offsets: list[tuple[int, int]], base: int) -> list[int]:
    """Distinct token start positions, increasing, after the first character (places to cut)."""
    starts: list[int] = []
    prev = base
    for a, _ in offsets:
        if base + a > prev:
            prev = base + a
            starts.append(prev)
    return [base, *starts]


def windows(
    text: str, start: int, end: int, counter: Counter, budget: int, n: int, over: int
) -> list[Span]:
    """Consecutive word windows of text[start:end] (`n` tokens) of at most `budget` tokens.

    Each window is as long as it can be (and at most `budget` words): where counts grow with the
    text this is what a binary search over counts gives, here from one offsets pass plus about
    two counts per window. A word alone over the budget is cut into token pieces; a word longer
    than `over` characters is taken as over the budget without counting it.
    A window is not content-defined, but this only runs on a single sentence over the budget.
    """
    starts, ends = array("q"), array("q")
    for m in _WORD.finditer(text, start, end):
        starts.append(m.start())
        ends.append(m.end())
    over = max(over, budget + 1)
    long = min(_SLICE, over)
    if len(starts) == 1 and (starts[0], ends[0]) == (start, end) and end - start > long:
        weights = [n]  # one long word, already counted (or known to be too long)
    else:
        weights = counter.word_tokens(text, starts, ends, over)
    spans: list[Span] = []
    i = 0
    while i < len(starts):

        def count(j: int, i: int = i) -> int:  # tokens of words i..j-1
            if j == i + 1 and ends[i] - starts[i] > long:
                return weights[i]  # a long word: counted for real, or known to be too long
            return counter(text[starts[i] : ends[j - 1]])

        hi = min(len(starts), i + budget)
        j, estimate = i + 1, weights[i]
        while j < hi and estimate + weights[j] <= budget:
            estimate += weights[j]
            j += 1
        tokens = count(j)
        if tokens > budget:  # the estimate was over: search below it
            first = tokens if j == i + 1 else count(i + 1)
            if first > budget:
                spans.extend(token_pieces(text, starts[i], ends[i], counter, budget))
                i += 1
                continue
            lo, top = i + 1, j - 1
            while lo < top:
                mid = (lo + top + 1) // 2
                if count(mid) <= budget:
                    lo = mid
                else:
                    top = mid - 1
            j, tokens = lo, count(lo)
        else:  # the estimate may be under: take more words while they fit
            step = 1
            while j < hi:
                k = min(hi, j + step)
                more = count(k)
                if more <= budget:
                    j, tokens, step = k, more, step * 2
                elif step == 1:
                    break
                else:
                    step = 1
        spans.append((starts[i], ends[j - 1], tokens))
        i = j
    return spans


__all__ = ["Counter", "TokenCounter", "Tokenizer", "token_pieces", "windows", "word_offsets"]
