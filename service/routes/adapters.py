"""HTTP routes for a tenant's style adapter: examples, drift, train, list, promote, rollback.

Every route acts on the request's tenant as the gateway decides it (a bound API token's tenant,
never the caller's data), so a tenant-bound token sees and changes only its own adapters and
examples. The shared house-style adapter (`?house=true`, and `shared` examples) is for callers
not bound to a tenant (the admin token, or a loopback server without tokens): 403 otherwise.

The routes read and write the trainer's registry and requests under `data_dir`: serve them
beside the trainer (`headwater up` does) or on a data dir it shares.
"""

# No `from __future__ import annotations`: FastAPI resolves the route annotations at runtime.
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from headwater.events import HOUSE
from headwater.settings import Settings


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=16_384)
    response: str = Field(min_length=1, max_length=16_384)
    weight: float = Field(default=1.0, ge=0.0, le=100.0)
    shared: bool = False


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)


class AdapterAdmin:
    """The trainer-side operations behind the routes, on one data dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def listing(self, scope: str) -> dict[str, Any]:
        from trainer.status import adapters_report

        return adapters_report(self.settings, scope)

    def drift(self, scope: str) -> dict[str, Any]:
        from trainer.status import drift_report

        return drift_report(self.settings, scope)

    def request_run(self, scope: str) -> None:
        from trainer.queue import Requests

        Requests(self.settings).add(scope)

    def promote(self, scope: str, version: str) -> dict[str, Any]:
        from trainer.registry import Registry

        Registry(self.settings, scope).promote(version)
        return {"tenant": scope, "current": version}

    def rollback(self, scope: str) -> dict[str, Any]:
        from trainer.registry import Registry

        current, _ = Registry(self.settings, scope).rollback()
        return {"tenant": scope, "current": current}

    def add_example(self, tenant: str, body: ExampleIn) -> dict[str, Any]:
        from trainer.examples import make_example, publish_examples

        example = make_example(
            self.settings, body.prompt, body.response, tenant, body.weight, source="api",
            shared=body.shared,
        )  # fmt: skip
        publish_examples(self.settings, [example])
        return {"example_id": example.example_id, "tenant": tenant, "shared": body.shared}


def adapter_router(
    tenant_dep: Any, admin: AdapterAdmin | None, fail: Callable[[Exception], HTTPException]
) -> APIRouter:
    """The routes, on the gateway's tenant dependency and error mapping."""
    router = APIRouter(tags=["adapters"])
    Tenant = Annotated[str, Depends(tenant_dep)]
    House = Annotated[bool, Query(description="the shared house-style adapter (admin only)")]

    def need() -> AdapterAdmin:
        if admin is None:
            raise HTTPException(501, "adapter administration is not enabled on this server")
        return admin

    def scope_of(request: Request, tenant: str, house: bool) -> str:
        if house and getattr(request.state, "token_bound", False):
            raise HTTPException(403, "a tenant's token may not act on the house adapter")
        return HOUSE if house else tenant

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except HTTPException:
            raise
        except Exception as exc:
            raise fail(exc) from exc

    @router.get("/v1/adapters", summary="The tenant's adapter versions and pending drift")
    async def listing(request: Request, tenant: Tenant, house: House = False) -> dict[str, Any]:
        return await call(need().listing, scope_of(request, tenant, house))

    @router.get("/v1/adapters/drift", summary="The tenant's drift and its turn in the queue")
    async def drift(request: Request, tenant: Tenant, house: House = False) -> dict[str, Any]:
        return await call(need().drift, scope_of(request, tenant, house))

    @router.post("/v1/adapters/train", status_code=202, summary="Ask for a run in the queue")
    async def train(request: Request, tenant: Tenant, house: House = False) -> dict[str, Any]:
        scope = scope_of(request, tenant, house)
        await call(need().request_run, scope)
        return {"tenant": scope, "requested": True}

    @router.post("/v1/adapters/promote", summary="Make a finished version current")
    async def promote(
        body: PromoteIn, request: Request, tenant: Tenant, house: House = False
    ) -> dict[str, Any]:
        return await call(need().promote, scope_of(request, tenant, house), body.version)

    @router.post("/v1/adapters/rollback", summary="Back to the previously promoted version")
    async def rollback(request: Request, tenant: Tenant, house: House = False) -> dict[str, Any]:
        return await call(need().rollback, scope_of(request, tenant, house))

    @router.post("/v1/examples", summary="A style example for the tenant's next refresh")
    async def example(body: ExampleIn, request: Request, tenant: Tenant) -> dict[str, Any]:
        scope_of(request, tenant, body.shared)  # shared examples: admin only
        return await call(need().add_example, tenant, body)

    return router
