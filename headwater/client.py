"""The Python client of headwater's HTTP API: no Kafka access, no Settings, just a URL.

    from headwater.client import Client

    with Client("http://127.0.0.1:8700", api_token="secret") as hw:
        hw.publish("notes/a.md", "Kafka keeps the log.")
        hits = hw.search("what keeps the log?")       # waits for the publish above
        for event in hw.ask("What keeps the log?"):   # hits, token…, done
            ...

Every write returns its freshness token and merges it into `client.token`; a search, a document
read or a question waits for that token by default (`token=` overrides it, `token=""` waits for
nothing), so a client always reads its own writes. `AsyncClient` has the same methods, async.
HTTP errors come back as headwater's own error kinds (422 InvalidInput, 403 Forbidden, 429 Busy,
503 Unavailable, 504 Timeout).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from headwater.errors import (
    Busy,
    Forbidden,
    GatewayUnavailable,
    HeadwaterError,
    InvalidInput,
    Timeout,
    Unavailable,
)
from headwater.events import AnswerEvent, Hit, IndexedDocument, Notification, Scalar
from headwater.tokens import FreshnessToken

DEFAULT_URL = "http://127.0.0.1:8700"
_KEEP = object()  # "the client's own token"


class _Base:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_token: str | None = None,
        tenant: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.tenant = tenant
        self.timeout = timeout
        self.token = FreshnessToken()
        self.headers: dict[str, str] = {}
        if api_token:
            self.headers["Authorization"] = f"Bearer {api_token}"
        if tenant:
            self.headers["X-Tenant"] = tenant

    def _wrote(self, response: httpx.Response) -> FreshnessToken:
        token = FreshnessToken.parse(response.json()["token"])
        self.token = self.token.merge(token)
        return token

    def _token(self, token: object) -> str | None:
        if token is _KEEP:
            return str(self.token) or None
        return str(token) if token else None


class Client(_Base):
    """A synchronous client; thread-safe like the httpx.Client under it. Close it when done."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_token: str | None = None,
        tenant: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_token=api_token, tenant=tenant, timeout=timeout)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout,
                                 transport=transport)  # fmt: skip

    # -- writes --------------------------------------------------------------------------------
    def publish(
        self,
        doc_id: str,
        text: str,
        *,
        metadata: dict[str, Scalar] | None = None,
        version: int | None = None,
    ) -> FreshnessToken:
        """Upsert a document; returns (and remembers) the token of the write."""
        body = {"doc_id": doc_id, "text": text, "metadata": metadata, "version": version}
        return self._wrote(self._call("POST", "/v1/documents", json=body))

    def delete(self, doc_id: str, *, version: int | None = None) -> FreshnessToken:
        params = {} if version is None else {"version": version}
        return self._wrote(self._call("DELETE", _doc_path(doc_id), params=params))

    def send_events(self, body: bytes, headers: dict[str, str]) -> FreshnessToken:
        """Post CloudEvents (any HTTP mode: give its headers and body)."""
        return self._wrote(self._call("POST", "/v1/events", content=body, headers=headers))

    # -- reads ---------------------------------------------------------------------------------
    def search(self, query: str, *, k: int = 5, token: object = _KEEP) -> list[Hit]:
        params = _params(q=query, k=k, token=self._token(token))
        return _hits(self._call("GET", "/v1/search", params=params).json())

    def embed(self, texts: list[str]) -> list[list[float]]:
        """The index embedder's vectors of `texts` (OpenAI's `/v1/embeddings`)."""
        body = {"model": "headwater", "input": texts, "encoding_format": "float"}
        data = self._call("POST", "/v1/embeddings", json=body).json()["data"]
        return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]

    def documents(self, doc_ids: Iterable[str], *, token: object = _KEEP) -> list[IndexedDocument]:
        """The documents among `doc_ids` as indexed now (absent or deleted ones left out)."""
        ids = list(doc_ids)
        if not ids:
            return []
        params = _params(id=ids, token=self._token(token))
        return _documents(self._call("GET", "/v1/documents", params=params).json())

    def ask(
        self, question: str, *, k: int = 5, token: object = _KEEP, search_only: bool = False
    ) -> Iterator[AnswerEvent]:
        """The answer's events as they arrive: `hits`, `token` pieces, then `done`."""
        body = _ask_body(question, k, self._token(token), search_only)
        try:
            with self.http.stream("POST", "/v1/ask", json=body) as response:
                _check(response, response.read() if response.is_error else b"")
                yield from _answer_events(_sse(response.iter_lines()))
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    def answer(self, question: str, **kw: Any) -> tuple[str, list[Hit]]:
        """The whole answer text and its citations."""
        return _gather(self.ask(question, **kw))

    def subscribe(self, query: str, *, threshold: float | None = None) -> str:
        """Register a standing query; returns its id (follow it with `notifications`)."""
        body = {"query": query, "threshold": threshold}
        return self._call("POST", "/v1/subscriptions", json=body).json()["subscription_id"]

    def notifications(
        self, subscription_id: str, *, limit: int | None = None, idle: float | None = None
    ) -> Iterator[Notification]:
        """A standing query's notifications (from its creation); ends after `limit` or `idle` s."""
        params = _params(limit=limit, idle=idle)
        path = f"/v1/subscriptions/{subscription_id}/events"
        try:
            with self.http.stream("GET", path, params=params, timeout=None) as response:
                _check(response, response.read() if response.is_error else b"")
                for _, data in _sse(response.iter_lines()):
                    yield Notification.model_validate_json(data)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    def unsubscribe(self, subscription_id: str) -> None:
        self._call("DELETE", f"/v1/subscriptions/{subscription_id}")

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc
        return _check(response, response.content)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client (httpx.AsyncClient); the same methods as `Client`, awaitable."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_token: str | None = None,
        tenant: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_token=api_token, tenant=tenant, timeout=timeout)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                      transport=transport)  # fmt: skip

    async def publish(
        self,
        doc_id: str,
        text: str,
        *,
        metadata: dict[str, Scalar] | None = None,
        version: int | None = None,
    ) -> FreshnessToken:
        body = {"doc_id": doc_id, "text": text, "metadata": metadata, "version": version}
        return self._wrote(await self._call("POST", "/v1/documents", json=body))

    async def delete(self, doc_id: str, *, version: int | None = None) -> FreshnessToken:
        params = {} if version is None else {"version": version}
        return self._wrote(await self._call("DELETE", _doc_path(doc_id), params=params))

    async def search(self, query: str, *, k: int = 5, token: object = _KEEP) -> list[Hit]:
        params = _params(q=query, k=k, token=self._token(token))
        return _hits((await self._call("GET", "/v1/search", params=params)).json())

    async def embed(self, texts: list[str]) -> list[list[float]]:
        body = {"model": "headwater", "input": texts, "encoding_format": "float"}
        data = (await self._call("POST", "/v1/embeddings", json=body)).json()["data"]
        return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]

    async def documents(
        self, doc_ids: Iterable[str], *, token: object = _KEEP
    ) -> list[IndexedDocument]:
        ids = list(doc_ids)
        if not ids:
            return []
        params = _params(id=ids, token=self._token(token))
        return _documents((await self._call("GET", "/v1/documents", params=params)).json())

    async def ask(
        self, question: str, *, k: int = 5, token: object = _KEEP, search_only: bool = False
    ) -> AsyncIterator[AnswerEvent]:
        body = _ask_body(question, k, self._token(token), search_only)
        try:
            async with self.http.stream("POST", "/v1/ask", json=body) as response:
                _check(response, await response.aread() if response.is_error else b"")
                parser = _Sse()
                async for line in response.aiter_lines():
                    message = parser.feed(line)
                    if message is None:
                        continue
                    event = _answer_event(message[1])
                    yield event
                    if event.kind == "done":
                        return
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc
        return _check(response, response.content)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- shared helpers ----------------------------------------------------------------------------


def _doc_path(doc_id: str) -> str:
    # Doc ids are paths and may hold spaces, "?" or "#": only "/" may stay as it is.
    return "/v1/documents/" + quote(doc_id, safe="/")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _ask_body(question: str, k: int, token: str | None, search_only: bool) -> dict[str, Any]:
    return {"question": question, "k": k, "token": token,
            "mode": "search" if search_only else "answer"}  # fmt: skip


def _hits(body: dict[str, Any]) -> list[Hit]:
    return [Hit.model_validate(h) for h in body["hits"]]


def _documents(body: dict[str, Any]) -> list[IndexedDocument]:
    return [IndexedDocument.model_validate(d) for d in body["documents"]]


def _gather(events: Iterable[AnswerEvent]) -> tuple[str, list[Hit]]:
    hits: list[Hit] = []
    pieces: list[str] = []
    for event in events:
        if event.kind == "hits":
            hits = list(event.hits or [])
        elif event.kind == "token":
            pieces.append(event.text or "")
    return "".join(pieces), hits


def _answer_event(data: str) -> AnswerEvent:
    event = AnswerEvent.model_validate_json(data)
    if event.kind == "error":
        raise Unavailable(event.error or "the query failed")
    return event


def _answer_events(messages: Iterable[tuple[str, str]]) -> Iterator[AnswerEvent]:
    for _, data in messages:
        event = _answer_event(data)
        yield event
        if event.kind == "done":
            return


class _Sse:
    """Server-Sent Events, one line at a time: `feed` returns (event name, data) when complete."""

    def __init__(self) -> None:
        self.name, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            message = (self.name, "\n".join(self.data)) if self.data else None
            self.name, self.data = "message", []
            return message
        if line.startswith("event:"):
            self.name = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        return None


def _sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each Server-Sent Event in `lines`."""
    parser = _Sse()
    for line in lines:
        message = parser.feed(line)
        if message is not None:
            yield message
    last = parser.feed("")
    if last is not None:
        yield last


def _check(response: httpx.Response, content: bytes) -> httpx.Response:
    status = response.status_code
    if status < 400:
        return response
    try:
        body = json.loads(content)
        # The gateway says {"detail": ...}; its OpenAI routes {"error": {"message": ...}}.
        detail = body.get("detail") or body["error"]["message"]
    except (ValueError, AttributeError, KeyError, TypeError):
        detail = content.decode(errors="replace")
    message = f"{status}: {' '.join(str(detail).split())[:500]}"
    if status in (401, 403):
        raise Forbidden(message)
    if status == 429:
        raise Busy(message, float(response.headers.get("retry-after", 1)))
    if status == 504:
        raise Timeout(message)
    if status < 500:
        raise InvalidInput(message)
    raise GatewayUnavailable(message)


def _unreachable(url: str, exc: Exception) -> HeadwaterError:
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"headwater at {url} did not answer in time: {exc}")
    return GatewayUnavailable(f"cannot reach headwater at {url}: {exc}")
