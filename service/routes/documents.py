"""Reading documents back: `GET /v1/documents?id=…` and `GET /v1/documents/{doc_id}`.

What the index holds now for the tenant (live version, metadata, the chunks' text), optionally
after waiting for a freshness token; LangChain's `get_by_ids` reads through here.
"""

# No `from __future__ import annotations`: FastAPI resolves the annotations at runtime.
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query

MAX_IDS = 100


def router(
    Tenant: Any,  # the gateway's dependency type, used as an annotation below
    *,
    searcher: Any,
    fail: Callable[[Exception], HTTPException],
) -> APIRouter:
    api = APIRouter(tags=["documents"])

    def read(ids: list[str], tenant: str, token: str | None) -> list[dict[str, Any]]:
        try:
            docs = searcher.documents(ids, tenant=tenant, token=token or None)
        except Exception as exc:
            raise fail(exc) from exc
        return [d.model_dump() for d in docs]

    @api.get("/v1/documents", summary="Documents by id, as indexed now (absent ones left out)")
    def get_documents(
        tenant: Tenant,
        ids: Annotated[list[str], Query(alias="id", min_length=1, max_length=MAX_IDS)],
        token: Annotated[str | None, Query(max_length=4096)] = None,
    ) -> dict[str, Any]:
        return {"documents": read(ids, tenant, token), "tenant": tenant}

    @api.get("/v1/documents/{doc_id:path}", summary="One document, as indexed now")
    def get_document(
        doc_id: Annotated[str, Path(min_length=1, max_length=512)],
        tenant: Tenant,
        token: Annotated[str | None, Query(max_length=4096)] = None,
    ) -> dict[str, Any]:
        docs = read([doc_id], tenant, token)
        if not docs:
            raise HTTPException(404, f"no document {doc_id[:80]!r}")
        return docs[0]

    return api
