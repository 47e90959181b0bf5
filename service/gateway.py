"""The HTTP API: publish documents, search, ask (Server-Sent Events), standing queries, metrics.

`create_app` takes every dependency explicitly (nothing global besides prometheus' registry), so
tests and `headwater up` build it around in-process objects; `build_app` wires the real ones.
Errors map to HTTP statuses by their kind (`headwater.errors`), never by name; a body says what
failed in one line (`public_message`): a service's failure by kind only, never an address or a
Milvus or Kafka message (those go to the log). Concurrent searches, answer streams and
notification streams are bounded per tenant and overall (`service.admission`): over a bound a
request gets 429 with Retry-After at once, and `/healthz` never waits behind them.

The adapter routes (examples, drift, train, list, promote, rollback) live in
`service.routes.adapters` on this module's tenant dependency.

Tenancy is decided here, never by the caller's data: a token from `api_tokens` is bound to one
tenant (an `X-Tenant` naming another is refused); the single `api_token` (or no auth at all)
picks the tenant with `X-Tenant`, default `default_tenant`. Searches filter by that tenant and
documents are published under it.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations at runtime,
# and some name a dependency local to create_app.
import json
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from headwater import __version__
from headwater.errors import (
    Busy,
    Forbidden,
    InvalidInput,
    Timeout,
    Unavailable,
    public_message,
)
from headwater.events import TENANT_RE, AnswerEvent, Scalar, check_doc_id
from headwater.health import Health
from headwater.probes import bearer_ok, guard_exposure, probe_body
from headwater.runtime.retry import one_line
from headwater.settings import Settings
from headwater.versions import INT64_MAX
from service.admission import Admission
from service.routes import documents as documents_routes
from service.routes import events as events_routes
from service.routes import openai_compat as openai_routes
from service.routes.adapters import AdapterAdmin, adapter_router

log = logging.getLogger(__name__)

STREAM_WAIT_S = 1.0  # how often a stream's worker thread checks for a gone client
EVENT_ID = re.compile(r"[0-9]{1,19}")  # a notification's offset, as its SSE event id


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(_Body):
    doc_id: str = Field(min_length=1, max_length=512)
    text: str
    metadata: dict[str, Scalar] | None = None
    version: int | None = Field(
        default=None, ge=0, le=INT64_MAX, description="The source's own version, if it has one."
    )


class AskIn(_Body):
    question: str = Field(min_length=1, max_length=4096)
    k: int = Field(default=5, ge=1, le=100)
    token: str | None = Field(default=None, max_length=4096)
    mode: Literal["answer", "search"] = "answer"


class SubscriptionIn(_Body):
    query: str = Field(min_length=1, max_length=4096)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)


# -- errors ------------------------------------------------------------------------------------


def _status_of(exc: Exception) -> int:
    """HTTP status of an error raised by a collaborator, by its kind (see headwater.errors)."""
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, Busy):
        return 429
    if isinstance(exc, Unavailable):
        return 503
    if isinstance(exc, Timeout):
        return 504
    return 500


def _fail(exc: Exception) -> HTTPException:
    status = _status_of(exc)
    if status == 500:
        log.exception("request failed")
    elif status >= 503:
        log.warning("request failed (%d): %s", status, one_line(exc))
    headers = None
    if isinstance(exc, Busy):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return HTTPException(status, detail=public_message(exc), headers=headers)


# -- the app -----------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    searcher: Any,
    publisher: Any,
    query_client: Any,
    subscriptions: Any = None,
    adapters: Any = None,
    registry: CollectorRegistry = REGISTRY,
    on_shutdown: list[Callable[[], None]] | None = None,
    health: Health | None = None,
    embedder: Any = None,
    models: Callable[[str], list[str]] | None = None,
) -> FastAPI:
    """The API around these collaborators (Searcher, DocumentPublisher, QueryClient, ...).

    `health` answers /healthz, /readyz and /livez (Kafka and Milvus reachable, checked in the
    background); without one they only say the process answers. `embedder` serves
    `/v1/embeddings` (default: the searcher's); `models(tenant)` lists the model ids of
    `/v1/models` (default: the generator's name).
    """
    closers = list(on_shutdown or [])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for close in closers:
            try:
                close()
            except Exception as exc:
                log.warning("shutdown: %s", exc)

    app = FastAPI(
        title="headwater",
        version=__version__,
        description="Fresh knowledge for LLM applications: documents in, cited answers out.",
        lifespan=lifespan,
    )
    # Tokens compared as bytes: compare_digest refuses str with non-ASCII characters.
    bound = {tok.encode(): tenant for tok, tenant in settings.api_tokens.items()}
    admin = settings.api_token.get_secret_value() if settings.api_token else None
    auth_on = bool(bound) or bool(admin)
    searches = Admission("searches", settings.search_limit, settings.tenant_search_limit)
    asks = Admission("answer streams", settings.ask_limit, settings.tenant_ask_limit)
    streams = Admission("notification streams", settings.stream_limit,
                        settings.tenant_stream_limit)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for err in errors[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
        return JSONResponse(
            status_code=422,
            content={
                "detail": "; ".join(parts),
                "errors": json.loads(json.dumps(errors, default=str)),
            },
        )

    def tenant_of(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_tenant: Annotated[str | None, Header()] = None,
    ) -> str:
        """The request's tenant, from its bearer token or X-Tenant; errors are 401/403."""
        fixed = None
        if auth_on:
            scheme, _, given = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise HTTPException(
                    401,
                    "missing bearer token (Authorization: Bearer <token>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            # Starlette decodes header bytes as latin-1: encoding back gives the bytes sent.
            offered = given.strip().encode("latin-1", "replace")
            fixed = next(
                (t for tok, t in bound.items() if secrets.compare_digest(tok, offered)), None
            )
            if fixed is None and not (admin and secrets.compare_digest(admin.encode(), offered)):
                raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        if fixed is not None:
            if x_tenant is not None and x_tenant != fixed:
                raise HTTPException(403, f"this token may not act for tenant {x_tenant!r}")
            tenant = fixed
        else:
            tenant = settings.default_tenant if x_tenant is None else x_tenant
        if not re.fullmatch(TENANT_RE, tenant) or not settings.tenant_known(tenant):
            raise HTTPException(403, f"unknown tenant {tenant[:64]!r}")
        request.state.token_bound = fixed is not None  # may it act beyond its tenant? no
        return tenant

    Tenant = Annotated[str, Depends(tenant_of)]

    # -- documents ---------------------------------------------------------------------------
    @app.post("/v1/documents", tags=["documents"], summary="Publish (upsert) a document")
    def put_document(doc: DocumentIn, tenant: Tenant) -> dict[str, str]:
        try:
            token = publisher.upsert(
                doc.doc_id, doc.text, tenant=tenant, metadata=doc.metadata, version=doc.version
            )
        except Exception as exc:
            raise _fail(exc) from exc
        return {"token": str(token), "doc_id": check_doc_id(doc.doc_id), "tenant": tenant}

    @app.delete("/v1/documents/{doc_id:path}", tags=["documents"], summary="Delete a document")
    def delete_document(
        doc_id: Annotated[str, Path(min_length=1, max_length=512)],
        tenant: Tenant,
        version: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
    ) -> dict[str, str]:
        try:
            token = publisher.delete(doc_id, tenant=tenant, version=version)
        except Exception as exc:
            raise _fail(exc) from exc
        return {"token": str(token), "doc_id": check_doc_id(doc_id), "tenant": tenant}

    # -- search and answers ------------------------------------------------------------------
    @app.get("/v1/search", tags=["queries"], summary="Retrieve passages (no generation)")
    def search(
        tenant: Tenant,
        q: Annotated[str, Query(min_length=1, max_length=4096)],
        k: Annotated[int, Query(ge=1, le=100)] = 5,
        token: Annotated[str | None, Query(max_length=4096)] = None,
    ) -> dict[str, Any]:
        try:
            if token and hasattr(searcher, "check_token"):
                # Before taking a slot: a hopeless token is refused at once, never queued.
                searcher.check_token(token)
            with searches.slot(tenant):
                hits = searcher.search(q, tenant=tenant, k=k, token=token or None)
        except Exception as exc:
            raise _fail(exc) from exc
        return {"hits": [_hit_dict(h) for h in hits], "tenant": tenant}

    @app.post(
        "/v1/ask",
        tags=["queries"],
        summary="Ask a question; the answer streams as SSE",
        response_class=EventSourceResponse,
    )
    async def ask(body: AskIn, tenant: Tenant) -> EventSourceResponse:
        try:
            slot = asks.acquire(tenant)
        except Busy as exc:
            raise _fail(exc) from exc
        try:
            stream = await run_in_threadpool(
                lambda: query_client.ask(
                    body.question, tenant=tenant, mode=body.mode, k=body.k, token=body.token
                )
            )
        except Exception as exc:
            slot.release()
            raise _fail(exc) from exc

        def finish() -> None:
            stream.close()  # before its end: the answerers stop generating it
            slot.release()

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                while not stream.finished:
                    try:
                        event = await anyio.to_thread.run_sync(stream.get, STREAM_WAIT_S)
                    except Exception as exc:  # timeout or reader failure: tell the client
                        failed = AnswerEvent(
                            query_id=stream.query_id,
                            tenant=tenant,
                            kind="error",
                            seq=0,
                            error=public_message(exc),
                        )
                        yield {"event": "error", "data": failed.model_dump_json()}
                        return
                    if event is not None:
                        yield {
                            "event": event.kind,
                            "data": event.model_dump_json(),
                            "id": str(event.seq),
                        }
            finally:
                finish()

        return EventSourceResponse(
            events(), headers={"X-Query-Id": stream.query_id}, background=BackgroundTask(finish)
        )

    # -- standing queries --------------------------------------------------------------------
    def _subs() -> Any:
        if subscriptions is None:
            raise HTTPException(501, "standing queries are not enabled on this server")
        return subscriptions

    @app.post("/v1/subscriptions", tags=["subscriptions"], summary="Register a standing query")
    def subscribe(body: SubscriptionIn, tenant: Tenant) -> dict[str, Any]:
        subs = _subs()
        try:
            sub = subs.subscribe(body.query, tenant=tenant, threshold=body.threshold)
        except Exception as exc:
            raise _fail(exc) from exc
        return {
            "subscription_id": sub.subscription_id,
            "tenant": sub.tenant,
            "threshold": sub.threshold,
            "created": sub.created.isoformat(),
        }

    def _own_subscription(subscription_id: str, tenant: str) -> Any:
        subs = _subs()
        if not re.fullmatch(r"[0-9a-f]{32}", subscription_id):
            raise HTTPException(404, f"no subscription {subscription_id[:40]!r}")
        try:
            sub = subs.get(subscription_id)
        except Exception as exc:
            raise _fail(exc) from exc
        # Another tenant's subscription is reported as missing: ids leak nothing.
        if sub is None or sub.tenant != tenant:
            raise HTTPException(404, f"no subscription {subscription_id!r}")
        return sub

    @app.delete("/v1/subscriptions/{subscription_id}", tags=["subscriptions"])
    def unsubscribe(subscription_id: str, tenant: Tenant) -> dict[str, str]:
        _own_subscription(subscription_id, tenant)
        try:
            _subs().cancel(subscription_id)
        except Exception as exc:
            raise _fail(exc) from exc
        return {"cancelled": subscription_id}

    @app.get(
        "/v1/subscriptions/{subscription_id}/events",
        tags=["subscriptions"],
        summary="Notifications of a standing query (SSE, from its creation)",
        response_class=EventSourceResponse,
    )
    async def notifications(
        subscription_id: str,
        tenant: Tenant,
        last_event_id: Annotated[str | None, Header()] = None,
        limit: Annotated[int | None, Query(ge=1, description="Close after this many.")] = None,
        idle: Annotated[float | None, Query(gt=0, description="Close after idle seconds.")] = None,
    ) -> EventSourceResponse:
        if last_event_id is not None and not EVENT_ID.fullmatch(last_event_id):
            raise HTTPException(422, "Last-Event-ID must be the id of a notification (digits)")
        after = None if last_event_id is None else int(last_event_id)
        try:
            slot = streams.acquire(tenant)
        except Busy as exc:
            raise _fail(exc) from exc
        try:
            sub = await run_in_threadpool(_own_subscription, subscription_id, tenant)
            stream = await run_in_threadpool(lambda: _subs().notifications(sub, after_offset=after))
        except HTTPException:
            slot.release()
            raise
        except Exception as exc:
            slot.release()
            raise _fail(exc) from exc

        def finish() -> None:
            stream.close()
            slot.release()

        async def events() -> AsyncIterator[dict[str, str]]:
            sent, quiet = 0, 0.0
            try:
                while limit is None or sent < limit:
                    batch = await anyio.to_thread.run_sync(stream.poll, STREAM_WAIT_S)
                    quiet = 0.0 if batch else quiet + STREAM_WAIT_S
                    for offset, note in batch:
                        yield {
                            "event": "notification",
                            "data": note.model_dump_json(),
                            "id": str(offset),
                        }
                        sent += 1
                        if limit is not None and sent >= limit:
                            return
                    if idle is not None and quiet >= idle:
                        return
            finally:
                await anyio.to_thread.run_sync(finish)

        return EventSourceResponse(events(), background=BackgroundTask(finish))

    # -- the ecosystem's protocols (service/routes) -------------------------------------------
    app.include_router(documents_routes.router(Tenant, searcher=searcher, fail=_fail))
    app.include_router(events_routes.router(settings, Tenant, publisher=publisher, fail=_fail))
    app.include_router(
        openai_routes.router(
            settings, Tenant, query_client=query_client, fail=_fail,
            embedder=embedder if embedder is not None else getattr(searcher, "embedder", None),
            models=models or (lambda tenant: [settings.generator or "extractive"]), asks=asks,
        )
    )  # fmt: skip
    app.include_router(adapter_router(tenant_of, adapters, _fail))

    # -- operations --------------------------------------------------------------------------
    def _probe(ok: bool, results: dict) -> JSONResponse:
        body = {**probe_body(ok, results), "version": __version__}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/healthz", tags=["operations"], summary="Ready: Kafka and Milvus reachable")
    @app.get("/readyz", tags=["operations"], include_in_schema=False)
    async def healthz() -> JSONResponse:
        # async: answered on the event loop from the last background results, never queued
        # behind worker threads (waiting searches, streams)
        return _probe(*(health.ready() if health is not None else (True, {})))

    @app.get("/livez", tags=["operations"], summary="The process answers")
    def livez() -> JSONResponse:
        return _probe(*(health.live() if health is not None else (True, {})))

    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
        # The metrics token, else (with auth on) the admin token: never a tenant's token.
        if metrics_token is not None or auth_on:
            allowed = [t for t in (metrics_token, admin) if t]
            if not any(bearer_ok(authorization, t) for t in allowed):
                raise HTTPException(401, "metrics need the metrics (or admin) bearer token",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _hit_dict(hit: Any) -> dict[str, Any]:
    if hasattr(hit, "to_dict"):
        return hit.to_dict()
    if hasattr(hit, "model_dump"):
        return hit.model_dump()
    return dict(vars(hit))


# -- wiring and serving ------------------------------------------------------------------------


def build_app(settings: Settings, *, embedder: Any = None, health: Health | None = None) -> FastAPI:
    """The API over the real stack: a Searcher on Milvus, publishers and clients on Kafka."""
    from consumers.replies import QueryClient
    from consumers.subscriptions import SubscriptionClient
    from index.index import open_index
    from producers.publisher import DocumentPublisher

    index = open_index(settings, embedder=embedder)
    publisher = DocumentPublisher(settings)
    query_client = QueryClient(settings)
    subscriptions = SubscriptionClient(settings)
    return create_app(
        settings,
        searcher=index.searcher,
        publisher=publisher,
        query_client=query_client,
        subscriptions=subscriptions,
        adapters=AdapterAdmin(settings),
        on_shutdown=[query_client.close, subscriptions.close, publisher.close, index.close],
        health=health,
        models=openai_routes.adapter_models(settings),
    )


def serve(
    app: FastAPI, settings: Settings, stop: threading.Event | None = None, insecure: bool = False
) -> None:
    """Run `app` with uvicorn on api_host:api_port until `stop` is set (or a signal arrives).

    Beyond loopback it refuses to start without API tokens, unless `insecure`.
    """
    import socket

    import uvicorn

    from headwater.errors import StackError

    guard_api(settings, insecure)
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.api_host, settings.api_port))
    except OSError as exc:
        raise StackError(
            f"cannot serve on {settings.api_host}:{settings.api_port}: {exc.strerror or exc} "
            "(set HEADWATER_API_PORT)"
        ) from exc
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="warning")
    )
    done = threading.Event()

    def watch() -> None:
        # Announce the address only once the socket is bound (a busy port fails instead).
        while not server.started and not done.wait(0.05):
            pass
        if server.started:
            log.info(
                "API listening on http://%s:%d (docs at /docs)",
                _display_host(settings.api_host),
                settings.api_port,
            )
        while stop is not None and not done.is_set():
            if stop.wait(0.2):
                server.should_exit = True
                return

    threading.Thread(target=watch, name="headwater-api-watch", daemon=True).start()
    try:
        server.run()
    finally:
        done.set()


def guard_api(settings: Settings, insecure: bool) -> None:
    authenticated = bool(settings.api_tokens) or settings.api_token is not None
    guard_exposure(settings.api_host, authenticated, "the API",
                   "HEADWATER_API_TOKENS (or HEADWATER_API_TOKEN)", insecure)  # fmt: skip


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
