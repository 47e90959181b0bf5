"""OpenAI-compatible routes: chat completions grounded in the fresh index, models, embeddings.

`POST /v1/chat/completions` asks through the same path as `/v1/ask` (QueryClient → query
consumers): the last user message is the question, earlier messages are the chat's history,
`max_tokens` and `temperature` reach the generator (the server's `max_new_tokens` stays the
cap). Streamed (`stream: true`) it sends `chat.completion.chunk` objects and `data: [DONE]`;
otherwise one `chat.completion`. The citations travel in an extra top-level field `citations`
(the first chunk of a stream; the response otherwise), which plain OpenAI clients ignore, and
`headwater` carries the query id and the adapter that answered. `model` is one of `/v1/models`:
the base model's id answers with the tenant's current adapter, an adapter's id (its name,
`<tenant>/<version>`: the tenant's own or the house's) with that adapter.
A freshness token can be given as the extra body field `token` (`extra_body={"token": ...}` in
the openai SDK).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
the gateway gives the same error.
"""

# No `from __future__ import annotations`: FastAPI resolves the annotations at runtime.
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from headwater.errors import QueryError, public_message
from headwater.events import ChatTurn, Hit
from headwater.settings import Settings

STREAM_WAIT_S = 1.0
MAX_INPUTS = 256  # embedding inputs per request
MAX_INPUT_CHARS = 32_768
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class _Open(BaseModel):
    # OpenAI clients send many optional fields (n, top_p, user, ...): unknown ones are ignored.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(_Open):
    include_usage: bool = False


class ChatIn(_Open):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=65)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int = Field(default=1, ge=1, le=1)
    token: str | None = Field(default=None, max_length=4096, description="Freshness token.")
    k: int = Field(default=5, ge=1, le=100, description="Passages to retrieve.")


class EmbeddingsIn(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


def openai_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(status_code=status, content=body)


def router(
    settings: Settings,
    Tenant: Any,  # the gateway's dependency type, used as an annotation below
    *,
    query_client: Any,
    embedder: Any,
    models: Callable[[str], list[str]],
    fail: Callable[[Exception], HTTPException],
    asks: Any = None,
) -> APIRouter:
    """The routes; `Tenant` is the gateway's tenant dependency, `fail` its error mapping."""
    api = APIRouter(tags=["openai"])

    def failed(exc: Exception) -> JSONResponse:
        http = fail(exc)
        return openai_error(http.status_code, str(http.detail))

    @api.get("/v1/models", summary="The base model and the tenant's adapter versions")
    def list_models(tenant: Tenant) -> dict[str, Any]:
        try:
            ids = models(tenant)
        except Exception as exc:
            return failed(exc)
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": 0, "owned_by": "headwater"} for i in ids
            ],
        }

    @api.post("/v1/embeddings", summary="Embed texts with the index's embedder")
    def embeddings(body: EmbeddingsIn, tenant: Tenant) -> Any:
        if embedder is None:
            return openai_error(501, "this server has no embedder")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_INPUTS or any(len(t) > MAX_INPUT_CHARS for t in texts):
            return openai_error(
                422, f"at most {MAX_INPUTS} inputs of {MAX_INPUT_CHARS} characters each"
            )
        if any(not t for t in texts):
            return openai_error(422, "an input is empty")
        try:
            vectors = embedder.encode(texts)
            used = sum(embedder.count_tokens(t) for t in texts)
        except Exception as exc:
            return failed(exc)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                vector: Any = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            else:
                vector = [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": used, "total_tokens": used}}  # fmt: skip

    @api.post("/v1/chat/completions", summary="A chat answer grounded in the fresh index")
    async def chat(body: ChatIn, tenant: Tenant) -> Any:
        try:
            known = await run_in_threadpool(models, tenant)
        except Exception as exc:
            return failed(exc)
        if body.model not in known:
            return openai_error(
                404, f"the model {body.model!r} does not exist (see /v1/models)", "model_not_found"
            )
        try:
            turns = [(m.role, m.text()) for m in body.messages if m.role != "tool"]
        except ValueError as exc:
            return openai_error(422, str(exc))
        if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
            return openai_error(422, "the last message must be a non-empty user message")
        question = turns[-1][1]
        if len(question) > 4096:
            return openai_error(422, "the last user message is longer than 4096 characters")
        history = [ChatTurn(role="system" if r == "developer" else r, content=c[:16_384])
                   for r, c in turns[:-1]][-64:]  # fmt: skip
        try:
            # The gateway's bound on answer streams (per tenant and overall) holds here too.
            slot = asks.acquire(tenant) if asks is not None else None
        except Exception as exc:
            return failed(exc)
        try:
            stream = await run_in_threadpool(
                lambda: query_client.ask(
                    question, tenant=tenant, mode="answer", k=body.k, token=body.token,
                    history=history, max_tokens=body.max_completion_tokens or body.max_tokens,
                    temperature=body.temperature,
                    adapter=None if body.model == known[0] else body.model,
                )
            )  # fmt: skip
        except Exception as exc:
            if slot is not None:
                slot.release()
            return failed(exc)

        def finish() -> None:
            stream.close()  # before its end: the answerers stop generating it
            if slot is not None:
                slot.release()

        completion = f"chatcmpl-{stream.query_id}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
            return {"id": completion, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}], **extra}  # fmt: skip

        if not body.stream:
            try:
                hits, text, done = await run_in_threadpool(_collect, stream)
            except Exception as exc:
                return failed(exc)
            finally:
                finish()
            usage = _usage(done)
            return {
                "id": completion, "object": "chat.completion", "created": created,
                "model": body.model, "system_fingerprint": None,
                "choices": [{"index": 0, "logprobs": None,
                             "message": {"role": "assistant", "content": text, "refusal": None},
                             "finish_reason": done.finish_reason or "stop"}],
                "usage": usage,
                "citations": [h.to_dict() for h in hits],
                "headwater": _extra(stream, done),
            }  # fmt: skip

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                while not stream.finished:
                    try:
                        event = await anyio.to_thread.run_sync(stream.get, STREAM_WAIT_S)
                    except Exception as exc:  # timeout or reader failure: say so, in-band
                        yield {"data": _json({"error": {"message": public_message(exc),
                                                        "type": "api_error"}})}  # fmt: skip
                        return
                    if event is None:
                        continue
                    if event.kind == "hits":
                        citations = [h.to_dict() for h in event.hits or []]
                        first = chunk({"role": "assistant", "content": ""}, citations=citations)
                        yield {"data": _json(first)}
                    elif event.kind == "token" and event.text:
                        yield {"data": _json(chunk({"content": event.text}))}
                    elif event.kind == "done":
                        last = chunk({}, event.finish_reason or "stop",
                                     headwater=_extra(stream, event))  # fmt: skip
                        yield {"data": _json(last)}
                        if include_usage:
                            yield {"data": _json({**chunk({}), "choices": [],
                                                  "usage": _usage(event)})}  # fmt: skip
                    elif event.kind == "error":
                        yield {"data": _json({"error": {"message": event.error or "failed",
                                                        "type": "api_error"}})}  # fmt: skip
                        return
                yield {"data": "[DONE]"}
            finally:
                finish()

        return EventSourceResponse(
            events(), headers={"X-Query-Id": stream.query_id}, background=BackgroundTask(finish)
        )

    return api


def _collect(stream: Any) -> tuple[list[Hit], str, Any]:
    """hits, text and the final event of an answer stream; QueryError on an `error` event."""
    hits: list[Hit] = []
    pieces: list[str] = []
    for event in stream:
        if event.kind == "hits":
            hits = list(event.hits or [])
        elif event.kind == "token":
            pieces.append(event.text or "")
        elif event.kind == "error":
            raise QueryError(event.error or "the query failed")
        elif event.kind == "done":
            return hits, "".join(pieces), event
    raise QueryError(f"the answer stream of query {stream.query_id} ended without done")


def _usage(done: Any) -> dict[str, int]:
    usage = done.usage or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _extra(stream: Any, done: Any) -> dict[str, Any]:
    return {"query_id": stream.query_id, "adapter_version": done.adapter_version,
            "timing": done.timing}  # fmt: skip


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def adapter_models(settings: Settings) -> Callable[[str], list[str]]:
    """Model ids of a tenant: the base generator first, then its own adapters that can serve and
    the shared house adapters, by name (`<tenant>/<version>`, `_house/<version>`)."""

    def ids(tenant: str) -> list[str]:
        from models.adapters import HOUSE, adapter_name
        from trainer.registry import PROMOTABLE, Registry

        base = settings.generator or "extractive"
        names = [
            adapter_name(scope, v.version)
            for scope in (tenant, HOUSE)
            for v in Registry(settings, scope).load().versions
            if v.status in PROMOTABLE
        ]
        return [base, *sorted(names)]

    return ids
