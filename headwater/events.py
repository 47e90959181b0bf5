"""Event schemas on headwater's topics (JSON, versioned by `schema_version`).

Every event is a pydantic model that rejects unknown fields; `parse_*` turns raw bytes into an
event or raises `EventError` whose message is the reason recorded in the dead-letter topic.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from headwater.errors import EventError
from headwater.versions import INT64_MAX, Stamp

SCHEMA_VERSION = 1
TENANT_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# The shared "house style" adapter's scope: it cannot be a tenant id (TENANT_RE starts alnum).
HOUSE = "_house"
SCOPE_RE = r"^(_house|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
MAX_DOC_ID_BYTES = 512
MAX_SOURCE_CHARS = 256

Tenant = Annotated[str, StringConstraints(pattern=TENANT_RE)]
AdapterScope = Annotated[str, StringConstraints(pattern=SCOPE_RE)]
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Limits:
    """Size limits, from Settings (`max_text_bytes`, `max_metadata_bytes`)."""

    max_text_bytes: int = 2_000_000
    max_metadata_bytes: int = 16_384

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(settings.max_text_bytes, settings.max_metadata_bytes)


def check_doc_id(doc_id: str) -> str:
    """The doc id in NFC: any printable text (it never reaches a filter expression).

    Doc ids are source paths, and "café.md" typed on two systems may arrive composed (NFC) or
    decomposed (NFD): both name one document, so ids are normalized wherever they enter.
    """
    doc_id = unicodedata.normalize("NFC", doc_id)
    if not doc_id or doc_id != doc_id.strip():
        raise ValueError("doc_id must be non-empty without leading/trailing whitespace")
    if len(doc_id.encode()) > MAX_DOC_ID_BYTES:
        raise ValueError(f"doc_id longer than {MAX_DOC_ID_BYTES} bytes")
    if any(not ch.isprintable() for ch in doc_id):
        raise ValueError("doc_id contains control or non-printable characters")
    return doc_id


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    return ctx.get("limits") or Limits()


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


class DocumentEvent(_Event):
    """An upsert (the document now has exactly `text`) or a delete of one document."""

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    tenant: Tenant
    doc_id: str
    op: Literal["upsert", "delete"]
    version: int | None = Field(
        default=None,
        ge=0,
        le=INT64_MAX,
        description="The source's own version, if it has one (see headwater.versions).",
    )
    text: str | None = None
    metadata: dict[str, Scalar] = Field(default_factory=dict)
    source: str = Field(default="api", max_length=MAX_SOURCE_CHARS)
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("doc_id")
    @classmethod
    def _doc_id(cls, v: str) -> str:
        return check_doc_id(v)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None, info: ValidationInfo) -> str | None:
        limit = _limits(info).max_text_bytes
        if v is not None and len(v.encode("utf-8", "surrogatepass")) > limit:
            raise ValueError(f"text is larger than the limit of {limit} bytes")
        if v is not None and re.search(r"[\ud800-\udfff]", v):
            raise ValueError("text contains unpaired surrogates (not valid UTF-8)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Scalar], info: ValidationInfo) -> dict[str, Scalar]:
        limit = _limits(info).max_metadata_bytes
        if len(json.dumps(v, ensure_ascii=False).encode()) > limit:
            raise ValueError(f"metadata is larger than the limit of {limit} bytes")
        return v

    @model_validator(mode="after")
    def _op_shape(self) -> DocumentEvent:
        if self.op == "upsert" and self.text is None:
            raise ValueError("an upsert needs text")
        if self.op == "delete" and self.text is not None:
            raise ValueError("a delete carries no text")
        return self

    @property
    def key(self) -> bytes:
        """Kafka key: one document's events share a partition, so they stay in order."""
        return kafka_key(self.tenant, self.doc_id)


@dataclass(frozen=True)
class Logged:
    """A document event and where the documents topic holds it (the order it applies in)."""

    event: DocumentEvent
    partition: int
    offset: int

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.event.version, self.partition, self.offset)


def kafka_key(tenant: str, doc_id: str) -> bytes:
    """The Kafka key of a document's events: `tenant/doc_id` (the index keys by `doc_key`)."""
    return f"{tenant}/{doc_id}".encode()


def parse_document(raw: bytes | None, limits: Limits | None = None) -> DocumentEvent:
    """Decode and validate one document event, or raise EventError with the reason."""
    return _parse(DocumentEvent, raw, limits)


def document_from(data: dict[str, Any], limits: Limits | None = None) -> DocumentEvent:
    """Validate one document event already parsed from JSON, or raise EventError."""
    try:
        return DocumentEvent.model_validate(data, context={"limits": limits or Limits()})
    except ValidationError as exc:
        raise EventError(_reason(exc)) from exc


# -- queries and answers ---------------------------------------------------------------------


class ChatTurn(BaseModel):
    """One earlier message of a conversation (an OpenAI-style chat), passed to the generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=16_384)


class QueryEvent(_Event):
    """A question for the query consumers; answers go to `reply_topic` keyed by `query_id`."""

    query_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    tenant: Tenant
    text: str = Field(min_length=1, max_length=4096)
    mode: Literal["search", "answer"] = "answer"
    k: int = Field(default=5, ge=1, le=100)
    token: str | None = Field(default=None, max_length=4096, description="Freshness token.")
    reply_topic: str | None = Field(default=None, max_length=249)
    history: list[ChatTurn] = Field(
        default_factory=list, max_length=64, description="Earlier turns of a chat, oldest first."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Longest answer in tokens (the server's cap still holds)."
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature; none or 0: greedy."
    )
    adapter: str | None = Field(
        default=None,
        max_length=128,
        description="Adapter to answer with, by name (<tenant or _house>/<version>); none: the "
        "tenant's own.",
    )
    ttl_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Seconds the asker waits, from the broker's timestamp of this event.",
    )
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Hit(BaseModel):
    """One retrieved chunk: what a search returns, an answer cites and a notification carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    doc_id: str
    version: int
    chunk_id: str
    score: float
    text: str
    section: str = ""
    metadata: dict[str, Scalar] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class IndexedDocument(BaseModel):
    """A document as the index holds it now: live version, metadata and chunk texts in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    doc_id: str
    version: int
    text: str = Field(description="The live chunks' texts in document order, blank-line joined.")
    chunk_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Scalar] = Field(default_factory=dict)


class AnswerEvent(_Event):
    """One piece of a streamed answer: `hits`, then `token` batches, then `done` (or `error`)."""

    query_id: str
    tenant: Tenant
    kind: Literal["hits", "token", "done", "error"]
    seq: int = Field(ge=0, description="Position in this answer's stream.")
    hits: list[Hit] | None = None
    text: str | None = None
    adapter_version: str | None = None
    timing: dict[str, float] | None = None
    usage: dict[str, int] | None = Field(
        default=None, description="prompt_tokens and completion_tokens of the answer (done)."
    )
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="Why the answer ended (done): its end, or the token limit."
    )
    error: str | None = None


class ExampleEvent(_Event):
    """A curated style/behavior example or user feedback for the next adapter refresh."""

    example_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    tenant: Tenant
    prompt: str = Field(min_length=1, max_length=16_384)
    response: str = Field(min_length=1, max_length=16_384)
    weight: float = Field(default=1.0, ge=0.0, le=100.0)
    source: str = Field(default="curated", max_length=MAX_SOURCE_CHARS)
    shared: bool = Field(
        default=False, description="Teaches the shared house-style adapter, not the tenant's."
    )
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def scope(self) -> str:
        """Whose adapter this example trains: its tenant's, or the house adapter if shared."""
        return HOUSE if self.shared else self.tenant


class AdapterAnnouncement(_Event):
    """The adapter version one scope's queries should get (compacted topic, a key per scope)."""

    tenant: AdapterScope = Field(description='A tenant, or "_house" for the shared adapter.')
    version: str | None = Field(description="Adapter version, or None: no adapter of its own.")
    uri: str | None = Field(default=None, description="Informational; never loaded from.")
    base_model: str
    manifest_sha256: str | None = Field(
        default=None, description="sha256 of the version's manifest record on the same topic."
    )
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ChangeEvent(_Event):
    """What one applied document event changed in the index (published by the indexer).

    Standing queries and drift accounting follow these instead of re-reading the index.
    """

    tenant: Tenant
    doc_id: str
    op: Literal["added", "changed", "deleted"]
    version: int
    previous_version: int | None = None
    added_chunk_ids: list[str] = Field(default_factory=list)
    removed_chunk_ids: list[str] = Field(default_factory=list)
    kept_chunks: int = 0
    # Sum of the added chunks' (normalised) embeddings: lets drift track the corpus centroid.
    embedding_sum: list[float] | None = None
    terms: list[str] = Field(default_factory=list, description="Distinct words of added chunks.")
    event_ts: datetime | None = Field(default=None, description="ts of the source event.")
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Subscription(_Event):
    """A standing query: notify when indexed chunks of `tenant` come to match `query` or go."""

    subscription_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$"
    )
    tenant: Tenant
    query: str = Field(min_length=1, max_length=4096)
    threshold: float = Field(ge=-1.0, le=1.0, description="Cosine similarity needed to match.")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Notification(_Event):
    """A document change that matters to a standing query: new matches or lost matches."""

    notification_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    subscription_id: str
    tenant: Tenant
    doc_id: str
    op: Literal["added", "changed", "deleted"]
    version: int
    matched: list[Hit] = Field(default_factory=list, description="Chunks that now match.")
    removed: list[Hit] = Field(default_factory=list, description="Matches that are gone.")
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))


def parse_query(raw: bytes | None) -> QueryEvent:
    return _parse(QueryEvent, raw, None)


def parse_example(raw: bytes | None) -> ExampleEvent:
    return _parse(ExampleEvent, raw, None)


def _parse(model: type[_Event], raw: bytes | None, limits: Limits | None) -> Any:
    if raw is None:
        raise EventError("empty message (null value)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EventError(f"not a JSON object but {type(data).__name__}")
    try:
        return model.model_validate(data, context={"limits": limits or Limits()})
    except ValidationError as exc:
        raise EventError(_reason(exc)) from exc


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
