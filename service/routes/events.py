"""`POST /v1/events`: CloudEvents over HTTP (binary, structured or batched) become documents.

The mapping is the one the indexer applies on Kafka (`headwater.formats.cloudevents`); the
events are validated, published to the documents topic as headwater events, and answered with a
freshness token. The tenant is the request's (its bearer token or X-Tenant), never the
payload's: an event whose `tenant` extension names another tenant is refused with 403.
"""

# No `from __future__ import annotations`: FastAPI resolves the annotations at runtime.
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from headwater.errors import Forbidden
from headwater.formats import cloudevents
from headwater.runtime.clients import max_record_bytes
from headwater.settings import Settings


def router(
    settings: Settings,
    Tenant: Any,  # the gateway's dependency type, used as an annotation below
    *,
    publisher: Any,
    fail: Callable[[Exception], HTTPException],
) -> APIRouter:
    api = APIRouter(tags=["documents"])
    limit = max_record_bytes(settings)

    @api.post(
        "/v1/events",
        summary="Publish document changes as CloudEvents (binary, structured or batch mode)",
    )
    async def post_events(request: Request, tenant: Tenant) -> dict[str, Any]:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HTTPException(413, f"the request is larger than {limit} bytes")
        try:
            changes = cloudevents.from_http(dict(request.headers), bytes(body))
            for change in changes:
                if change.tenant is not None and change.tenant != tenant:
                    raise Forbidden(f"an event's tenant {change.tenant[:64]!r} is not {tenant!r}")
            token = await run_in_threadpool(_publish, publisher, changes, tenant)
        except Exception as exc:
            raise fail(exc) from exc
        return {"token": str(token), "tenant": tenant, "accepted": len(changes),
                "doc_ids": [c.doc_id for c in changes]}  # fmt: skip

    return api


def _publish(publisher: Any, changes: list[Any], tenant: str) -> Any:
    """Validate every change first (nothing is sent when one is bad), then publish them all."""
    events = []
    for c in changes:
        event = publisher.build(
            c.op, c.doc_id, text=c.text, tenant=tenant, metadata=c.metadata, version=c.version,
            source=c.source, ts=c.ts,
        )  # fmt: skip
        events.append(event.model_copy(update={"event_id": c.event_id}) if c.event_id else event)
    return publisher.publish_many(events)
