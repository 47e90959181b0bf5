"""Wire formats of document changes besides headwater's own JSON: CloudEvents 1.0 and Debezium.

Each format maps its input to a `Change`, and a `Change` becomes a validated `DocumentEvent`
once the caller has decided the tenant and, for sources without one, the version. The indexer's
intake (Kafka records) and the gateway (`POST /v1/events`) share these mappings, so an event is
read the same way whichever door it came through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from headwater.errors import EventError
from headwater.events import DocumentEvent, Limits, Scalar

MAX_EVENT_ID = 64


@dataclass(frozen=True)
class Change:
    """One document change read from a foreign format; tenant and version when it names them."""

    op: Literal["upsert", "delete"]
    doc_id: str
    text: str | None = None
    metadata: dict[str, Scalar] = field(default_factory=dict)
    version: int | None = None
    tenant: str | None = None
    event_id: str | None = None
    source: str = "api"
    ts: datetime | None = None

    def event(self, *, tenant: str, version: int | None, limits: Limits) -> DocumentEvent:
        """The validated document event; EventError says why not."""
        data: dict[str, Any] = {
            "tenant": tenant, "doc_id": self.doc_id, "op": self.op, "version": version,
            "text": self.text if self.op == "upsert" else None, "metadata": self.metadata,
            "source": self.source,
        }  # fmt: skip
        if self.event_id:
            data["event_id"] = self.event_id
        if self.ts is not None:
            data["ts"] = self.ts
        try:
            return DocumentEvent.model_validate(data, context={"limits": limits})
        except ValidationError as exc:
            raise EventError(_one_line(exc)) from exc


def event_id(raw: str) -> str:
    """A foreign event id as a DocumentEvent id: kept when short enough, else its digest."""
    return raw if 0 < len(raw) <= MAX_EVENT_ID else hashlib.sha256(raw.encode()).hexdigest()


def json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """`raw` parsed as one JSON object; EventError otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EventError(f"{what} is not a JSON object but {type(data).__name__}")
    return data


def version_of(value: object, what: str) -> int | None:
    """A source version: an integer, a decimal string, or an ISO-8601 time (in microseconds)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EventError(f"{what} must be an integer or a time, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise EventError(f"{what} {value[:40]!r} is neither an integer nor a time") from exc
        number = int(when.timestamp() * 1_000_000)
    else:
        raise EventError(f"{what} must be an integer or a time, not {type(value).__name__}")
    if number < 0:
        raise EventError(f"{what} must not be negative")
    return number


def scalar_metadata(values: dict[str, Any], what: str) -> dict[str, Scalar]:
    """Metadata of scalars: nested values are kept as their JSON text."""
    if not isinstance(values, dict):
        raise EventError(f"{what} must be an object, not {type(values).__name__}")
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if value is None or isinstance(value, str | int | float | bool):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, ensure_ascii=False, default=str)
    return out


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)
