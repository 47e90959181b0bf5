"""Debezium change events (a table of documents in a database) as document changes.

A Debezium topic carries one record per row change: the key is the row's primary key, the value
the envelope `{before, after, source, op, ts_ms}` (wrapped in `{"schema", "payload"}` when the
JSON converter embeds schemas). `op` c (create), r (snapshot read) and u (update) upsert the
row's `after`; d deletes the row of `before` (or of the key, when the table's replica identity
leaves `before` empty); a tombstone (null value, sent after each delete for log compaction)
deletes the row of the key too. The columns that hold the document id, text, version and
tenant are configured (`HEADWATER_DEBEZIUM_COLUMNS`), and so are the columns copied into the
metadata (`HEADWATER_DEBEZIUM_METADATA_COLUMNS`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from headwater.errors import EventError, NoChange
from headwater.formats import Change, json_object, scalar_metadata, version_of

UPSERT_OPS = {"c", "r", "u"}


@dataclass(frozen=True)
class Columns:
    """Which row columns make a document."""

    doc_id: str = "id"
    text: str = "text"
    version: str | None = None
    tenant: str | None = None
    metadata: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> Columns:
        cols = settings.debezium_columns
        return cls(
            doc_id=cols["doc_id"],
            text=cols["text"],
            version=cols.get("version"),
            tenant=cols.get("tenant"),
            metadata=tuple(settings.debezium_metadata_columns),
        )


def from_record(key: bytes | None, value: bytes | None, columns: Columns) -> Change:
    """The change one Debezium record asks for; EventError (bad) or NoChange (nothing to do)."""
    if value is None:
        row = _key_row(key, columns)
        if row is None:
            raise NoChange("a tombstone whose key names no document id column")
        return _delete(row, columns, "tombstone")
    envelope = _payload(json_object(value, "the Debezium change event"))
    op = envelope.get("op")
    source = envelope.get("source") if isinstance(envelope.get("source"), dict) else {}
    origin = _origin(source)
    if op in UPSERT_OPS:
        after = envelope.get("after")
        if not isinstance(after, dict):
            raise EventError(f"a Debezium {op!r} event without an 'after' row")
        return _upsert(after, columns, origin)
    if op == "d":
        before = envelope.get("before")
        row = before if isinstance(before, dict) and columns.doc_id in before else None
        row = row or _key_row(key, columns)
        if row is None:
            raise EventError(
                "a Debezium delete names no document: neither 'before' nor the key has column "
                f"{columns.doc_id!r} (set the table's REPLICA IDENTITY FULL)"
            )
        return _delete(row, columns, origin)
    if op == "t":
        raise EventError("a Debezium truncate is not applied: delete the rows instead")
    if op == "m":
        raise NoChange("a Debezium logical-decoding message changes no row")
    raise EventError(f"not a Debezium change event (op {str(op)[:10]!r})")


def _payload(data: dict[str, Any]) -> dict[str, Any]:
    # The JSON converter with schemas.enable=true wraps the envelope; without, it is bare.
    if "payload" in data and "schema" in data:
        payload = data["payload"]
        if not isinstance(payload, dict):
            raise EventError("the Debezium payload is not an object")
        return payload
    return data


def _key_row(key: bytes | None, columns: Columns) -> dict[str, Any] | None:
    """The key's columns, when the key is a JSON object holding the document id column."""
    if key is None:
        return None
    try:
        data = json.loads(key)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict):
        data = _payload(data)
    return data if isinstance(data, dict) and columns.doc_id in data else None


def _doc_id(row: Mapping[str, Any], columns: Columns) -> str:
    value = row.get(columns.doc_id)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise EventError(f"column {columns.doc_id!r} (the document id) is missing or not text")
    return str(value)


def _tenant(row: Mapping[str, Any], columns: Columns) -> str | None:
    if columns.tenant is None:
        return None
    value = row.get(columns.tenant)
    if not isinstance(value, str):
        raise EventError(f"column {columns.tenant!r} (the tenant) is missing or not text")
    return value


def _upsert(row: Mapping[str, Any], columns: Columns, origin: str) -> Change:
    text = row.get(columns.text)
    if not isinstance(text, str):
        raise EventError(f"column {columns.text!r} (the text) is missing or not text")
    return Change(
        op="upsert",
        doc_id=_doc_id(row, columns),
        text=text,
        metadata=scalar_metadata(_pick(row, columns.metadata), "metadata columns"),
        version=_version(row, columns),
        tenant=_tenant(row, columns),
        source=origin,
    )


def _delete(row: Mapping[str, Any], columns: Columns, origin: str) -> Change:
    return Change(
        op="delete",
        doc_id=_doc_id(row, columns),
        version=_version(row, columns) if columns.version in row else None,
        tenant=_tenant(row, columns),
        source=origin,
    )


def _version(row: Mapping[str, Any], columns: Columns) -> int | None:
    if columns.version is None:
        return None
    version = version_of(row.get(columns.version), f"column {columns.version!r}")
    if version is None:
        raise EventError(f"column {columns.version!r} (the version) is missing")
    return version


def _pick(row: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: row[name] for name in names if name in row}


def _origin(source: Mapping[str, Any]) -> str:
    parts = [str(source[k]) for k in ("name", "schema", "table") if source.get(k)]
    return ("debezium:" + ".".join(parts))[:256] if parts else "debezium"
