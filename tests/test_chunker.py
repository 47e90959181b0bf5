"""The edit-stable Markdown chunker: pure logic, no broker.

Most tests count tokens by whitespace; the ones marked slow use the real embedder's tokenizer.
The corpus tests read ../shared/corpora next to the repo and skip when it is absent.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from headwater.errors import ChunkerError
from index.chunker import Chunk, chunk_document

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
NEW_PARAGRAPH = (
    "This paragraph is new: the test inserted it to check that chunk boundaries further down "
    "the chapter do not move when the text above them grows."
)


def words(text: str) -> int:
    return len(text.split())


def chunk(text: str, *, tenant: str = "t", doc_id: str = "d", **kw) -> list[Chunk]:
    kw.setdefault("count_tokens", words)
    return chunk_document(tenant, doc_id, text, **kw)


def ids(chunks: list[Chunk]) -> set[str]:
    return {c.chunk_id for c in chunks}


def squeeze(text: str) -> str:
    return "".join(text.split())


def paragraph(seed: int, n: int) -> str:
    return " ".join(f"w{seed}x{i}" for i in range(n)) + "."


# -- basics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\r\n  \n"])
def test_whitespace_only_gives_no_chunks(text: str) -> None:
    assert chunk(text) == []


def test_chunk_fields_and_id_formula() -> None:
    [c] = chunk("# Guide\n\nSome text here.", tenant="acme", doc_id="a.md")
    assert (c.ordinal, c.section, c.text) == (0, "Guide", "# Guide\n\nSome text here.")
    assert c.embed_text == "Guide\n\n# Guide\n\nSome text here."
    assert c.tokens == words(c.embed_text)
    raw = "\x00".join(["acme", "a.md", "Guide", c.text, "0"])
    assert c.chunk_id == hashlib.sha256(raw.encode()).hexdigest()[:32]
    assert re.fullmatch(r"[0-9a-f]{32}", c.chunk_id)
    [plain] = chunk("No heading at all.")
    assert plain.section == "" and plain.embed_text == "No heading at all."


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ChunkerError, match="max_tokens"):
        chunk("text", target_tokens=100, max_tokens=50)
    with pytest.raises(ChunkerError, match="target_tokens"):
        chunk("text", target_tokens=0)


def test_crlf_is_normalised_before_hashing() -> None:
    text = "# A\n\nfirst para\nline two\n\n## B\n\nsecond para\n"
    assert chunk(text.replace("\n", "\r\n")) == chunk(text)


def test_section_paths_follow_the_heading_stack() -> None:
    text = (
        "intro before any heading\n\n# Book\n\nbook intro\n\n## Ch 1\n\none\n\n### Deep\n\ndeep\n\n"
        "## Ch 2 ##\n\ntwo\n\n#hashtag is not a heading\n\n# Other\n\nother"
    )
    got = [(c.section, c.text) for c in chunk(text)]
    assert got == [
        ("", "intro before any heading"),
        ("Book", "# Book\n\nbook intro"),
        ("Book > Ch 1", "## Ch 1\n\none"),
        ("Book > Ch 1 > Deep", "### Deep\n\ndeep"),
        ("Book > Ch 2", "## Ch 2 ##\n\ntwo\n\n#hashtag is not a heading"),
        ("Other", "# Other\n\nother"),
    ]


def test_chunks_never_span_sections() -> None:
    body = "\n\n".join(paragraph(i, 30) for i in range(6))
    text = f"# A\n\n{body}\n\n# B\n\n{body}"
    chunks = chunk(text, target_tokens=70, max_tokens=90)
    assert {c.section for c in chunks} == {"A", "B"}
    assert not any("# B" in c.text for c in chunks if c.section == "A")
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


def test_fence_is_one_block_and_hides_headings() -> None:
    fence = "```python\n# not a heading\n\nx = 1\n\n\ny = 2\n```"
    text = f"# Code\n\nBefore the listing.\n\n{fence}\n\nAfter it."
    [c] = chunk(text)
    assert c.section == "Code" and fence in c.text
    tilde = "~~~\n## still code\n~~~"
    assert [c.section for c in chunk(f"# T\n\n{tilde}")] == ["T"]


def test_small_blocks_are_packed_but_not_past_the_target() -> None:
    text = "\n\n".join(paragraph(i, 10) for i in range(40))
    chunks = chunk(text, target_tokens=60, max_tokens=80)
    assert 7 <= len(chunks) < 40  # packed: fewer chunks than paragraphs
    assert all(c.tokens <= 80 for c in chunks)
    assert squeeze("".join(c.text for c in chunks)) == squeeze(text)


def test_oversize_fence_is_split_at_lines() -> None:
    code = "\n".join(f"let v{i} = compute({i}, {i + 1});" for i in range(120))
    text = f"# Big\n\n```rust\n{code}\n```"
    chunks = chunk(text, target_tokens=40, max_tokens=50)
    assert len(chunks) > 5
    assert all(c.tokens <= 50 for c in chunks)
    for c in chunks:  # every piece ends at a line end of the listing
        assert c.text.endswith((");", "```"))
    assert squeeze("".join(c.text for c in chunks)) == squeeze(text)


def test_long_line_splits_at_sentences_then_words_then_characters() -> None:
    sentences = " ".join(f"Sentence {i} has exactly seven words here." for i in range(30))
    chunks = chunk(sentences, target_tokens=20, max_tokens=25)
    assert all(c.tokens <= 25 for c in chunks)
    assert all(c.text.endswith("here.") for c in chunks)
    run_on = " ".join(f"word{i}" for i in range(500))  # one sentence, no punctuation
    chunks = chunk(run_on, target_tokens=40, max_tokens=50)
    assert all(c.tokens <= 50 for c in chunks) and len(chunks) >= 10
    assert squeeze("".join(c.text for c in chunks)) == squeeze(run_on)
    blob = "x" * 5000  # one "word" too long for a character-level tokenizer
    chunks = chunk(blob, count_tokens=len, target_tokens=100, max_tokens=120)
    assert all(c.tokens <= 120 for c in chunks)
    assert "".join(c.text for c in chunks) == blob


def test_duplicate_chunks_get_distinct_ids() -> None:
    para = paragraph(7, 40)
    text = f"# S\n\n{paragraph(1, 20)}\n\n{para}\n\n{para}\n\n{para}"
    chunks = chunk(text, target_tokens=45, max_tokens=60)
    assert sum(c.text == para for c in chunks) == 3
    assert len(ids(chunks)) == len(chunks)


def test_ids_depend_on_tenant_and_doc_id() -> None:
    text = "# A\n\nsome text\n\n# B\n\nmore text"
    base = ids(chunk(text))
    assert base.isdisjoint(ids(chunk(text, tenant="other")))
    assert base.isdisjoint(ids(chunk(text, doc_id="other.md")))


def test_description_ending_in_colon_stays_with_its_command() -> None:
    examples = "\n\n".join(
        f"- Do thing number {i} with flags:\n\n`tool --n {i} --x`" for i in range(30)
    )
    text = f"# tool\n\n> A tool.\n> More information: <https://example.com>.\n\n{examples}\n"
    chunks = chunk(text, target_tokens=40, max_tokens=60)
    assert len(chunks) > 3
    for c in chunks:
        assert not c.text.endswith(":"), c.text
        assert c.text.startswith(("# tool", "- Do thing")), c.text


def test_edit_stability_in_one_long_section() -> None:
    """No greedy cascade: inserting at the top of a long section keeps later chunks."""
    paras = [paragraph(i, 5 + (i * 37) % 60) for i in range(200)]
    before = chunk("\n\n".join(paras))
    for at in (1, 50, 120):
        after = chunk("\n\n".join([*paras[:at], NEW_PARAGRAPH, *paras[at:]]))
        assert len(ids(after) - ids(before)) <= 3
        deleted = chunk("\n\n".join(paras[:at] + paras[at + 1 :]))
        assert len(ids(deleted) - ids(before)) <= 3
    assert len(before) > 40


# -- properties ------------------------------------------------------------------------------

_WORDS = ["alpha", "beta", "gamma", "delta", "x", "Ünïcode", "a.", "b?", "c!", "d:", "e;", "f,"]
_LINE = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "# Title",
            "## Sub",
            "### Deep",
            "#",
            "```",
            "```rust",
            "~~~",
            "> quote",
            "- item:",
            "`cmd --flag`",
            "1. step",
            "    indented",
            "---",
            " ## spaced #",
        ]
    ),
    st.lists(st.sampled_from(_WORDS), min_size=1, max_size=60).map(" ".join),
    st.text(max_size=40),
)
_DOC = st.tuples(st.lists(_LINE, max_size=50), st.booleans()).map(
    lambda t: ("\r\n" if t[1] else "\n").join(t[0])
)
_LIMITS = st.tuples(st.integers(1, 60), st.integers(0, 40)).map(
    lambda t: (t[0], max(8, t[0] + t[1]))
)


def words_and_newlines(text: str) -> int:
    """Like a BPE tokenizer, newlines cost tokens: summed block counts then under-count a chunk."""
    return len(text.split()) + text.count("\n")


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_DOC, limits=_LIMITS, count=st.sampled_from([words, words_and_newlines]))
def test_properties(text: str, limits: tuple[int, int], count) -> None:
    target, most = limits
    chunks = chunk(text, target_tokens=target, max_tokens=most, count_tokens=count)
    # Deterministic.
    assert chunk(text, target_tokens=target, max_tokens=most, count_tokens=count) == chunks
    # No content lost or duplicated: the non-whitespace characters come back in order.
    assert squeeze("".join(c.text for c in chunks)) == squeeze(text)
    for i, c in enumerate(chunks):
        # Indentation is kept as written; blank lines around a chunk are not.
        assert c.ordinal == i and c.text.strip() and c.text.strip("\n") == c.text
        assert c.tokens == count(c.embed_text) <= most
    # Ids are unique within a document and depend on tenant and doc_id.
    assert len(ids(chunks)) == len(chunks)
    others = ids(chunk(text, tenant="u", target_tokens=target, max_tokens=most))
    assert others.isdisjoint(ids(chunks))
    others = ids(chunk(text, doc_id="e", target_tokens=target, max_tokens=most))
    assert others.isdisjoint(ids(chunks))


@hsettings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_with_a_character_tokenizer(text: str) -> None:
    chunks = chunk(text, count_tokens=len, target_tokens=20, max_tokens=30)
    assert squeeze("".join(c.text for c in chunks)) == squeeze(text)
    assert all(c.tokens == len(c.embed_text) <= 30 for c in chunks)


# -- real corpora ----------------------------------------------------------------------------

needs_corpora = pytest.mark.skipif(
    not (CORPORA / "rust-book").is_dir() or not (CORPORA / "tldr").is_dir(),
    reason=f"shared corpora not found at {CORPORA} (optional)",
)


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rust_book() -> dict[str, str]:
    return {r["doc_id"]: r["text"] for r in _read(CORPORA / "rust-book" / "snapshot.jsonl.gz")}


@pytest.fixture(scope="module")
def rust_history() -> dict[str, list[str]]:
    """Every upserted version of every chapter, snapshot first, in seq order."""
    rows = _read(CORPORA / "rust-book" / "snapshot.jsonl.gz")
    rows += _read(CORPORA / "rust-book" / "events.jsonl.gz")
    versions: dict[str, list[str]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["seq"]):
        if r["op"] == "upsert":
            versions[r["doc_id"]].append(r["text"])
    return versions


@pytest.fixture(scope="module")
def tldr() -> dict[str, str]:
    return {r["doc_id"]: r["text"] for r in _read(CORPORA / "tldr" / "snapshot.jsonl.gz")}


def _is_prose(p: str) -> bool:
    return len(p.split()) >= 12 and not p.lstrip().startswith(
        ("#", "```", "<", ">", "-", "*", "|", "[", "{", "1.")
    )


def _prose_at(paras: list[str], i: int) -> int:
    while not _is_prose(paras[i]):
        i += 1
    return i


def _longest_section_start(paras: list[str]) -> int:
    heads = [i for i, p in enumerate(paras) if p.startswith("#")] + [len(paras)]
    k = max(range(len(heads) - 1), key=lambda k: sum(map(len, paras[heads[k] : heads[k + 1]])))
    return heads[k]


def _long_chapters(book: dict[str, str]) -> list[str]:
    return sorted(d for d, t in book.items() if len(t) > 20_000)


@needs_corpora
def test_one_word_edit_changes_only_its_chunk(rust_book: dict[str, str]) -> None:
    chapters = _long_chapters(rust_book)
    assert len(chapters) >= 5
    for doc_id in chapters:
        paras = rust_book[doc_id].split("\n\n")
        before = chunk("\n\n".join(paras), doc_id=doc_id)
        i = _prose_at(paras, len(paras) // 2)
        edited = paras[i].split(" ")
        edited[len(edited) // 2] = "zyzzyva"
        after = chunk("\n\n".join([*paras[:i], " ".join(edited), *paras[i + 1 :]]), doc_id=doc_id)
        added, removed = ids(after) - ids(before), ids(before) - ids(after)
        assert 1 <= len(added) <= 2 and 1 <= len(removed) <= 2, doc_id
        # The chunk that held the paragraph is among the changed ones.
        [old] = [c for c in before if paras[i] in c.text]
        [new] = [c for c in after if " ".join(edited) in c.text]
        assert old.chunk_id in removed and new.chunk_id in added


@needs_corpora
def test_inserting_or_deleting_a_paragraph_changes_few_chunks(rust_book: dict[str, str]) -> None:
    for doc_id in _long_chapters(rust_book):
        paras = rust_book[doc_id].split("\n\n")
        before = ids(chunk("\n\n".join(paras), doc_id=doc_id))
        assert len(before) >= 20
        # Near the top of the chapter, and at the top of its longest section, where greedy
        # packing would shift every later boundary of the section.
        top = _prose_at(paras, 1)
        long_top = _prose_at(paras, _longest_section_start(paras) + 1)
        for at in (top, long_top):
            text = "\n\n".join([*paras[: at + 1], NEW_PARAGRAPH, *paras[at + 1 :]])
            inserted = ids(chunk(text, doc_id=doc_id))
            assert len(inserted - before) <= 3 and len(before - inserted) <= 3, (doc_id, at)
        text = "\n\n".join(paras[:long_top] + paras[long_top + 1 :])
        deleted = ids(chunk(text, doc_id=doc_id))
        assert len(deleted - before) <= 3 and len(before - deleted) <= 3, doc_id


def _survival(versions: list[str], count_tokens=words) -> list[float]:
    """Per real edit: the fraction of the previous version's chunk ids still present."""
    out, prev = [], None
    for text in versions:
        cur = ids(chunk(text, doc_id="chapter.md", count_tokens=count_tokens))
        if prev is not None and cur != prev:
            out.append(len(prev & cur) / len(prev))
        prev = cur
    return out


# The most edited chapter of the corpus (72 versions while the async chapter was written).
HISTORY_CHAPTER = "src/ch17-02-concurrency-with-async.md"


@needs_corpora
def test_real_edit_history_keeps_most_chunk_ids(rust_history: dict[str, list[str]]) -> None:
    versions = rust_history[HISTORY_CHAPTER]
    assert len(versions) > 50
    kept = _survival(versions)
    # Headings removed: one long section, so nothing but the cut rule stops a cascade.
    flat = _survival([re.sub(r"(?m)^#{1,6}(?=\s)", "", v) for v in versions])
    print(
        f"\n{HISTORY_CHAPTER}: {len(kept)} edits, chunk ids kept: mean {statistics.mean(kept):.3f}"
        f" median {statistics.median(kept):.3f}; without headings: mean {statistics.mean(flat):.3f}"
    )
    # Measured 0.770 and 0.797. Greedy packing of the same blocks keeps 0.758 and 0.756: with
    # headings its cascades end at the next heading (this chapter has many), so only the
    # heading-free replay tells the two apart; the tests above catch the cascade directly.
    assert statistics.mean(kept) >= 0.75
    assert statistics.mean(flat) >= 0.78


_EXAMPLE = re.compile(r"^(- .*:)\n\n(`.*`)$", re.MULTILINE)


def _examples_kept_whole(chunks: list[Chunk], page: str) -> bool:
    pairs = _EXAMPLE.findall(page)
    return bool(pairs) and all(
        any(desc in c.text and cmd in c.text for c in chunks) for desc, cmd in pairs
    )


@needs_corpora
def test_tldr_examples_keep_description_and_command(tldr: dict[str, str]) -> None:
    # A small target forces most pages apart, so every example meets a possible cut.
    for doc_id, page in tldr.items():
        chunks = chunk(page, doc_id=doc_id, target_tokens=30, max_tokens=60)
        assert _examples_kept_whole(chunks, page), doc_id
        assert squeeze("".join(c.text for c in chunks)) == squeeze(page)


# -- real tokenizer (all-MiniLM-L6-v2's WordPiece, from the session `embedder` fixture) ---------


@pytest.fixture(scope="module")
def count_real(embedder):
    return embedder.count_tokens


@pytest.mark.slow
@needs_corpora
def test_tldr_pages_with_the_real_tokenizer(tldr: dict[str, str], count_real) -> None:
    page = tldr["pages/common/git-commit.md"]  # 948 bytes
    chunks = chunk(page, doc_id="pages/common/git-commit.md", count_tokens=count_real)
    assert 1 <= len(chunks) <= 3
    assert {c.section for c in chunks} == {"git commit"}
    assert _examples_kept_whole(chunks, page)
    assert all(c.tokens == count_real(c.embed_text) <= 250 for c in chunks)
    sizes = []
    for doc_id, page in tldr.items():
        if 900 <= len(page.encode()) <= 1100:
            chunks = chunk(page, doc_id=doc_id, count_tokens=count_real)
            assert _examples_kept_whole(chunks, page), doc_id
            assert all(c.tokens <= 250 for c in chunks), doc_id
            sizes.append(len(chunks))
    share = sum(1 <= n <= 3 for n in sizes) / len(sizes)
    print(f"\n{len(sizes)} tldr pages of ~1 KB: {share:.1%} give 1-3 chunks, at most {max(sizes)}")
    assert len(sizes) > 200 and share >= 0.95 and max(sizes) <= 4  # measured 98.6%, 4


@pytest.mark.slow
@needs_corpora
def test_rust_book_with_the_real_tokenizer(
    rust_book: dict[str, str], rust_history: dict[str, list[str]], count_real
) -> None:
    doc_id = "src/ch10-03-lifetime-syntax.md"
    paras = rust_book[doc_id].split("\n\n")
    before = chunk(rust_book[doc_id], doc_id=doc_id, count_tokens=count_real)
    assert len(before) >= 30
    assert all(c.tokens == count_real(c.embed_text) <= 250 for c in before)
    i = _prose_at(paras, len(paras) // 2)
    edited = paras[i].replace(" the ", " this ", 1)
    assert edited != paras[i]
    after = chunk(
        "\n\n".join([*paras[:i], edited, *paras[i + 1 :]]), doc_id=doc_id, count_tokens=count_real
    )
    assert 1 <= len(ids(after) - ids(before)) <= 2
    at = _prose_at(paras, 1)
    inserted = chunk(
        "\n\n".join([*paras[: at + 1], NEW_PARAGRAPH, *paras[at + 1 :]]),
        doc_id=doc_id,
        count_tokens=count_real,
    )
    assert len(ids(inserted) - ids(before)) <= 3
    kept = _survival(rust_history[HISTORY_CHAPTER], count_tokens=count_real)
    print(f"\nreal tokenizer, {HISTORY_CHAPTER}: chunk ids kept mean {statistics.mean(kept):.3f}")
    assert statistics.mean(kept) >= 0.75  # measured 0.81
