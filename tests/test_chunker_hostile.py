"""Hostile Markdown cannot stall the chunker (issue 11): its work is linear in the document.

The work is measured, not timed: an instrumented tokenizer counts the characters it is asked to
read (and stops the run once they pass the bound), and a trace counts the Python lines the
chunker executes. Both must stay within a constant times the document's length on every class
of adversarial input. A quadratic regex does its work inside one C call, which neither counts,
so the measured heading case also runs in a child process under a deadline.
"""

from __future__ import annotations

import base64
import multiprocessing
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from headwater.errors import ChunkBudgetExceeded, ChunkerError, TooManyChunks
from index import chunker
from index.chunker import chunk_document

# Characters read by the tokenizer, per character of the document (+ a constant for tiny ones).
# Each level that splits an over-budget span (section, block, line, sentence, word windows or
# token pieces, then the chunk) reads its characters about once; ordinary text reads 3.
READ_PER_CHAR = 12
READ_EXTRA = 2_000
# Python lines executed in the chunker's modules, per character of the document: a constant
# work per chunk, and a tiny budget (8 tokens) makes a chunk of every few characters.
LINES_PER_CHAR = 150
LINES_EXTRA = 50_000
LIMITS = {"target_tokens": 40, "max_tokens": 60}


class TooMuchWork(AssertionError):
    pass


class Pieces:
    """A WordPiece-like tokenizer: runs of up to 8 word characters, and every other non-space
    character, are tokens (so tokens never span whitespace). Counts what it is asked to read and
    raises once that passes `limit`, so a quadratic chunker fails fast instead of running on."""

    TOKEN = re.compile(r"\w{1,8}|[^\w\s]")  # each attempt looks at most 8 characters ahead

    def __init__(self, limit: int | None = None) -> None:
        self.read = 0
        self.calls = 0
        self.limit = limit

    def _take(self, text: str) -> None:
        self.read += len(text)
        self.calls += 1
        if self.limit is not None and self.read > self.limit:
            raise TooMuchWork(f"the tokenizer was asked to read {self.read:,} characters")

    def count_tokens(self, text: str) -> int:
        self._take(text)
        return len(self.TOKEN.findall(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        self._take(text)
        return [m.span() for m in self.TOKEN.finditer(text)]


def read_bound(text: str) -> int:
    return READ_PER_CHAR * len(text) + READ_EXTRA


def lines_bound(text: str) -> int:
    return LINES_PER_CHAR * len(text) + LINES_EXTRA


class LineCount:
    """Python lines executed in index/chunker.py and index/chunk_tokens.py (sys.settrace);
    raises (in the traced code) once they pass `limit`."""

    FILES = tuple(
        str(Path(chunker.__file__).with_name(n)) for n in ("chunker.py", "chunk_tokens.py")
    )

    def __init__(self, limit: int) -> None:
        self.lines = 0
        self.limit = limit

    def __enter__(self) -> LineCount:
        self._previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line if frame.f_code.co_filename in self.FILES else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if self.lines > self.limit:
                raise TooMuchWork(f"the chunker ran over {self.limit:,} Python lines")
        return self._line


def chunk_measured(text: str, *, offsets: bool = True, **limits: int) -> tuple[list, Pieces, int]:
    """Chunks of `text` with a Pieces tokenizer (bounded), and the Python lines it took."""
    tok = Pieces(limit=read_bound(text))
    kw: dict[str, Any] = {"tokenizer": tok} if offsets else {"count_tokens": tok.count_tokens}
    with LineCount(lines_bound(text)) as lines:
        chunks = chunk_document("t", "d.md", text, **kw, **(limits or LIMITS))
    return chunks, tok, lines.lines


def check_chunks(text: str, chunks: list, tok_count: Callable[[str], int], most: int) -> None:
    squeezed = "".join(text.replace("\r\n", "\n").replace("\r", "\n").split())
    assert "".join("".join(c.text for c in chunks).split()) == squeezed
    for c in chunks:
        assert c.tokens == tok_count(c.embed_text) <= most, c.section[:80]


def finishes_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() run in a forked child: a regex that backtracks holds the GIL, so no timer can stop
    it in this process; the child is killed at the deadline instead."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(("ok", fn()))
        except BaseException as exc:
            send.send(("error", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    try:
        if not receive.poll(seconds):
            pytest.fail(f"chunking did not finish within {seconds:g} s")
        kind, value = receive.recv()
    finally:
        proc.kill()
        proc.join()
    if kind != "ok":
        pytest.fail(value)
    return value


# -- the two measured cases --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_heading_with_200k_spaces_before_closing_hashes() -> None:
    text = "# Title" + " " * 200_000 + "##\n\nBody text.\n"

    def run() -> tuple[list[tuple[str, int]], int]:
        chunks, tok, _ = chunk_measured(text)
        check_chunks(text, chunks, Pieces().count_tokens, LIMITS["max_tokens"])
        return [(c.section, len(c.text)) for c in chunks], tok.read

    sections, read = finishes_within(60, run)  # the old regexes took ~15 minutes here
    assert {s for s, _ in sections} == {"Title"}
    assert read <= read_bound(text)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offsets", [True, False], ids=["tokenizer", "count_tokens"])
def test_500kb_data_uri(offsets: bool) -> None:
    raw = random.Random(11).randbytes(375_000)
    text = f"An image: ![inline](data:image/png;base64,{base64.b64encode(raw).decode()})\n"
    assert len(text) > 500_000
    chunks, tok, lines = chunk_measured(text, offsets=offsets)
    check_chunks(text, chunks, Pieces().count_tokens, LIMITS["max_tokens"])
    assert len(chunks) > 1_000
    assert tok.read <= read_bound(text)  # the old chunker read ~50x more before it was stopped
    assert lines <= lines_bound(text)


def test_many_equal_lines_split_in_n_log_n() -> None:
    # Equal priorities made the old split peel one sliver at a time off a range it rescanned.
    text = "a\n" * 50_000
    chunks, _, lines = chunk_measured(text)
    check_chunks(text, chunks, Pieces().count_tokens, LIMITS["max_tokens"])
    assert lines <= lines_bound(text)


def test_sections_under_a_long_title_count_the_title_once() -> None:
    title = " ".join(f"w{i}" for i in range(2_000))
    text = f"# {title}\n\n" + "".join(f"## s{i}\n\nx\n\n" for i in range(5_000))
    chunks, tok, lines = chunk_measured(text)
    assert tok.read <= read_bound(text)
    assert lines <= lines_bound(text)
    # A title is clipped (it is repeated in every chunk below it); the path stays within budget.
    assert all(len(c.section) <= 2 * chunker._TITLE_CHARS + 3 for c in chunks)
    check_chunks(text, chunks, Pieces().count_tokens, LIMITS["max_tokens"])


# -- every class of hostile input, mixed ---------------------------------------------------------


def _runs(n: int) -> st.SearchStrategy[str]:
    return st.sampled_from(" #`-|>*\n.~=_:/a").map(lambda c: c * n)


_SIZE = st.one_of(st.integers(0, 64), st.integers(2_000, 12_000))  # tiny or large
_WORDY = st.text(alphabet="ab1 .:-|#`>*\t\u00e9\u200b", max_size=40)
_FRAGMENT = st.one_of(
    _SIZE.flatmap(_runs),
    st.tuples(st.integers(1, 8), _SIZE, st.integers(0, 8)).map(
        lambda t: "#" * t[0] + " Title" + " " * t[1] + "#" * t[2]
    ),
    st.tuples(st.integers(1, 3), _SIZE).map(
        lambda t: "#" * t[0] + " " + "long title " * (t[1] // 11)
    ),
    _SIZE.map(lambda n: "- " + "item, " * (n // 6)),
    _SIZE.map(lambda n: ">" * (n // 2) + " quoted"),
    _SIZE.map(lambda n: "> " * (n // 2) + "deep"),
    _SIZE.map(lambda n: "|" + " c |" * (n // 4) + "\n|" + "---|" * (n // 4)),
    _SIZE.map(lambda n: "| a | b |\n" * (n // 10)),
    _SIZE.map(lambda n: "```" + "info," * (n // 5)),
    _SIZE.map(lambda n: "```\n" + "let x = 1;\n" * (n // 11)),
    _SIZE.map(lambda n: "".join(random.Random(n).choices("ab+/=9", k=n))),
    _SIZE.map(lambda n: "Ab." * (n // 3)),
    _SIZE.map(lambda n: "a\n" * (n // 2)),
    _SIZE.map(lambda n: "# h\n" * (n // 4)),
    _SIZE.map(lambda n: "".join(f"{'  ' * (i % 60)}- x\n" for i in range(n // 60))),
    _SIZE.map(lambda n: "w. " * (n // 3)),
    _WORDY,
)
_HOSTILE = st.tuples(
    st.lists(_FRAGMENT, min_size=1, max_size=6), st.sampled_from(["\n", "\n\n", "", " "])
).map(lambda t: t[1].join(t[0]))


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=_HOSTILE,
    limits=st.sampled_from([(40, 60), (8, 8), (200, 254)]),
    offsets=st.booleans(),
)
def test_hostile_markdown_is_linear(text: str, limits: tuple[int, int], offsets: bool) -> None:
    target, most = limits
    chunks, tok, lines = chunk_measured(
        text, offsets=offsets, target_tokens=target, max_tokens=most
    )
    assert tok.read <= read_bound(text)  # also enforced during the run (TooMuchWork)
    assert lines <= lines_bound(text)  # also enforced during the run
    check_chunks(text, chunks, Pieces().count_tokens, most)


# -- equivalence of the rewritten parts with the old ones ------------------------------------


_OLD_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*")
_OLD_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
_OLD_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_LINE = st.text(alphabet=" \t#`~ab:\u00e9\x0c", max_size=30)


@hsettings(max_examples=500)
@given(line=_LINE)
def test_heading_and_fence_parsing_match_the_old_regexes(line: str) -> None:
    m = _OLD_HEADING.fullmatch(line)
    old = (len(m[1]), _OLD_CLOSING.sub("", m[2] or "").strip()) if m else None
    assert chunker._heading(line) == old
    f = _OLD_FENCE.fullmatch(line)
    old_fence = (f[1][0], len(f[1])) if f and not (f[1][0] == "`" and "`" in f[2]) else None
    assert chunker._fence_opener(line) == old_fence


def _split_by_scan(units, sums, lo, hi, target, limit):  # the previous _split, verbatim in effect
    out, todo = [], [(lo, hi)]
    while todo:
        a, b = todo.pop()
        size = sums[b] - sums[a]
        if size <= target or b - a == 1:
            out.append((a, b))
            continue
        floor = (chunker._MIN_PIECE if size > limit else chunker._MIN_PIECE_SOFT) * target
        best, best_any = chunker._scan_cut([u.priority for u in units], sums, a, b, floor)
        if best < 0:
            if size <= limit:
                out.append((a, b))
                continue
            best = best_any
        todo.append((best + 1, b))
        todo.append((a, best + 1))
    return out


@hsettings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 30), min_size=1, max_size=400),
    priorities=st.lists(st.sampled_from([-0.5, -0.1, -0.01, float("-inf")]), min_size=400),
    target=st.integers(1, 80),
    extra=st.integers(0, 40),
)
def test_split_by_tree_matches_the_scan(tokens, priorities, target, extra) -> None:
    units = [
        chunker._Unit(i, i + 1, n, p)
        for i, (n, p) in enumerate(zip(tokens, priorities, strict=False))
    ]
    sums = [0]
    for u in units:
        sums.append(sums[-1] + u.tokens)
    clock = chunker._Clock(None, 0)
    got = chunker._split(units, sums, 0, len(units), target, target + extra, clock)
    assert got == _split_by_scan(units, sums, 0, len(units), target, target + extra)


# -- budget and API --------------------------------------------------------------------------


def test_budget_stops_a_slow_document_with_a_one_line_reason() -> None:
    import time

    class Slow(Pieces):
        def count_tokens(self, text: str) -> int:
            time.sleep(0.002)
            return super().count_tokens(text)

    text = "".join(f"# s{i}\n\ntext {i}\n\n" for i in range(2_000))
    with pytest.raises(ChunkBudgetExceeded) as info:
        chunk_document("t", "d", text, tokenizer=Slow(), budget_s=0.2, **LIMITS)
    assert isinstance(info.value, ChunkerError)
    assert "\n" not in str(info.value) and "0.2 s" in str(info.value)
    assert chunk_document("t", "d", text, tokenizer=Pieces(), budget_s=60, **LIMITS)


def test_chunk_limit_stops_as_soon_as_it_is_passed() -> None:
    # 200k one-line sections: the tokenizer must stop being asked long before the end.
    tok = Pieces()
    text = "".join(f"# s{i}\n\nx\n\n" for i in range(200_000))
    with pytest.raises(TooManyChunks, match="more than 100 chunks") as info:
        chunk_document("t", "d", text, tokenizer=tok, max_chunks=100, **LIMITS)
    assert isinstance(info.value, ChunkerError) and "stopped at 101 " in str(info.value)
    assert tok.read < len(text) // 100, tok.read
    assert len(chunk_document("t", "d", text[:2_000], tokenizer=Pieces(), max_chunks=200, **LIMITS))


def test_tokenizer_arguments_are_checked() -> None:
    with pytest.raises(ChunkerError, match="exactly one"):
        chunk_document("t", "d", "text")
    tok = Pieces()
    with pytest.raises(ChunkerError, match="exactly one"):
        chunk_document("t", "d", "text", tokenizer=tok, count_tokens=tok.count_tokens)
    with pytest.raises(ChunkerError, match="budget_s"):
        chunk_document("t", "d", "text", tokenizer=tok, budget_s=0)


@hsettings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab .\n#-`|", max_size=2_000))
def test_tokenizer_and_count_tokens_agree_for_a_word_tokenizer(text: str) -> None:
    # With exact offsets the protocol only saves work: the chunks are the same.
    tok = Pieces()
    by_offsets = chunk_document("t", "d", text, tokenizer=tok, **LIMITS)
    assert by_offsets == chunk_document("t", "d", text, count_tokens=tok.count_tokens, **LIMITS)


# -- the real tokenizer ----------------------------------------------------------------------


@pytest.mark.slow
def test_embedder_offsets_and_counts(embedder) -> None:
    samples = ["Héllo wörld 中文 x\u200by 😀 [CLS] ünïcode", "data:image/png;base64,AAAA+/==", ""]
    for s in samples:
        offsets = embedder.token_offsets(s)
        assert embedder.count_tokens(s) == len(offsets)
        # The same count as through the transformers wrapper, which the indexes were built with.
        assert len(embedder.tokenizer.encode(s, add_special_tokens=False)) == len(offsets)
        assert all(0 <= a < b <= len(s) for a, b in offsets)
    long = "word " * 20_000
    old = embedder.tokenizer.encode(long, add_special_tokens=False, verbose=False)
    assert embedder.count_tokens(long) == len(old)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_uri_with_the_real_tokenizer(embedder) -> None:
    raw = random.Random(5).randbytes(150_000)
    text = f"# Image\n\n![x](data:image/png;base64,{base64.b64encode(raw).decode()})\n"
    chunks = chunk_document("t", "d", text, tokenizer=embedder, target_tokens=200, max_tokens=254)
    assert all(c.tokens == embedder.count_tokens(c.embed_text) <= 254 for c in chunks)
    assert "".join("".join(c.text for c in chunks).split()) == "".join(text.split())
