"""The Milvus side of the index: a chunk collection and a document-state collection.

Chunk rows are keyed by content-derived chunk id, so an unchanged chunk is never rewritten. The
document-state row (live version, live chunk ids, tombstone) is the swap point: search keeps only
hits whose chunk id is in its document's live set, so a reader never sees two versions mixed,
and a delete or a late older event cannot resurrect text.

Every value that reaches a filter expression is a hex digest or a validated tenant id, so no
document id or user text is ever spliced into a Milvus expression.

A state row stays within Milvus' limits for the largest document the settings allow: a JSON
field holds at most 65,536 bytes (and Milvus 2.3 takes only an object at its top level), so a
live chunk-id list longer than `INLINE_IDS` goes to pages in a third collection, written before
the state row that names them (each state's pages are keyed by its log position, so a reader
holding the previous state row still finds the previous pages until the cleanup step).

The same calls serve milvus-lite 2.5 (the local default) and Milvus servers. Where they differ,
`Engine` (probed once per connection) decides: milvus-lite answers no version, has no aliases,
rejects every filter on a collection with a partition key, and in its local mode searches
AUTOINDEX/IVF through an approximate interim index (recall@10 0.89 measured), so its dense
index is exact FLAT. Expressions avoid `not (...)` (milvus-lite has no NOT node) and hits are
read by field, not by primary-key name (milvus-lite names it `id`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymilvus import (
    AnnSearchRequest,
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    MilvusException,
    RRFRanker,
)

from headwater.errors import StoreError
from headwater.events import Hit
from headwater.settings import Settings
from headwater.versions import Stamp
from index.embedder import variant_id

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TEXT_MAX = 65_535
SECTION_MAX = 2_000
QUERY_CHUNK = 500  # ids per `in [...]` expression, to keep expressions small
COLLECTION_NOT_LOADED = 101  # Milvus error code: "call load() before search/get/query"
# Schema of the document-state collections (in their names): 2 = log-ordered stamps, chunk-id
# lists as objects and pages. The chunk collection's schema is unchanged (its rows are reused).
STATE_SCHEMA = 2
# 32-hex chunk ids take 35 bytes each in JSON: 1,500 stay well under the 65,536-byte JSON limit.
INLINE_IDS = 1500
NO_VERSION = -1  # a state's source version when the event carried none
PAGE_READS = 3  # a state re-read this often when its pages were replaced under the reader


def doc_key(tenant: str, doc_id: str) -> str:
    """Stable, filter-safe key of one document (sha1 of tenant and doc id)."""
    return hashlib.sha1(f"{tenant}\x00{doc_id}".encode()).hexdigest()


def safe_id(value: object) -> bool:
    """Whether `value` is an id of the safe charset (hex digests, tenants, chunk ids)."""
    return isinstance(value, str) and _SAFE.fullmatch(value) is not None


def lit(value: str) -> str:
    """A filter-expression string literal, only for ids of the safe charset (defence in depth)."""
    if not safe_id(value):
        raise ValueError(f"refusing to put {value!r} into a filter expression")
    return f'"{value}"'


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8: Milvus measures VARCHAR limits in bytes.

    A chunk can exceed the text field (one 100 KB "word" is a single [UNK] token); storing it
    clipped keeps the document searchable instead of failing its partition's batch forever.
    """
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode(errors="ignore")


def _in(field_name: str, values: Iterable[str], *, negate: bool = False) -> str:
    # `x not in [...]`, never `not (x in [...])`: milvus-lite 2.5 has no NOT node.
    op = "not in" if negate else "in"
    return f"{field_name} {op} [{', '.join(lit(v) for v in values)}]"


def unimplemented(exc: BaseException) -> bool:
    """Whether a Milvus call failed because this engine does not implement the RPC."""
    code = getattr(exc, "code", None)
    name = getattr(code() if callable(code) else code, "name", None)
    return name == "UNIMPLEMENTED" or "UNIMPLEMENTED" in repr(exc)


@contextlib.contextmanager
def _quiet_pymilvus() -> Iterator[None]:
    """pymilvus logs a traceback for every failed RPC; an expected probe failure is not news."""
    logger = logging.getLogger("pymilvus.decorators")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Engine:
    """What the Milvus behind a connection can do; `version` None means milvus-lite."""

    version: str | None

    @classmethod
    def probe(cls, client: MilvusClient, timeout: float | None = None) -> Engine:
        try:
            with _quiet_pymilvus():
                return cls(str(client.get_server_version(timeout=timeout)))
        except Exception as exc:
            if unimplemented(exc):  # milvus-lite 2.5 implements no GetVersion
                return cls(None)
            raise StoreError(f"Milvus unreachable: {exc}") from exc

    @property
    def lite(self) -> bool:
        return self.version is None

    @property
    def partition_key(self) -> bool:
        """Tenant as partition key: a server prunes a tenant's search to its partition."""
        return not self.lite

    @property
    def dense_index(self) -> str:
        """Exact FLAT on milvus-lite (fast enough at 100k: see BENCHMARKS.md, query)."""
        return "FLAT" if self.lite else "AUTOINDEX"

    @property
    def aliases(self) -> bool:
        return not self.lite


def check_ids(ids: Iterable[object]) -> list[str]:
    """`ids` as a list, each of the safe charset; ValueError otherwise (defence in depth).

    Every id that reaches pymilvus (`query(ids=...)` does not escape them) goes through here.
    """
    out = list(ids)
    bad = next((i for i in out if not safe_id(i)), None)
    if bad is not None:
        raise ValueError(f"refusing to pass {bad!r} to Milvus as an id")
    return out  # type: ignore[return-value]


def page_keys(key: str, stamp: Stamp, pages: int) -> list[str]:
    """Keys of the chunk-id pages of one state: derived from its log position, so a replay
    writes the same pages and a newer state never overwrites the pages an older one names."""
    base = f"{key}/{stamp.partition}/{stamp.offset}/"
    return [hashlib.sha1(f"{base}{i}".encode()).hexdigest() for i in range(pages)]


@dataclass(frozen=True)
class DocState:
    """What the index holds for one document: its live chunks and stamp, or a tombstone."""

    key: str
    tenant: str
    doc_id: str
    stamp: Stamp
    deleted: bool
    chunk_ids: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        """The version readers see (`Stamp.reported`)."""
        return self.stamp.reported

    @property
    def pages(self) -> int:
        """Pages its chunk-id list takes in storage (0: inline in the state row)."""
        n = len(self.chunk_ids)
        return 0 if n <= INLINE_IDS else -(-n // INLINE_IDS)


_STATE_FIELDS = ["doc_key", "tenant", "doc_id", "version", "log_partition", "log_offset",
                 "deleted", "chunk_ids", "metadata"]  # fmt: skip


def _stamp(row: dict) -> Stamp:
    version = int(row["version"])
    return Stamp(None if version == NO_VERSION else version, int(row["log_partition"]),
                 int(row["log_offset"]))  # fmt: skip


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: str
    tenant: str
    doc_key: str
    doc_id: str
    version: int
    section: str
    text: str
    vector: Sequence[float]


class ChunkStore:
    """Chunk and document-state collections for one embedding model (name carries id and dim)."""

    def __init__(
        self, settings: Settings, model_id: str, dim: int, client: MilvusClient | None = None
    ) -> None:
        self.settings = settings
        self.dim = dim
        self.chunks = f"{settings.collection_prefix}_chunks_{model_id}_{dim}"
        self.docs = f"{settings.collection_prefix}_docs_v{STATE_SCHEMA}_{model_id}_{dim}"
        self.lists = f"{settings.collection_prefix}_lists_v{STATE_SCHEMA}_{model_id}_{dim}"
        self.alias = f"{settings.collection_prefix}_chunks"
        self.client = client or MilvusClient(**settings.milvus_client_config())
        self.hybrid = True
        self._lock = threading.Lock()
        self.engine = Engine.probe(self.client, settings.milvus_timeout_s)
        self._ensure()

    @classmethod
    def existing(cls, settings: Settings, *, timeout_s: float = 10.0) -> ChunkStore | None:
        """The collections an indexer made for `settings.embedder`, without loading the model.

        None when there are none yet; StoreError when Milvus cannot be reached.
        """
        model_id = variant_id(settings)
        prefix = f"{settings.collection_prefix}_chunks_{model_id}_"
        try:
            # A dedicated connection: closing this store must not close a shared channel.
            client = MilvusClient(**settings.milvus_client_config(), timeout=timeout_s,
                                  dedicated=True)  # fmt: skip
            names = client.list_collections()
        except Exception as exc:
            raise StoreError(f"Milvus unreachable: {exc}") from exc
        dims = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        dims = [int(d) for d in dims if d.isdigit()]
        if not dims:
            client.close()
            return None
        return cls(settings, model_id, max(dims), client)

    # -- schema --------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self.client.has_collection(self.chunks):
            desc = self.client.describe_collection(self.chunks)
            self.hybrid = any(f["name"] == "sparse" for f in desc["fields"])
        else:
            try:
                self._create_chunks(bm25=True)
            except MilvusException as exc:
                # Older servers (e.g. Milvus 2.3) have no BM25 function: dense search only.
                log.warning("BM25 unavailable (%s); creating a dense-only collection", exc)
                self._drop_if_exists(self.chunks)
                self._create_chunks(bm25=False)
                self.hybrid = False
        if not self.client.has_collection(self.docs):
            self._create_docs()
        if not self.client.has_collection(self.lists):
            self._create_lists()
        for name in self._collections:
            self.client.load_collection(name)

    @property
    def _collections(self) -> tuple[str, str, str]:
        return (self.chunks, self.docs, self.lists)

    def _create_chunks(self, *, bm25: bool) -> None:
        s = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("chunk_id", DataType.VARCHAR, max_length=64, is_primary=True)
        s.add_field("tenant", DataType.VARCHAR, max_length=64,
                    is_partition_key=self.engine.partition_key)  # fmt: skip
        s.add_field("doc_key", DataType.VARCHAR, max_length=40)
        s.add_field("doc_id", DataType.VARCHAR, max_length=2048)
        s.add_field("version", DataType.INT64)
        s.add_field("section", DataType.VARCHAR, max_length=2048)
        if bm25:
            s.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX, enable_analyzer=True)
        else:
            s.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX)
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=self.dim)
        idx = self.client.prepare_index_params()
        idx.add_index("dense", index_type=self.engine.dense_index, metric_type="COSINE")
        if bm25:
            s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            s.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            idx.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self._create(self.chunks, s, idx)

    def _create_docs(self) -> None:
        s = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("doc_key", DataType.VARCHAR, max_length=40, is_primary=True)
        s.add_field("tenant", DataType.VARCHAR, max_length=64)
        s.add_field("doc_id", DataType.VARCHAR, max_length=2048)
        s.add_field("version", DataType.INT64)  # the source version, NO_VERSION if none
        s.add_field("log_partition", DataType.INT64)
        s.add_field("log_offset", DataType.INT64)
        s.add_field("deleted", DataType.BOOL)
        # {"ids": [...]} inline, or {"pages": n}: an object (Milvus 2.3 refuses a list).
        s.add_field("chunk_ids", DataType.JSON)
        s.add_field("metadata", DataType.JSON)
        self._create_keyed(self.docs, s)

    def _create_lists(self) -> None:
        s = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("page_key", DataType.VARCHAR, max_length=40, is_primary=True)
        s.add_field("doc_key", DataType.VARCHAR, max_length=40)
        s.add_field("ids", DataType.JSON)  # {"ids": [...]}, at most INLINE_IDS
        self._create_keyed(self.lists, s)

    def _create_keyed(self, name: str, schema: Any) -> None:
        # Milvus requires a vector field; these rows are only ever read by key.
        schema.add_field("nil", DataType.FLOAT_VECTOR, dim=2)
        idx = self.client.prepare_index_params()
        idx.add_index("nil", index_type="FLAT", metric_type="L2")
        self._create(name, schema, idx)

    def _create(self, name: str, schema: Any, index_params: Any) -> None:
        try:
            self.client.create_collection(name, schema=schema, consistency_level="Strong")
        except MilvusException as exc:
            # Another indexer process created it first.
            if not self.client.has_collection(name):
                raise
            log.debug("collection %s appeared concurrently: %s", name, exc)
        # Apart from the creation: a server that cannot build an index (BM25 on Milvus 2.3) has
        # created the collection already, and that failure must not pass for "created
        # concurrently" (loading such a collection aborts a 2.3 server).
        self.client.create_index(name, index_params)

    def _drop_if_exists(self, name: str) -> None:
        if self.client.has_collection(name):
            self.client.drop_collection(name)

    def point_alias(self) -> bool:
        """Make the model-independent alias name this collection (after a rebuild caught up).

        False on an engine without aliases (milvus-lite): readers name the collection itself.
        """
        if not self.engine.aliases:
            return False
        if self.alias in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(self.chunks, self.alias)
        else:
            self.client.create_alias(self.chunks, self.alias)
        return True

    # -- reads ---------------------------------------------------------------------------------
    def _query_in(
        self,
        collection: str,
        field_name: str,
        values: Iterable[str],
        fields: list[str],
        per_query: int = QUERY_CHUNK,
    ) -> list[dict]:
        """Rows whose `field_name` is one of `values`, in expressions of `per_query` ids."""
        ids = list(dict.fromkeys(values))
        out: list[dict] = []
        for i in range(0, len(ids), per_query):
            out += self._call(
                self.client.query,
                collection,
                filter=_in(field_name, ids[i : i + per_query]),
                output_fields=fields,
            )
        return out

    def doc_states(self, keys: Iterable[str]) -> dict[str, DocState]:
        wanted = list(keys)
        states: dict[str, DocState] = {}
        for _ in range(PAGE_READS):
            rows = self._query_in(self.docs, "doc_key", wanted, _STATE_FIELDS)
            states.update(self._resolve(rows))
            wanted = [r["doc_key"] for r in rows if r["doc_key"] not in states]
            if not wanted:
                return states
        raise StoreError(f"chunk-id pages of {len(wanted)} documents kept changing under a read")

    def _resolve(self, rows: list[dict]) -> dict[str, DocState]:
        """States of these rows; a row whose pages were already replaced is left out."""
        pages = {
            r["doc_key"]: page_keys(r["doc_key"], _stamp(r), int(r["chunk_ids"]["pages"]))
            for r in rows
            if "pages" in (r["chunk_ids"] or {})
        }
        wanted = [k for keys in pages.values() for k in keys]
        # A page holds up to INLINE_IDS ids (~52 KB): a few per response.
        found = {
            p["page_key"]: p["ids"]["ids"]
            for p in self._query_in(self.lists, "page_key", wanted, ["page_key", "ids"], 16)
        }
        out = {}
        for r in rows:
            key = r["doc_key"]
            if key in pages:
                if any(k not in found for k in pages[key]):
                    continue
                ids: tuple[str, ...] = tuple(i for k in pages[key] for i in found[k])
            else:
                ids = tuple((r["chunk_ids"] or {}).get("ids", ()))
            out[key] = DocState(
                key=key, tenant=r["tenant"], doc_id=r["doc_id"], stamp=_stamp(r),
                deleted=bool(r["deleted"]), chunk_ids=ids, metadata=dict(r["metadata"] or {}),
            )  # fmt: skip
        return out

    def doc_versions(self, keys: Iterable[str]) -> dict[str, tuple[int, bool]]:
        """`{doc key: (live version as readers see it, deleted)}`: the swap point without the
        chunk-id lists, for callers that poll many documents often."""
        fields = ["doc_key", "version", "log_partition", "log_offset", "deleted"]
        rows = self._query_in(self.docs, "doc_key", keys, fields)
        return {r["doc_key"]: (_stamp(r).reported, bool(r["deleted"])) for r in rows}

    def existing_chunks(self, chunk_ids: Iterable[str]) -> set[str]:
        rows = self._query_in(self.chunks, "chunk_id", chunk_ids, ["chunk_id"])
        return {r["chunk_id"] for r in rows}

    def chunk_rows(self, chunk_ids: Iterable[str], *, vectors: bool = False) -> list[dict]:
        """Stored rows for these chunk ids (text, section, doc; the vector when asked)."""
        fields = ["chunk_id", "tenant", "doc_key", "doc_id", "version", "section", "text"]
        if vectors:
            fields.append("dense")
        return self._query_in(self.chunks, "chunk_id", chunk_ids, fields)

    def texts(self, chunk_ids: Iterable[str]) -> dict[str, str]:
        """`{chunk id: text}` of the chunks the index holds among `chunk_ids`."""
        rows = self._query_in(self.chunks, "chunk_id", chunk_ids, ["chunk_id", "text"])
        return {r["chunk_id"]: r["text"] for r in rows}

    def vectors(self, chunk_ids: Iterable[str]) -> dict[str, list[float]]:
        return {r["chunk_id"]: list(r["dense"]) for r in self.chunk_rows(chunk_ids, vectors=True)}

    def count_chunks(self, tenant: str | None = None) -> int:
        expr = f"tenant == {lit(tenant)}" if tenant else 'chunk_id != ""'
        rows = self._call(self.client.query, self.chunks, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def iter_chunks(self, batch: int = 1000) -> Iterable[dict]:
        """Every chunk row (no vectors), for verification."""
        fields = ["chunk_id", "tenant", "doc_key", "doc_id", "version", "section", "text"]
        it = self.client.query_iterator(
            self.chunks, batch_size=batch, filter='chunk_id != ""', output_fields=fields
        )
        try:
            while rows := it.next():
                yield from rows
        finally:
            it.close()

    def iter_doc_states(self, batch: int = 1000) -> Iterable[DocState]:
        it = self.client.query_iterator(
            self.docs, batch_size=batch, filter='doc_key != ""', output_fields=_STATE_FIELDS
        )
        try:
            while rows := it.next():
                states = self._resolve(rows)
                missed = [r["doc_key"] for r in rows if r["doc_key"] not in states]
                if missed:  # replaced meanwhile: read those again, by key
                    states.update(self.doc_states(missed))
                yield from states.values()
        finally:
            it.close()

    def search(self, vector: Sequence[float], text: str, *, tenant: str, limit: int) -> list[Hit]:
        """Hybrid dense + BM25 (reciprocal rank fusion) within one tenant; dense-only if no BM25.

        Candidates only: a hit's version is its row's (when the chunk was first written), and
        superseded chunks awaiting cleanup are among them; `Searcher` keeps the live ones.
        """
        expr = f"tenant == {lit(tenant)}"
        fields = ["chunk_id", "doc_id", "version", "section", "text"]
        if self.hybrid and text.strip():
            dense = AnnSearchRequest(
                data=[list(vector)], anns_field="dense", param={"metric_type": "COSINE"},
                limit=limit, expr=expr,
            )  # fmt: skip
            sparse = AnnSearchRequest(
                data=[text], anns_field="sparse", param={"metric_type": "BM25"},
                limit=limit, expr=expr,
            )  # fmt: skip
            try:
                res = self._call(
                    self.client.hybrid_search, self.chunks, [dense, sparse],
                    ranker=RRFRanker(60), limit=limit, output_fields=fields,
                )  # fmt: skip
            except StoreError as exc:
                if "NaN or Inf" not in str(exc):
                    raise
                # milvus-lite 2.5 scores BM25 over rows that hold no term at all (only empty
                # texts) as NaN and refuses the query; BM25 has nothing to rank there.
                res = None
        else:
            res = None
        if res is None:
            res = self._call(
                self.client.search, self.chunks, data=[list(vector)], anns_field="dense",
                limit=limit, filter=expr, output_fields=fields,
                search_params={"metric_type": "COSINE"},
            )  # fmt: skip
        hits = []
        for h in res[0] if res else []:
            e = h["entity"]
            hits.append(
                Hit(doc_id=e["doc_id"], version=int(e["version"]), chunk_id=e["chunk_id"],
                    score=float(h["distance"]), text=e["text"], section=e["section"] or "")
            )  # fmt: skip
        return hits

    # -- writes (each idempotent) --------------------------------------------------------------
    def write_chunks(self, rows: Sequence[ChunkRow]) -> None:
        if not rows:
            return
        data = [
            {
                "chunk_id": r.chunk_id, "tenant": r.tenant, "doc_key": r.doc_key,
                "doc_id": r.doc_id, "version": r.version, "section": clip(r.section, SECTION_MAX),
                "text": clip(r.text, TEXT_MAX), "dense": [float(x) for x in r.vector],
            }
            for r in rows
        ]  # fmt: skip
        for i in range(0, len(data), QUERY_CHUNK):
            self._call(self.client.upsert, self.chunks, data[i : i + QUERY_CHUNK])

    def write_states(self, states: Sequence[DocState]) -> None:
        """Write the pages of long chunk-id lists, then the state rows (the swap)."""
        if not states:
            return
        pages = []
        for st in states:
            keys = page_keys(st.key, st.stamp, st.pages)
            for i, page_key in enumerate(keys):
                ids = list(st.chunk_ids[i * INLINE_IDS : (i + 1) * INLINE_IDS])
                pages.append({"page_key": page_key, "doc_key": st.key, "ids": {"ids": ids},
                              "nil": [0.0, 0.0]})  # fmt: skip
        for i in range(0, len(pages), 16):
            self._call(self.client.upsert, self.lists, pages[i : i + 16])
        data = [
            {
                "doc_key": s.key, "tenant": s.tenant, "doc_id": s.doc_id,
                "version": NO_VERSION if s.stamp.version is None else s.stamp.version,
                "log_partition": s.stamp.partition, "log_offset": s.stamp.offset,
                "deleted": s.deleted, "metadata": s.metadata, "nil": [0.0, 0.0],
                "chunk_ids": {"pages": s.pages} if s.pages else {"ids": list(s.chunk_ids)},
            }
            for s in states
        ]  # fmt: skip
        for i in range(0, len(data), QUERY_CHUNK):
            self._call(self.client.upsert, self.docs, data[i : i + QUERY_CHUNK])

    def remove_stale_pages(self, states: Sequence[DocState]) -> None:
        """Delete the chunk-id pages of these documents that their (written) states do not name."""
        if not states:
            return
        keep = [k for st in states for k in page_keys(st.key, st.stamp, st.pages)]
        expr = _in("doc_key", [st.key for st in states])
        if keep:
            expr += f" and {_in('page_key', keep, negate=True)}"
        self._call(self.client.delete, self.lists, filter=expr)

    def remove_stale_chunks(self, keys: Sequence[str], keep: Sequence[str]) -> None:
        """Delete the rows of these documents whose chunk id is not in `keep` (their live sets).

        One expression serves many documents because chunk ids embed their document.
        """
        if not keys:
            return
        expr = _in("doc_key", keys)
        if keep:
            expr += f" and {_in('chunk_id', keep, negate=True)}"
        self._call(self.client.delete, self.chunks, filter=expr)

    def drop(self) -> None:
        for name in self._collections:
            self._drop_if_exists(name)

    def close(self) -> None:
        self.client.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._call_once(fn, *args, **kwargs)
        except StoreError as exc:
            if getattr(exc.__cause__, "code", None) != COLLECTION_NOT_LOADED:
                raise
        # A restarted Milvus serves its collections released: without a load every retry fails.
        log.warning("Milvus %s: collections are released (server restarted?); loading", fn.__name__)
        for name in self._collections:
            self._call_once(self.client.load_collection, name)
        return self._call_once(fn, *args, **kwargs)

    def _call_once(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if "ids" in kwargs:  # pymilvus splices ids into an expression unescaped
            kwargs["ids"] = check_ids(kwargs["ids"])
        # A bounded wait: an unanswered call (a restarting server) becomes a retryable error.
        kwargs.setdefault("timeout", self.settings.milvus_timeout_s)
        # pymilvus clients are not documented as thread-safe; searches and writes may share one.
        t0 = time.perf_counter()
        try:
            with self._lock:
                return fn(*args, **kwargs)
        except MilvusException as exc:
            raise StoreError(f"Milvus {fn.__name__} failed: {exc}") from exc
        except Exception as exc:  # grpc errors surface as plain exceptions when the server is gone
            if type(exc).__module__.startswith(("grpc", "pymilvus")):
                raise StoreError(f"Milvus unreachable during {fn.__name__}: {exc}") from exc
            raise
        finally:
            log.debug("%s took %.1f ms", fn.__name__, (time.perf_counter() - t0) * 1000)
