"""The HTTP gateway: documents, search, streamed answers (SSE), auth and tenant isolation."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from headwater.errors import InvalidDocumentError, SearchError, StackError
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from index.search import Searcher
from service.gateway import create_app, serve
from stack.daemon import free_port, port_open
from tests.test_answerer import HANDBOOK_V1, HANDBOOK_V2, OTHER, Stack
from tests.test_generation import one_torch_thread

__all__ = ["one_torch_thread"]


def sse(response) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a Server-Sent Events response."""
    out, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
        elif not line.strip() and data:
            out.append((name or "message", json.loads("\n".join(data))))
            name, data = None, []
    return out


def ask(client: TestClient, question: str, headers=None, **body) -> list[tuple[str, dict]]:
    with client.stream(
        "POST", "/v1/ask", json={"question": question, **body}, headers=headers or {}
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r)


# -- on the real stack ---------------------------------------------------------------------------


@pytest.fixture
def live(settings: Settings):
    settings = settings.model_copy(
        update={"tenants": ["default", "a", "b", "c"], "api_tokens": {"tok-a": "a", "tok-b": "b"}}
    )
    stack = Stack(settings)
    stack.start_answerer()
    app = create_app(
        settings, searcher=stack.searcher, publisher=stack.publisher, query_client=stack.client
    )
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, stack=stack, settings=settings)
    stack.close()


def test_publish_ask_search_delete_through_the_api(live):
    c = live.client
    a = {"Authorization": "Bearer tok-a"}
    r = c.post("/v1/documents", json={"doc_id": "hr/handbook.md", "text": HANDBOOK_V1}, headers=a)
    assert r.status_code == 200, r.text
    r = c.post(
        "/v1/documents",
        json={"doc_id": "hr/handbook.md", "text": HANDBOOK_V2, "metadata": {"lang": "en"}},
        headers=a,
    )
    token = r.json()["token"]
    assert r.json()["tenant"] == "a"
    hits = c.get("/v1/search", params={"q": "vacation days", "token": token}, headers=a).json()
    assert hits["hits"][0]["doc_id"] == "hr/handbook.md"
    assert "25 vacation days" in hits["hits"][0]["text"]
    assert hits["hits"][0]["metadata"] == {"lang": "en"}

    events = ask(c, "How many vacation days do employees get?", headers=a, token=token, k=3)
    kinds = [name for name, _ in events]
    assert kinds[0] == "hits" and kinds[-1] == "done" and kinds.count("token") >= 2
    assert events[0][1]["hits"][0]["doc_id"] == "hr/handbook.md"
    answer = "".join(d["text"] for name, d in events if name == "token")
    assert "25 vacation days" in answer

    # Tenant b sees nothing of tenant a.
    b = {"Authorization": "Bearer tok-b"}
    assert c.get("/v1/search", params={"q": "vacation days"}, headers=b).json()["hits"] == []

    r = c.delete("/v1/documents/hr/handbook.md", headers=a)
    assert r.status_code == 200 and r.json()["doc_id"] == "hr/handbook.md"
    token = r.json()["token"]
    c.post("/v1/documents", json={"doc_id": "coffee.md", "text": OTHER}, headers=a)
    for q in ("vacation days", "How many vacation days do employees get?", "handbook"):
        found = c.get("/v1/search", params={"q": q, "token": token, "k": 10}, headers=a).json()
        assert all(h["doc_id"] != "hr/handbook.md" for h in found["hits"])
    events = ask(c, "vacation days per year", headers=a, token=token)
    assert all(h["doc_id"] != "hr/handbook.md" for h in events[0][1]["hits"])
    assert "vacation" not in "".join(d["text"] for n, d in events if n == "token")


def test_tenant_isolation_over_many_random_searches(live):
    """Documents of 3 tenants with shared words; no search ever returns another tenant's chunk."""
    _isolation(live, searches=300, via_http=True)


# 10k searches take minutes: `make soak`; CI runs the HTTP variant above with 300.
@pytest.mark.soak
def test_tenant_isolation_over_ten_thousand_searches(live):
    _isolation(live, searches=10_000, via_http=False)


WORDS = "river vacation kafka budget office report travel salary remote policy"


class CachedEmbedder:
    """The real embedder, remembering query vectors (the random queries repeat)."""

    def __init__(self, embedder) -> None:
        self.embedder, self.cache = embedder, {}
        self.model_id, self.dim = embedder.model_id, embedder.dim

    def encode(self, texts):
        key = tuple(texts)
        if key not in self.cache:
            self.cache[key] = self.embedder.encode(texts)
        return self.cache[key]


def _isolation(live, searches: int, via_http: bool) -> None:
    rng = random.Random(7)
    words = WORDS.split()
    token = FreshnessToken()
    for tenant in ("a", "b", "c"):
        for i in range(12):
            text = " ".join(rng.choice(words) for _ in range(30)) + f". Owned by {tenant}."
            # The same doc ids in every tenant: a leak would show up as a foreign text.
            token |= live.stack.publisher.upsert(f"doc-{i}", text, tenant=tenant)
    searcher = Searcher(live.settings, CachedEmbedder(live.stack.embedder), live.stack.store)
    searcher.wait(str(token))
    if via_http:
        app = create_app(
            live.settings.model_copy(update={"api_token": SecretStr("admin")}),
            searcher=searcher,
            publisher=live.stack.publisher,
            query_client=live.stack.client,
        )
        client = TestClient(app)
        headers = {t: {"Authorization": "Bearer admin", "X-Tenant": t} for t in "abc"}

        def search(q: str, tenant: str, k: int) -> list[dict]:
            r = client.get("/v1/search", params={"q": q, "k": k}, headers=headers[tenant])
            assert r.status_code == 200, r.text
            return r.json()["hits"]
    else:

        def search(q: str, tenant: str, k: int) -> list[dict]:
            return [h.to_dict() for h in searcher.search(q, tenant=tenant, k=k)]

    seen = {t: 0 for t in "abc"}
    for _ in range(searches):
        tenant = rng.choice("abc")
        q = " ".join(rng.sample(words, rng.randint(1, 3)))
        for hit in search(q, tenant, rng.randint(1, 20)):
            assert hit["text"].endswith(f"Owned by {tenant}."), (tenant, hit)
            seen[tenant] += 1
    assert all(n > 0 for n in seen.values())


# -- auth, validation, operations (fakes behind the app) ---------------------------------------


class FakeSearcher:
    def __init__(self) -> None:
        self.calls = []

    def search(self, query, *, tenant, k=5, token=None):
        self.calls.append((query, tenant, k, token))
        if token == "bad":
            raise SearchError("bad freshness token: nope")
        return [SimpleNamespace(to_dict=lambda: {"doc_id": "d", "tenant_seen": tenant})]


class FakePublisher:
    def __init__(self) -> None:
        self.calls = []

    def upsert(self, doc_id, text, *, tenant=None, metadata=None, version=None):
        if "\x00" in doc_id:
            raise InvalidDocumentError("invalid doc_id: contains control characters")
        self.calls.append(("upsert", doc_id, tenant, metadata, version))
        return "0:1"

    def delete(self, doc_id, *, tenant=None, version=None):
        self.calls.append(("delete", doc_id, tenant, version))
        return "1:2"


def _app(**settings):
    s = Settings(tenants=["default", "a", "b"], **settings)
    fakes = SimpleNamespace(searcher=FakeSearcher(), publisher=FakePublisher())
    app = create_app(s, searcher=fakes.searcher, publisher=fakes.publisher, query_client=None)
    return TestClient(app), fakes


def test_auth_tokens_bind_tenants():
    client, fakes = _app(api_token="admin", api_tokens={"tok-a": "a", "tok-b": "b"})
    search = lambda **h: client.get("/v1/search", params={"q": "x"}, headers=h)  # noqa: E731
    r = search()
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["detail"]
    assert search(Authorization="Bearer wrong").status_code == 401
    assert search(Authorization="Basic tok-a").status_code == 401
    assert search(Authorization="Bearer ").status_code == 401
    assert search(Authorization="Bearer tok-a").status_code == 200
    assert fakes.searcher.calls[-1][1] == "a"
    r = search(Authorization="Bearer tok-a", **{"X-Tenant": "b"})
    assert r.status_code == 403 and "may not act for tenant" in r.json()["detail"]
    assert search(Authorization="Bearer tok-a", **{"X-Tenant": "a"}).status_code == 200
    assert search(Authorization="Bearer admin", **{"X-Tenant": "b"}).status_code == 200
    assert fakes.searcher.calls[-1][1] == "b"
    assert search(Authorization="Bearer admin").status_code == 200
    assert fakes.searcher.calls[-1][1] == "default"
    r = search(Authorization="Bearer admin", **{"X-Tenant": "zzz"})
    assert r.status_code == 403 and "unknown tenant" in r.json()["detail"]
    # Every /v1 route is guarded; operations are not.
    assert client.post("/v1/documents", json={"doc_id": "d", "text": "t"}).status_code == 401
    assert client.delete("/v1/documents/d").status_code == 401
    assert client.post("/v1/ask", json={"question": "q"}).status_code == 401
    assert client.post("/v1/subscriptions", json={"query": "q"}).status_code == 401
    assert client.get("/healthz").status_code == 200
    r = client.post(
        "/v1/documents",
        json={"doc_id": "d", "text": "t"},
        headers={"Authorization": "Bearer tok-b"},
    )
    assert r.json() == {"token": "0:1", "doc_id": "d", "tenant": "b"}
    assert fakes.publisher.calls[-1][2] == "b"


def test_without_auth_the_tenant_comes_from_x_tenant():
    client, fakes = _app()
    assert client.get("/v1/search", params={"q": "x"}).status_code == 200
    assert fakes.searcher.calls[-1][1] == "default"
    client.get("/v1/search", params={"q": "x"}, headers={"X-Tenant": "b"})
    assert fakes.searcher.calls[-1][1] == "b"
    r = client.get("/v1/search", params={"q": "x"}, headers={"X-Tenant": "../etc"})
    assert r.status_code == 403
    r = client.delete("/v1/documents/a/b%20c.md", params={"version": 4}, headers={"X-Tenant": "a"})
    assert r.json()["token"] == "1:2"
    assert fakes.publisher.calls[-1] == ("delete", "a/b c.md", "a", 4)


def test_bad_input_is_422_with_a_clear_message():
    client, _ = _app()
    r = client.post("/v1/documents", json={"doc_id": "d"})
    assert r.status_code == 422 and r.json()["detail"] == "body.text: Field required"
    r = client.post("/v1/documents", json={"doc_id": "d", "text": "t", "version": -1})
    assert r.status_code == 422 and "body.version" in r.json()["detail"]
    r = client.post("/v1/documents", json={"doc_id": "d", "text": "t", "extra": 1})
    assert r.status_code == 422 and "extra" in r.json()["detail"]
    r = client.post("/v1/documents", json={"doc_id": "d\x00", "text": "t"})
    assert r.status_code == 422 and "control characters" in r.json()["detail"]
    r = client.get("/v1/search", params={"q": "x", "k": 0})
    assert r.status_code == 422 and "query.k" in r.json()["detail"]
    assert client.get("/v1/search").status_code == 422
    r = client.get("/v1/search", params={"q": "x", "token": "bad"})
    assert r.status_code == 422 and "bad freshness token" in r.json()["detail"]
    r = client.post("/v1/ask", json={"question": ""})
    assert r.status_code == 422 and "body.question" in r.json()["detail"]
    r = client.post("/v1/subscriptions", json={"query": "x"})
    assert r.status_code == 501  # no subscription client configured


def test_health_metrics_and_openapi():
    client, _ = _app()
    assert client.get("/healthz").json()["status"] == "ok"
    client.get("/v1/search", params={"q": "x"})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    # The process-wide registry: the answerer's metrics are served by the gateway.
    assert "headwater_queries_total" in metrics.text
    assert "headwater_first_token_seconds_bucket" in metrics.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/documents", "/v1/search", "/v1/ask", "/v1/subscriptions"} <= set(schema["paths"])


def test_serve_announces_its_address_and_stops(caplog):
    s = Settings(tenants=["default"], api_port=free_port())
    app = create_app(s, searcher=FakeSearcher(), publisher=FakePublisher(), query_client=None)
    caplog.set_level(logging.INFO, logger="service.gateway")
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(app, s, stop))
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", s.api_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{s.api_port}/healthz", timeout=10)
        assert r.json()["status"] == "ok"
        with pytest.raises(StackError, match="cannot serve on"):
            serve(app, s)  # the port is taken now: a clear error, not uvicorn's exit
    finally:
        stop.set()
        server.join(30)
    assert not server.is_alive()
    assert f"http://127.0.0.1:{s.api_port}" in caplog.text
