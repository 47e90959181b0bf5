"""Edit-stable Markdown chunking: an edit changes only the chunks around it.

headwater re-embeds only chunks whose id changed, and a chunk's id is a hash of its content, so
the chunk boundaries must not depend on where a block sits in the document, only on the blocks
themselves. Greedy packing ("fill up to N tokens, then cut") fails that: one inserted paragraph
shifts every later boundary. Here a section is split recursively at content-defined cut points
(see `_split`), the way content-defined chunking splits byte streams at rolling-hash anchors.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from headwater.errors import ChunkerError

TokenCounter = Callable[[str], int]

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*")
_CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?:;])|(?<=[.!?:;][\"')\]]))\s+")
_WORD = re.compile(r"\S+")

# A unit's cut priority is keyed on its first and last characters only, so that a typo fix in
# the middle of a paragraph keeps its boundary decision (the ends still tell listings apart).
_KEY_CHARS = 32
# A cut must leave both sides at least this fraction of the target while such a cut exists:
# slivers embed poorly. A range that would fit max_tokens whole is cut only when both sides reach
# the larger fraction (a ~1 KB tldr page stays in 2-3 chunks instead of 4 small ones).
_MIN_PIECE = 0.3
_MIN_PIECE_SOFT = 0.5


@dataclass(frozen=True)
class Chunk:
    """One embeddable piece of a document, identified by its content."""

    chunk_id: str
    ordinal: int
    section: str
    text: str
    tokens: int

    @property
    def embed_text(self) -> str:
        return _embed_text(self.section, self.text)


@dataclass(frozen=True)
class _Unit:
    """A span of the (normalised) document that packing never cuts inside."""

    start: int
    end: int
    tokens: int
    priority: float  # higher = better place to cut right after this unit


@dataclass
class _Section:
    path: tuple[str, ...]
    blocks: list[tuple[int, int, bool]]  # (start, end, glue-to-next)


def chunk_document(
    tenant: str,
    doc_id: str,
    text: str,
    *,
    count_tokens: TokenCounter,
    target_tokens: int = 200,
    max_tokens: int = 250,
) -> list[Chunk]:
    """Split a Markdown document into section-scoped chunks of at most `max_tokens` tokens.

    `tokens` of each chunk counts its `embed_text` (section path + text) with `count_tokens`.
    Identical input gives identical chunks; whitespace-only input gives none.
    """
    if target_tokens < 1:
        raise ChunkerError(f"target_tokens must be at least 1, got {target_tokens}")
    if max_tokens < max(target_tokens, 8):
        raise ChunkerError(
            f"max_tokens must be at least max(target_tokens, 8), got {max_tokens} "
            f"with target_tokens={target_tokens}"
        )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return []
    counter = _CachedCounter(count_tokens)
    pieces: list[tuple[str, str, int]] = []
    for section in _sections(text):
        pieces.extend(_chunk_section(text, section, counter, target_tokens, max_tokens))
    seen: dict[tuple[str, str], int] = {}
    chunks = []
    for ordinal, (path, body, tokens) in enumerate(pieces):
        occurrence = seen.get((path, body), 0)
        seen[(path, body)] = occurrence + 1
        raw = "\x00".join((tenant, doc_id, path, body, str(occurrence)))
        chunk_id = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]
        chunks.append(Chunk(chunk_id, ordinal, path, body, tokens))
    return chunks


def _embed_text(section: str, text: str) -> str:
    return f"{section}\n\n{text}" if section else text


class _CachedCounter:
    """count_tokens with memory: the same line or block is often counted twice."""

    def __init__(self, count_tokens: TokenCounter) -> None:
        self._count = count_tokens
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = int(self._count(text))
        return n


# -- parsing -------------------------------------------------------------------------------------


def _sections(text: str) -> list[_Section]:
    """Blocks of the document grouped by heading path; a heading opens its own section."""
    sections = [_Section((), [])]
    stack: list[tuple[int, str]] = []
    block_start = -1  # start of the open paragraph block, -1 when none
    block_end = 0
    fence: tuple[str, int, int] | None = None  # (char, length, start) of an open fence

    def close_paragraph() -> None:
        nonlocal block_start
        if block_start >= 0:
            body = text[block_start:block_end]
            # "- Example description:" belongs with the command or listing that follows it.
            sections[-1].blocks.append((block_start, block_end, body.rstrip().endswith(":")))
            block_start = -1

    pos = 0
    for line in text.split("\n"):
        start, end = pos, pos + len(line)
        pos = end + 1
        if fence is not None:
            char, length, fence_start = fence
            stripped = line.strip()
            if len(stripped) >= length and stripped == char * len(stripped):
                sections[-1].blocks.append((fence_start, end, False))
                fence = None
            continue
        opener = _FENCE.fullmatch(line)
        if opener and not (opener[1][0] == "`" and "`" in opener[2]):
            close_paragraph()
            fence = (opener[1][0], len(opener[1]), start)
            continue
        heading = _HEADING.fullmatch(line)
        if heading:
            close_paragraph()
            level = len(heading[1])
            title = _CLOSING_HASHES.sub("", heading[2] or "").strip()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
            # The heading line stays in the text (it is content); it is glued to what follows.
            sections.append(_Section(tuple(t for _, t in stack if t), [(start, end, True)]))
            continue
        if not line.strip():
            close_paragraph()
            continue
        if block_start < 0:
            block_start = start
        block_end = end
    if fence is not None:  # an unclosed fence runs to the end of the document
        sections[-1].blocks.append((fence[2], len(text.rstrip()), False))
    close_paragraph()
    return [s for s in sections if s.blocks]


def _section_title(title: str, counter: _CachedCounter, limit: int) -> str:
    """The heading path, cut to `limit` tokens so a chunk always has room for its text."""
    if not title or counter(title) <= limit:
        return title
    return title[: _fit_prefix(title, 0, len(title), counter, limit)].rstrip()


# -- units ---------------------------------------------------------------------------------------


def _priority(text: str, tokens: int) -> float:
    """Cut priority of the gap after a unit: log of the max of `tokens` uniform draws.

    Treating every token as carrying an independent random cut mark (seeded by the unit's
    content) makes a cut as likely after one 100-token paragraph as after ten 10-token lines,
    so chunk sizes do not depend on how the text happens to be broken into blocks.
    """
    key = text if len(text) <= 2 * _KEY_CHARS else text[:_KEY_CHARS] + text[-_KEY_CHARS:]
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / 2.0**64
    return math.log(uniform) / max(tokens, 1)


def _units(
    text: str, blocks: list[tuple[int, int, bool]], counter: _CachedCounter, budget: int
) -> list[_Unit]:
    """Blocks as packing units; a block over `budget` tokens becomes lines, sentences, words."""
    units: list[_Unit] = []
    for start, end, glue in blocks:
        for s, e, n in _fitting_spans(text, start, end, counter, budget, level=0):
            units.append(_Unit(s, e, n, _priority(text[s:e], n)))
        if glue:
            last = units[-1]
            units[-1] = _Unit(last.start, last.end, last.tokens, -math.inf)
    return units


def _fitting_spans(
    text: str, start: int, end: int, counter: _CachedCounter, budget: int, level: int
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) spans covering text[start:end], each within `budget` tokens."""
    n = counter(text[start:end])
    if n <= budget:
        return [(start, end, n)]
    if level == 0:
        parts = _line_spans(text, start, end)
    elif level == 1:
        parts = _regex_spans(text, start, end, _SENTENCE_END)
    else:
        return _windows(text, start, end, counter, budget)
    if len(parts) <= 1:
        return _fitting_spans(text, start, end, counter, budget, level + 1)
    spans = []
    for s, e in parts:
        spans.extend(_fitting_spans(text, s, e, counter, budget, level + 1))
    return spans


def _line_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, pos = [], start
    while pos <= end:
        nl = text.find("\n", pos, end)
        stop = end if nl < 0 else nl
        if text[pos:stop].strip():
            spans.append((pos, stop))
        pos = stop + 1
    return spans


def _regex_spans(text: str, start: int, end: int, sep: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-whitespace pieces of text[start:end] between matches of `sep`."""
    spans, pos = [], start
    for m in sep.finditer(text, start, end):
        if text[pos : m.start()].strip():
            spans.append(_trim(text, pos, m.start()))
        pos = m.end()
    if text[pos:end].strip():
        spans.append(_trim(text, pos, end))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), start + len(piece.rstrip())


def _windows(
    text: str, start: int, end: int, counter: _CachedCounter, budget: int
) -> list[tuple[int, int, int]]:
    """Consecutive word windows of at most `budget` tokens (binary search, O(log n) counts each).

    A window is not content-defined, but this only runs on a single sentence over the budget.
    """
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, start, end)]
    spans = []
    i = 0
    while i < len(words):
        lo, hi = i + 1, min(len(words), i + budget)  # a word is at least one token
        if counter(text[words[i][0] : words[lo - 1][1]]) > budget:
            # One word alone is too long: cut it by characters.
            w_start, w_end = words[i]
            pos = w_start
            while pos < w_end:
                cut = _fit_prefix(text, pos, w_end, counter, budget)
                spans.append((pos, cut, counter(text[pos:cut])))
                pos = cut
            i += 1
            continue
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if counter(text[words[i][0] : words[mid - 1][1]]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        s, e = words[i][0], words[lo - 1][1]
        spans.append((s, e, counter(text[s:e])))
        i = lo
    return spans


def _fit_prefix(text: str, start: int, end: int, counter: _CachedCounter, budget: int) -> int:
    """Largest cut in (start, end] with text[start:cut] within `budget` (at least one char)."""
    lo, hi = start + 1, end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counter(text[start:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- packing -------------------------------------------------------------------------------------


def _chunk_section(
    text: str, section: _Section, counter: _CachedCounter, target_tokens: int, max_tokens: int
) -> list[tuple[str, str, int]]:
    path = " > ".join(section.path)
    body = text[section.blocks[0][0] : section.blocks[-1][1]]
    tokens = counter(_embed_text(path, body))
    if tokens <= target_tokens:  # the common case for small pages: one count, one chunk
        return [(path, body, tokens)]
    path = _section_title(path, counter, max_tokens // 2)
    prefix = counter(path) if path else 0
    units = _units(text, section.blocks, counter, max(1, max_tokens - prefix))
    sums = [0]
    for unit in units:
        sums.append(sums[-1] + unit.tokens)
    limits = (max(1, target_tokens - prefix), max(1, max_tokens - prefix))
    out = []
    for lo, hi in _split(units, sums, 0, len(units), *limits):
        out.extend(_exact(text, path, units[lo:hi], counter, max_tokens))
    return out


def _split(
    units: list[_Unit], sums: list[int], lo: int, hi: int, target: int, limit: int
) -> list[tuple[int, int]]:
    """Unit ranges of units[lo:hi], each within `target` tokens where a cut allows it.

    The stability rule: a range over the target is cut after its highest-priority unit (a
    content hash, see `_priority`), then each side is split again. Which cut wins depends only on
    the units inside the range, so an edit or insertion re-chunks just the range around it; all
    other chunks keep their text and therefore their ids. Cuts that would leave a sliver (see
    _MIN_PIECE) are passed over while a better-balanced cut exists, and a glued pair (a heading or
    "- description:" and what follows) is split only when nothing else is left to cut.
    """
    out: list[tuple[int, int]] = []
    todo = [(lo, hi)]
    while todo:
        a, b = todo.pop()
        size = sums[b] - sums[a]
        if size <= target or b - a == 1:
            out.append((a, b))
            continue
        floor = (_MIN_PIECE if size > limit else _MIN_PIECE_SOFT) * target
        best, best_any = -1, -1
        for i in range(a, b - 1):
            p = units[i].priority
            if best_any < 0 or p > units[best_any].priority:
                best_any = i
            left = sums[i + 1] - sums[a]
            balanced = left >= floor and size - left >= floor and p > -math.inf
            if balanced and (best < 0 or p > units[best].priority):
                best = i
        if best < 0:
            if size <= limit:  # every cut leaves a sliver or splits a pair: keep it whole
                out.append((a, b))
                continue
            best = best_any  # a glued pair is split only when nothing else is left to cut
        todo.append((best + 1, b))
        todo.append((a, best + 1))
    return out


def _exact(
    text: str, path: str, units: list[_Unit], counter: _CachedCounter, max_tokens: int
) -> list[tuple[str, str, int]]:
    """Chunks of `units` whose real token count fits `max_tokens`.

    Unit counts are summed as an estimate while splitting; a tokenizer may count a join a little
    differently, so each chunk is counted once for real and split further in the rare overflow.
    """
    body = text[units[0].start : units[-1].end]
    tokens = counter(_embed_text(path, body))
    if tokens <= max_tokens:
        return [(path, body, tokens)]
    if len(units) > 1:
        cut = max(range(len(units) - 1), key=lambda i: (units[i].priority, -i))
        return _exact(text, path, units[: cut + 1], counter, max_tokens) + _exact(
            text, path, units[cut + 1 :], counter, max_tokens
        )
    unit = units[0]
    if unit.end - unit.start == 1:  # nothing left to cut (only a degenerate tokenizer gets here)
        return [(path, body, tokens)]
    budget = max(1, unit.tokens - (tokens - max_tokens) - 1)
    spans = _fitting_spans(text, unit.start, unit.end, counter, budget, level=0)
    if len(spans) == 1:  # cannot shrink by structure: cut the span by characters
        s, e = _trim(text, unit.start, _fit_prefix(text, unit.start, unit.end, counter, budget))
        spans = [(s, e, counter(text[s:e]))]
        if text[e : unit.end].strip():
            rest = _trim(text, e, unit.end)
            spans.append((*rest, counter(text[rest[0] : rest[1]])))
    parts = [_Unit(s, e, n, _priority(text[s:e], n)) for s, e, n in spans]
    out = []
    for part in parts:
        out.extend(_exact(text, path, [part], counter, max_tokens))
    return out


__all__ = ["Chunk", "ChunkerError", "TokenCounter", "chunk_document"]
