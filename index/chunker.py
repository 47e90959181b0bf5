"""Edit-stable Markdown chunking: an edit changes only the chunks around it.

headwater re-embeds only chunks whose id changed, and a chunk's id is a hash of its content, so
the chunk boundaries must not depend on where a block sits in the document, only on the blocks
themselves. Greedy packing ("fill up to N tokens, then cut") fails that: one inserted paragraph
shifts every later boundary. Here a section is split recursively at content-defined cut points
(see `_split`), the way content-defined chunking splits byte streams at rolling-hash anchors.

Hostile input cannot stall it: lines are parsed with string operations (no regex backtracking),
each character is tokenized a bounded number of times (a long word is cut from one pass over the
tokenizer's offsets, see `chunk_tokens`), the split finds its cuts with a range-maximum tree
instead of rescanning, and `budget_s` bounds the wall time of one document.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from headwater.errors import ChunkBudgetExceeded, ChunkerError, TooManyChunks
from index.chunk_tokens import Counter, TokenCounter, Tokenizer, token_pieces, windows

# Both lookbehinds have a fixed width and `\s+` is the only repeat, so a match attempt at any
# position either fails at once or consumes a whitespace run that the scan then skips: linear.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?:;])|(?<=[.!?:;][\"')\]]))\s+")

# A unit's cut priority is keyed on its first and last characters only, so that a typo fix in
# the middle of a paragraph keeps its boundary decision (the ends still tell listings apart).
_KEY_CHARS = 32
# A cut must leave both sides at least this fraction of the target while such a cut exists:
# slivers embed poorly. A range that would fit max_tokens whole is cut only when both sides reach
# the larger fraction (a ~1 KB tldr page stays in 2-3 chunks instead of 4 small ones).
_MIN_PIECE = 0.3
_MIN_PIECE_SOFT = 0.5
# A heading title is repeated in every chunk of its sections (and their subsections), so a
# longer one is clipped; real titles are far shorter (at most 80 characters in the corpora).
_TITLE_CHARS = 256
# A span with more characters than this many per token of its budget is taken as over the
# budget without being counted (real text has 3-6 per token): a 2 MB word is then tokenized once,
# to be cut, rather than also to learn that it is long.
_SURELY_OVER = 64
# Ranges of up to this many units are scanned for their cut; longer ones ask a _MaxTree.
_SCAN_UNITS = 64
# Loops without tokenizer calls look at the clock once per this many steps.
_TICK = 1024


@dataclass(frozen=True, slots=True)  # slots: a document can have 100k+ of them
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


class _Unit(NamedTuple):
    """A span of the (normalised) document that packing never cuts inside."""

    start: int
    end: int
    tokens: int
    priority: float  # higher = better place to cut right after this unit


@dataclass(eq=False, slots=True)
class _Heading:
    """A heading with a title, and the path of titles down to it (counted once, when needed)."""

    parent: _Heading | None  # the nearest enclosing heading with a title
    title: str
    path: str
    tokens: int | None = None
    cut: tuple[str, int] | None = None  # the path within the title budget, and its tokens


@dataclass(slots=True)
class _Section:
    heading: _Heading | None
    blocks: list[tuple[int, int, bool]]  # (start, end, glue-to-next)


class _Clock:
    """The per-document time budget, checked at tokenizer calls and every _TICK loop steps."""

    def __init__(self, budget_s: float | None, size: int) -> None:
        self.budget_s = budget_s
        self.size = size
        self.started = time.monotonic()
        self.deadline = None if budget_s is None else self.started + budget_s
        self.steps = 0

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ChunkBudgetExceeded(
                f"chunking a {self.size:,}-character document took over its {self.budget_s:g} s "
                f"budget ({time.monotonic() - self.started:.1f} s)"
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tick(self) -> None:
        self.steps += 1
        if self.steps % _TICK == 0:
            self.check()


def chunk_document(
    tenant: str,
    doc_id: str,
    text: str,
    *,
    count_tokens: TokenCounter | None = None,
    tokenizer: Tokenizer | None = None,
    target_tokens: int = 200,
    max_tokens: int = 250,
    budget_s: float | None = None,
    max_chunks: int | None = None,
) -> list[Chunk]:
    """Split a Markdown document into section-scoped chunks of at most `max_tokens` tokens.

    Tokens come from `tokenizer` (its `count_tokens`, and its `token_offsets` to cut long words
    in one pass) or from a plain `count_tokens` counter (offsets are then estimated word by word).
    `tokens` of each chunk counts its `embed_text` (section path + text). Identical input gives
    identical chunks; whitespace-only input gives none. Past `budget_s` seconds of wall time,
    ChunkBudgetExceeded is raised; past `max_chunks` chunks, TooManyChunks, as soon as the
    count is passed (a document of a million tiny sections costs no more than the limit). Work
    grows with the document's size as n log n at worst (linearly in tokenizer reads), whatever
    the text.
    """
    if (count_tokens is None) == (tokenizer is None):
        raise ChunkerError("give exactly one of count_tokens and tokenizer")
    if target_tokens < 1:
        raise ChunkerError(f"target_tokens must be at least 1, got {target_tokens}")
    if max_tokens < max(target_tokens, 8):
        raise ChunkerError(
            f"max_tokens must be at least max(target_tokens, 8), got {max_tokens} "
            f"with target_tokens={target_tokens}"
        )
    if budget_s is not None and not budget_s > 0:
        raise ChunkerError(f"budget_s must be positive, got {budget_s}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return []
    clock = _Clock(budget_s, len(text))
    if tokenizer is not None:
        counter = Counter(
            tokenizer.count_tokens, getattr(tokenizer, "token_offsets", None), clock.check
        )
    else:
        assert count_tokens is not None
        counter = Counter(count_tokens, None, clock.check)
    pieces: list[tuple[str, str, int]] = []
    for section in _sections(text, clock):
        pieces.extend(_chunk_section(text, section, counter, clock, target_tokens, max_tokens))
        if max_chunks is not None and len(pieces) > max_chunks:
            raise TooManyChunks(
                f"the document makes more than {max_chunks:,} chunks (stopped at {len(pieces):,} "
                f"after {clock.elapsed():.1f} s)"
            )
    seen: dict[tuple[str, str], int] = {}
    chunks = []
    for ordinal, (path, body, tokens) in enumerate(pieces):
        clock.tick()
        key = (path, body)
        occurrence = seen[key] = seen.get(key, -1) + 1
        raw = "\x00".join((tenant, doc_id, path, body, str(occurrence)))
        chunk_id = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]
        chunks.append(Chunk(chunk_id, ordinal, path, body, tokens))
    return chunks


def _embed_text(section: str, text: str) -> str:
    return f"{section}\n\n{text}" if section else text


# -- parsing -------------------------------------------------------------------------------------


def _sections(text: str, clock: _Clock) -> Iterator[_Section]:
    """Blocks of the document grouped by heading path; a heading opens its own section.

    Sections come one at a time, each as soon as the next heading starts: a document of many
    small sections never holds them all (the garbage collector would walk them again and again).
    """
    section = _Section(None, [])
    stack: list[tuple[int, _Heading | None]] = []
    block_start = -1  # start of the open paragraph block, -1 when none
    block_end = 0
    fence: tuple[str, int, int] | None = None  # (char, length, start) of an open fence

    def close_paragraph() -> None:
        nonlocal block_start
        if block_start >= 0:
            body = text[block_start:block_end]
            # "- Example description:" belongs with the command or listing that follows it.
            section.blocks.append((block_start, block_end, body.rstrip().endswith(":")))
            block_start = -1

    pos = 0
    for line in text.split("\n"):
        clock.tick()
        start, end = pos, pos + len(line)
        pos = end + 1
        if fence is not None:
            char, length, fence_start = fence
            stripped = line.strip()
            if len(stripped) >= length and stripped == char * len(stripped):
                section.blocks.append((fence_start, end, False))
                fence = None
            continue
        lead = line[:1]
        opener = _fence_opener(line) if lead in _MAY_FENCE else None
        if opener:
            close_paragraph()
            fence = (*opener, start)
            continue
        heading = _heading(line) if lead in _MAY_HEAD else None
        if heading:
            close_paragraph()
            if section.blocks:
                yield section
            level, title = heading
            while stack and stack[-1][0] >= level:
                stack.pop()
            parent = stack[-1][1] if stack else None
            if title:
                path = f"{parent.path} > {title}" if parent else title
                stack.append((level, _Heading(parent, title, path)))
            else:
                stack.append((level, parent))
            # The heading line stays in the text (it is content); it is glued to what follows.
            section = _Section(stack[-1][1], [(start, end, True)])
            continue
        if not line.strip():
            close_paragraph()
            continue
        if block_start < 0:
            block_start = start
        block_end = end
    if fence is not None:  # an unclosed fence runs to the end of the document
        section.blocks.append((fence[2], len(text.rstrip()), False))
    close_paragraph()
    if section.blocks:
        yield section


# First characters of a line that can open a fence, or be a heading.
_MAY_FENCE = frozenset(" \t`~")
_MAY_HEAD = frozenset(" #")


def _fence_opener(line: str) -> tuple[str, int] | None:
    """(char, length) if `line` opens a fenced block: ``` or ~~~ (3+), indented by spaces/tabs.

    Same as fullmatch(r"[ \\t]*(`{3,}|~{3,})(.*)") where a backtick fence's info string has no
    backtick, with string operations only.
    """
    rest = line.lstrip(" \t")
    char = rest[:1]
    if char not in ("`", "~"):
        return None
    info = rest.lstrip(char)
    length = len(rest) - len(info)
    if length < 3 or (char == "`" and "`" in info):
        return None
    return char, length


def _heading(line: str) -> tuple[int, str] | None:
    """(level, title) if `line` is an ATX heading, with string operations only.

    Same as fullmatch(r" {0,3}(#{1,6})(?:[ \\t]+(.*?))?[ \\t]*") and stripping a closing run of
    hashes (re.sub(r"(?:^|[ \\t]+)#+$", "")), which backtrack quadratically on a long run of
    spaces. A title over _TITLE_CHARS is clipped.
    """
    rest = line.lstrip(" ")
    if len(line) - len(rest) > 3 or not rest.startswith("#"):
        return None
    after = rest.lstrip("#")
    level = len(rest) - len(after)
    if level > 6 or after[:1] not in ("", " ", "\t"):
        return None
    title = after.strip(" \t")
    bare = title.rstrip("#")
    if not bare:  # nothing but hashes
        title = ""
    elif len(bare) < len(title) and bare[-1] in " \t":  # a closing run after a space or tab
        title = bare.rstrip(" \t")
    title = title.strip()
    if len(title) > _TITLE_CHARS:
        title = title[:_TITLE_CHARS].rstrip()
    return level, title


def _path_tokens(heading: _Heading, counter: Counter) -> int:
    """Tokens of the heading path, one title at a time.

    count(a + " > " + b) == count(a) + count(" > " + b) wherever tokens never span whitespace,
    so each title is counted once however many sections sit below it.
    """
    if heading.tokens is None:
        if heading.parent is None:
            heading.tokens = counter(heading.title)
        else:
            tail = counter(f" > {heading.title}")
            heading.tokens = _path_tokens(heading.parent, counter) + tail
    return heading.tokens


def _path_cut(heading: _Heading | None, counter: Counter, limit: int) -> tuple[str, int]:
    """The heading path cut to `limit` tokens so a chunk always has room for its text."""
    if heading is None:
        return "", 0
    if heading.cut is None:
        tokens = _path_tokens(heading, counter)
        parent = heading.parent
        if tokens <= limit:
            heading.cut = (heading.path, tokens)
        elif parent is not None and _path_tokens(parent, counter) >= limit:
            heading.cut = _path_cut(parent, counter, limit)  # the cut falls in the parent's path
        else:
            base, used = (parent.path, _path_tokens(parent, counter)) if parent else ("", 0)
            tail = f" > {heading.title}" if parent else heading.title
            _, cut, n = next(token_pieces(tail, 0, len(tail), counter, max(1, limit - used)))
            path = (base + tail[:cut]).rstrip()
            heading.cut = (path, used + n if path != base else used)
    return heading.cut


# -- units ---------------------------------------------------------------------------------------


def _priority(text: str, start: int, end: int, tokens: int) -> float:
    """Cut priority of the gap after a unit: log of the max of `tokens` uniform draws.

    Treating every token as carrying an independent random cut mark (seeded by the unit's
    content) makes a cut as likely after one 100-token paragraph as after ten 10-token lines,
    so chunk sizes do not depend on how the text happens to be broken into blocks.
    """
    if end - start <= 2 * _KEY_CHARS:
        key = text[start:end]
    else:
        key = text[start : start + _KEY_CHARS] + text[end - _KEY_CHARS : end]
    mark = _MARKS.get(key)
    if mark is None:
        if len(_MARKS) >= _MARKS_KEPT:
            _MARKS.clear()
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        mark = _MARKS[key] = math.log((int.from_bytes(digest, "big") + 1) / 2.0**64)
    return mark / max(tokens, 1)


# log(uniform) of recent unit keys: a table or a listing repeats the same short lines.
_MARKS: dict[str, float] = {}
_MARKS_KEPT = 4096


def _units(
    text: str,
    blocks: list[tuple[int, int, bool]],
    counter: Counter,
    budget: int,
    known: int | None,
) -> list[_Unit]:
    """Blocks as packing units; a block over `budget` tokens becomes lines, sentences, words.

    `known` is the token count of the first block when the caller has it already.
    """
    units: list[_Unit] = []
    for start, end, glue in blocks:
        spans = _fitting_spans(text, start, end, counter, budget, 0, known)
        units.extend(_Unit(s, e, n, _priority(text, s, e, n)) for s, e, n in spans)
        known = None
        if glue:
            units[-1] = units[-1]._replace(priority=-math.inf)
    return units


def _fitting_spans(
    text: str,
    start: int,
    end: int,
    counter: Counter,
    budget: int,
    level: int,
    n: int | None = None,
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) spans covering text[start:end], each within `budget` tokens.

    `n` is the span's token count if known. Each level counts every character once.
    """
    if n is None:
        n = budget + 1 if end - start > _SURELY_OVER * budget else counter(text[start:end])
    if n <= budget:
        return [(start, end, n)]
    if level == 0:
        parts = _line_spans(text, start, end)
    elif level == 1:
        parts = _regex_spans(text, start, end, _SENTENCE_END)
    else:
        return windows(text, start, end, counter, budget, n, _SURELY_OVER * budget)
    if len(parts) <= 1:
        return _fitting_spans(text, start, end, counter, budget, level + 1, n)
    spans = []
    for s, e in parts:
        m = counter(text[s:e]) if e - s <= _SURELY_OVER * budget else budget + 1
        if m <= budget:  # the usual case, without a call
            spans.append((s, e, m))
        else:
            spans.extend(_fitting_spans(text, s, e, counter, budget, level + 1, m))
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


# -- packing -------------------------------------------------------------------------------------


def _count_embed(counter: Counter, path: str, path_tokens: int | None, body: str) -> int:
    """Tokens of _embed_text(path, body); `path_tokens` (if given) counts `path` alone.

    A path longer than the body is not counted again with every body: the blank line between
    them ends any token, so the two counts add up (as for the path's own titles).
    """
    if not path:
        return counter(body)
    if path_tokens is None or len(path) <= len(body):
        return counter(_embed_text(path, body))
    return path_tokens + counter(f"\n\n{body}")


def _chunk_section(
    text: str,
    section: _Section,
    counter: Counter,
    clock: _Clock,
    target_tokens: int,
    max_tokens: int,
) -> list[tuple[str, str, int]]:
    heading = section.heading
    path = heading.path if heading else ""
    body = text[section.blocks[0][0] : section.blocks[-1][1]]
    tokens = None
    if len(body) <= _SURELY_OVER * target_tokens:
        long_path = heading is not None and len(path) > len(body)
        path_tokens = _path_tokens(heading, counter) if long_path and heading else None
        tokens = _count_embed(counter, path, path_tokens, body)
        if tokens <= target_tokens:  # the common case for small pages: one count, one chunk
            return [(path, body, tokens)]
    path, prefix = _path_cut(heading, counter, max_tokens // 2)
    known = tokens if not path and len(section.blocks) == 1 else None
    units = _units(text, section.blocks, counter, max(1, max_tokens - prefix), known)
    sums = [0]
    for unit in units:
        sums.append(sums[-1] + unit.tokens)
    limits = (max(1, target_tokens - prefix), max(1, max_tokens - prefix))
    out = []
    for lo, hi in _split(units, sums, 0, len(units), *limits, clock):
        out.extend(_exact(text, path, prefix, units[lo:hi], counter, max_tokens))
    return out


class _MaxTree:
    """The leftmost unit of highest priority in any index range, in O(log n) (a segment tree)."""

    def __init__(self, priority: list[float]) -> None:
        self.priority = priority
        size = 1
        while size < len(priority):
            size *= 2
        self.size = size
        tree = [-1] * (2 * size)
        tree[size : size + len(priority)] = range(len(priority))
        for k in range(size - 1, 0, -1):
            tree[k] = self._better(tree[2 * k], tree[2 * k + 1])
        self.tree = tree

    def _better(self, left: int, right: int) -> int:
        """The better of two indexes, `left` lying before `right` (ties go left)."""
        if left < 0:
            return right
        if right < 0 or self.priority[left] >= self.priority[right]:
            return left
        return right

    def argmax(self, lo: int, hi: int) -> int:
        """The leftmost index of the highest priority in [lo, hi] (inclusive)."""
        left = right = -1
        lo += self.size
        hi += self.size + 1
        while lo < hi:
            if lo & 1:
                left = self._better(left, self.tree[lo])
                lo += 1
            if hi & 1:
                hi -= 1
                right = self._better(self.tree[hi], right)
            lo >>= 1
            hi >>= 1
        return self._better(left, right)


def _split(
    units: list[_Unit],
    sums: list[int],
    lo: int,
    hi: int,
    target: int,
    limit: int,
    clock: _Clock,
) -> list[tuple[int, int]]:
    """Unit ranges of units[lo:hi], each within `target` tokens where a cut allows it.

    The stability rule: a range over the target is cut after its highest-priority unit (a
    content hash, see `_priority`), then each side is split again. Which cut wins depends only on
    the units inside the range, so an edit or insertion re-chunks just the range around it; all
    other chunks keep their text and therefore their ids. Cuts that would leave a sliver (see
    _MIN_PIECE) are passed over while a better-balanced cut exists, and a glued pair (a heading or
    "- description:" and what follows) is split only when nothing else is left to cut.

    The balanced cuts of a range are a contiguous run of units (`sums` only grows), so both
    candidates come from a range-maximum query: O(log n) per range, not a scan of the range
    (which is quadratic when equal priorities always peel a sliver off one end).
    """
    priority = [u.priority for u in units]
    tree: _MaxTree | None = None
    out: list[tuple[int, int]] = []
    todo = [(lo, hi)]
    while todo:
        clock.tick()
        a, b = todo.pop()
        size = sums[b] - sums[a]
        if size <= target or b - a == 1:
            out.append((a, b))
            continue
        floor = (_MIN_PIECE if size > limit else _MIN_PIECE_SOFT) * target
        if b - a <= _SCAN_UNITS:
            best, best_any = _scan_cut(priority, sums, a, b, floor)
        else:
            tree = tree or _MaxTree(priority)
            # Cutting after unit i leaves sums[i + 1] - sums[a] on the left; ints compare with
            # the float floor as with its ceiling.
            need = math.ceil(floor)
            first = bisect_left(sums, sums[a] + need, a + 1, b) - 1
            last = bisect_right(sums, sums[b] - need, a + 1, b) - 2
            best = -1
            if first <= last:
                best = tree.argmax(first, last)
                if priority[best] == -math.inf:
                    best = -1
            best_any = tree.argmax(a, b - 2)
        if best < 0:
            if size <= limit:  # every cut leaves a sliver or splits a pair: keep it whole
                out.append((a, b))
                continue
            best = best_any  # a glued pair is split only when nothing else is left to cut
        todo.append((best + 1, b))
        todo.append((a, best + 1))
    return out


def _scan_cut(
    priority: list[float], sums: list[int], a: int, b: int, floor: float
) -> tuple[int, int]:
    """(best balanced cut or -1, best cut of all) of units[a:b], by a scan (short ranges)."""
    size = sums[b] - sums[a]
    best, best_any = -1, -1
    for i in range(a, b - 1):
        p = priority[i]
        if best_any < 0 or p > priority[best_any]:
            best_any = i
        left = sums[i + 1] - sums[a]
        balanced = left >= floor and size - left >= floor and p > -math.inf
        if balanced and (best < 0 or p > priority[best]):
            best = i
    return best, best_any


def _exact(
    text: str, path: str, prefix: int, units: list[_Unit], counter: Counter, max_tokens: int
) -> list[tuple[str, str, int]]:
    """Chunks of `units` whose real token count fits `max_tokens` (`prefix`: tokens of `path`).

    Unit counts are summed as an estimate while splitting; a tokenizer may count a join a little
    differently, so each chunk is counted once for real and split further in the rare overflow.
    """
    body = text[units[0].start : units[-1].end]
    if len(units) == 1 and not path:  # the unit's own text, counted when it was made
        tokens = units[0].tokens
    else:
        tokens = _count_embed(counter, path, prefix, body)
    if tokens <= max_tokens:
        return [(path, body, tokens)]
    if len(units) > 1:
        cut = max(range(len(units) - 1), key=lambda i: (units[i].priority, -i))
        return _exact(text, path, prefix, units[: cut + 1], counter, max_tokens) + _exact(
            text, path, prefix, units[cut + 1 :], counter, max_tokens
        )
    unit = units[0]
    if unit.end - unit.start == 1:  # nothing left to cut (only a degenerate tokenizer gets here)
        return [(path, body, tokens)]
    budget = max(1, unit.tokens - (tokens - max_tokens) - 1)
    spans = _fitting_spans(text, unit.start, unit.end, counter, budget, 0)
    if len(spans) == 1:  # cannot shrink by structure: cut the span by tokens
        _, cut, _ = next(token_pieces(text, unit.start, unit.end, counter, budget))
        s, e = _trim(text, unit.start, cut)
        spans = [(s, e, counter(text[s:e]))]
        if text[e : unit.end].strip():
            rest = _trim(text, e, unit.end)
            spans.append((*rest, counter(text[rest[0] : rest[1]])))
    out = []
    for s, e, n in spans:
        part = _Unit(s, e, n, _priority(text, s, e, n))
        out.extend(_exact(text, path, prefix, [part], counter, max_tokens))
    return out


__all__ = [
    "Chunk",
    "ChunkBudgetExceeded",
    "ChunkerError",
    "TokenCounter",
    "Tokenizer",
    "TooManyChunks",
    "chunk_document",
]
