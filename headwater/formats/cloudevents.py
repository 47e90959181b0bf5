"""CloudEvents 1.0 as document changes: structured and binary mode, on Kafka and over HTTP.

Mapping (the README's "Use it from… CloudEvents" says the same):

- `subject` (required) → `doc_id`;
- `type` → `op`: its last dot-separated word `upsert`, `create(d)`, `update(d)`, `put` or
  `changed` upserts; `delete(d)` or `remove(d)` deletes;
- `id` → `event_id` (its digest when longer than 64 characters); `source` → `source`
  (`ce:` + source); `time` → `ts`;
- `data` → a JSON object `{"text", "metadata", "version"}` or a JSON string; `text/*` data is
  the text;
- extension `version` → `version` (over `data.version`); with neither the log orders it;
- extension `tenant` → the tenant on Kafka (default: the default tenant); over HTTP the tenant is
  the request's, which the extension, when present, must match.

Structured mode is a JSON object with the attributes, `data` or `data_base64`; binary mode
carries the attributes in `ce_*` Kafka headers (`ce-*` HTTP headers, percent-encoded) and the
data as the record value (body), its media type in `content-type`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from headwater.errors import EventError
from headwater.formats import Change, event_id, json_object, scalar_metadata, version_of

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
UPSERT_WORDS = frozenset({"upsert", "upserted", "create", "created", "update", "updated", "put",
                          "changed"})  # fmt: skip
DELETE_WORDS = frozenset({"delete", "deleted", "remove", "removed"})
MAX_BATCH = 1000


def media_type(content_type: str | bytes | None) -> str:
    """`application/json; charset=utf-8` → `application/json`."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return (content_type or "").split(";")[0].strip().lower()


# -- Kafka -----------------------------------------------------------------------------------


def kafka_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """A Kafka record's headers as text, names lowercased (the last of a repeated name wins)."""
    out = {}
    for name, value in headers or ():
        out[name.lower()] = (value or b"").decode("utf-8", "replace")
    return out


def is_binary(headers: Mapping[str, str]) -> bool:
    """Whether a Kafka record is a binary-mode CloudEvent (structured ones say it in the value)."""
    return "ce_specversion" in headers


def is_structured(data: Mapping[str, Any]) -> bool:
    """Whether a parsed JSON record value is a structured-mode CloudEvent."""
    return "specversion" in data


def from_kafka_binary(headers: Mapping[str, str], value: bytes | None) -> Change:
    """The change a binary-mode CloudEvents Kafka record carries."""
    attrs = {k.removeprefix("ce_"): v for k, v in headers.items() if k.startswith("ce_")}
    if "content-type" in headers:
        attrs["datacontenttype"] = headers["content-type"]
    return _binary(attrs, value)


# -- HTTP ------------------------------------------------------------------------------------


def from_http(headers: Mapping[str, str], body: bytes) -> list[Change]:
    """The changes of a `POST /v1/events` request: binary, structured or batched mode."""
    lower = {k.lower(): v for k, v in headers.items()}
    kind = media_type(lower.get("content-type"))
    if "ce-specversion" in lower:
        attrs = {k[3:]: unquote(v) for k, v in lower.items() if k.startswith("ce-")}
        if "content-type" in lower:
            attrs["datacontenttype"] = lower["content-type"]
        return [_binary(attrs, body)]
    if kind == BATCH:
        try:
            items = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EventError(f"the batch is not JSON: {exc}") from exc
        if not isinstance(items, list):
            raise EventError("a CloudEvents batch must be a JSON array")
        if len(items) > MAX_BATCH:
            raise EventError(f"a batch holds at most {MAX_BATCH} events, not {len(items)}")
        return [structured(item, f"event {i}") for i, item in enumerate(items)]
    if kind in (STRUCTURED, "application/json", ""):
        return [from_structured(body)]
    raise EventError(
        f"unsupported content-type {kind!r}: send {STRUCTURED}, {BATCH}, or binary mode "
        "(ce-specversion, ce-id, ce-source, ce-type, ce-subject headers)"
    )


# -- the mapping -----------------------------------------------------------------------------


def from_structured(raw: bytes) -> Change:
    return structured(json_object(raw, "the CloudEvent"))


def structured(item: object, what: str = "the CloudEvent") -> Change:
    """The change of one structured-mode event, already parsed from JSON."""
    if not isinstance(item, dict):
        raise EventError(f"{what} is not a JSON object")
    attrs = {k: v for k, v in item.items() if k not in ("data", "data_base64")}
    _check_attributes(attrs)
    if "data_base64" in item:
        try:
            raw = base64.b64decode(item["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise EventError(f"{what}: data_base64 is not base64") from exc
        return _change(attrs, _bytes_data(raw, attrs.get("datacontenttype")))
    kind = media_type(attrs.get("datacontenttype"))
    data = item.get("data")
    if kind.startswith("text/") and data is not None and not isinstance(data, str):
        raise EventError(f"{what}: {kind} data must be a string")
    return _change(attrs, data)


def _binary(attrs: dict[str, Any], value: bytes | None) -> Change:
    _check_attributes(attrs)  # before the data: a broken envelope says so, not "bad data"
    data = None if value is None else _bytes_data(value, attrs.get("datacontenttype"))
    return _change(attrs, data)


def _bytes_data(raw: bytes, content_type: object) -> Any:
    kind = media_type(content_type if isinstance(content_type, str | bytes) else None)
    if kind.startswith("text/"):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventError(f"{kind} data is not UTF-8") from exc
    if kind in ("", "application/json") or kind.endswith("+json"):
        try:
            return json.loads(raw) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EventError(f"the event's data is not JSON: {exc}") from exc
    raise EventError(f"unsupported datacontenttype {kind!r} (use application/json or text/*)")


def _check_attributes(attrs: dict[str, Any]) -> None:
    if str(attrs.get("specversion", "")) != "1.0":
        raise EventError(f"specversion must be '1.0', not {str(attrs.get('specversion'))[:20]!r}")
    for name in ("id", "source", "type", "subject"):
        value = attrs.get(name)
        if not isinstance(value, str) or not value:
            hint = " (the document id)" if name == "subject" else ""
            raise EventError(f"the CloudEvent has no {name}{hint}")


def _change(attrs: dict[str, Any], data: Any) -> Change:
    op = _op(attrs["type"])
    text, metadata, version = None, {}, None
    if isinstance(data, dict):
        text = data.get("text")
        metadata = scalar_metadata(data.get("metadata") or {}, "data.metadata")
        version = version_of(data.get("version"), "data.version")
    elif isinstance(data, str):
        text = data
    elif data is not None:
        raise EventError(f"data must be an object or a string, not {type(data).__name__}")
    if op == "upsert" and not isinstance(text, str):
        raise EventError("an upsert needs data.text (a string) or text data")
    extension = version_of(attrs.get("version"), "the version extension")
    tenant = attrs.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise EventError("the tenant extension must be a string")
    return Change(
        op=op,
        doc_id=attrs["subject"],
        text=text if op == "upsert" else None,
        metadata=metadata,
        version=extension if extension is not None else version,
        tenant=tenant,
        event_id=event_id(attrs["id"]),
        source=f"ce:{attrs['source']}"[:256],
        ts=_time(attrs.get("time")),
    )


def _op(kind: str) -> str:
    word = kind.rsplit(".", 1)[-1].lower()
    if word in UPSERT_WORDS:
        return "upsert"
    if word in DELETE_WORDS:
        return "delete"
    raise EventError(
        f"type {kind[:120]!r} is neither an upsert nor a delete (its last word must be one of "
        f"{', '.join(sorted(UPSERT_WORDS | DELETE_WORDS))})"
    )


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError("time must be an RFC 3339 string")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise EventError(f"time {value[:40]!r} is not RFC 3339") from exc
