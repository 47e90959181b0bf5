"""The truth checker: compare what Milvus holds with what the events say it should hold.

The expected index is the latest event of every document (the events come from the caller:
`consumers.truth` reads them from the documents topic), folded with the indexer's own rule
(`headwater.versions.supersedes`) and chunked by the same chunker; the
comparison counts missing chunks, stale chunks (superseded text or wrong version), duplicates,
chunks of deleted documents, and leaked rows (a row whose tenant does not own its document).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from headwater.events import DocumentEvent, Logged
from headwater.versions import Stamp, supersedes
from index.chunker import Chunk
from index.search import Searcher
from index.store import ChunkStore, doc_key


@dataclass(frozen=True)
class ExpectedDoc:
    tenant: str
    doc_id: str
    stamp: Stamp
    deleted: bool
    chunk_ids: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        """The version readers see (`Stamp.reported`)."""
        return self.stamp.reported


@dataclass
class Report:
    docs: int = 0
    chunks: int = 0
    missing: int = 0
    stale: int = 0
    duplicates: int = 0
    leaked: int = 0
    deleted_present: int = 0
    wrong_version: int = 0
    # From `check_search`: sampled searches, hits that are not a live chunk of the searching
    # tenant's document at its latest version, and sampled documents their own text missed.
    searched: int = 0
    search_wrong: int = 0
    search_missed: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # search_missed is ranking quality (degenerate texts tie), not index truth.
        return not (
            self.missing or self.stale or self.duplicates or self.leaked or self.deleted_present
            or self.wrong_version or self.search_wrong
        )  # fmt: skip

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def latest_events(events: Iterable[Logged]) -> dict[str, Logged]:
    """The event of every document that the indexer keeps: folded in log order, as it does."""
    latest: dict[str, Logged] = {}
    for logged in events:
        e = logged.event
        key = doc_key(e.tenant, e.doc_id)
        current = latest.get(key)
        if supersedes(logged.stamp, None if current is None else current.stamp):
            latest[key] = logged
    return latest


def expected_index(
    events: Iterable[Logged], chunk: Callable[[DocumentEvent], list[Chunk]]
) -> dict[str, ExpectedDoc]:
    out = {}
    for key, logged in latest_events(events).items():
        e = logged.event
        ids = tuple(c.chunk_id for c in chunk(e)) if e.op == "upsert" else ()
        out[key] = ExpectedDoc(e.tenant, e.doc_id, logged.stamp, e.op == "delete", ids)
    return out


def verify(store: ChunkStore, expected: dict[str, ExpectedDoc]) -> Report:
    report = Report(docs=len(expected))
    states = {s.key: s for s in store.iter_doc_states()}
    rows_by_doc: dict[str, list[dict]] = {}
    seen: Counter[str] = Counter()
    for row in store.iter_chunks():
        seen[row["chunk_id"]] += 1
        rows_by_doc.setdefault(row["doc_key"], []).append(row)
        if doc_key(row["tenant"], row["doc_id"]) != row["doc_key"]:
            report.leaked += 1
            report.note(f"leaked row {row['chunk_id']} ({row['tenant']}/{row['doc_id']})")
    report.chunks = sum(seen.values())
    report.duplicates = sum(n - 1 for n in seen.values() if n > 1)

    for key, exp in expected.items():
        rows = rows_by_doc.pop(key, [])
        held = {r["chunk_id"] for r in rows}
        state = states.get(key)
        if exp.deleted:
            if rows:
                report.deleted_present += len(rows)
                report.note(f"deleted {exp.tenant}/{exp.doc_id} still has {len(rows)} chunks")
            if state is not None and not state.deleted:
                report.wrong_version += 1
                report.note(f"deleted {exp.tenant}/{exp.doc_id} is live at v{state.version}")
            continue
        if state is None or state.deleted or state.stamp != exp.stamp:
            report.wrong_version += 1
            got = "absent" if state is None else f"{state.stamp} deleted={state.deleted}"
            report.note(f"{exp.tenant}/{exp.doc_id}: expected {exp.stamp}, index has {got}")
        elif tuple(state.chunk_ids) != exp.chunk_ids:
            report.stale += 1
            report.note(f"{exp.tenant}/{exp.doc_id}: live chunk set differs from the expected")
        missing = [c for c in exp.chunk_ids if c not in held]
        stale = held - set(exp.chunk_ids)
        report.missing += len(missing)
        report.stale += len(stale)
        if missing or stale:
            report.note(f"{exp.tenant}/{exp.doc_id}: {len(missing)} missing, {len(stale)} stale")
    for key, rows in rows_by_doc.items():  # rows of documents no event mentions
        report.stale += len(rows)
        report.note(f"{len(rows)} rows of unknown document {rows[0]['doc_id']} ({key})")
    return report


def check_search(
    searcher: Searcher,
    expected: dict[str, ExpectedDoc],
    report: Report,
    sample: int = 20,
    k: int = 10,
    seed: int = 0,
) -> Report:
    """Search a sample of live documents by their first chunk's text, within their tenant.

    Every hit must be a live chunk of a document of that tenant at its expected version (a hit
    of another tenant, a deleted document or a superseded version counts in `search_wrong`); a
    sampled document absent from its own search counts in `search_missed`.
    """
    live = sorted(key for key, e in expected.items() if not e.deleted and e.chunk_ids)
    picked = random.Random(seed).sample(live, min(sample, len(live)))
    rows = searcher.store.chunk_rows(expected[key].chunk_ids[0] for key in picked)
    texts = {r["chunk_id"]: r["text"] for r in rows}
    for key in picked:
        exp = expected[key]
        query = " ".join(texts.get(exp.chunk_ids[0], "").split())[:2000] or exp.doc_id
        hits = searcher.search(query, tenant=exp.tenant, k=k)
        report.searched += 1
        for h in hits:
            want = expected.get(doc_key(exp.tenant, h.doc_id))
            allowed = () if want is None or want.deleted else want.chunk_ids
            if h.chunk_id not in allowed or h.version != want.version:
                report.search_wrong += 1
                report.note(f"search in {exp.tenant} returned {h.doc_id} v{h.version}")
        if all(h.doc_id != exp.doc_id for h in hits):
            report.search_missed += 1
            report.note(f"{exp.tenant}/{exp.doc_id} not in the top {k} for its own text")
    return report
