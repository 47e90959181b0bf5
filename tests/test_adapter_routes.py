"""The tenant-scoped adapter routes on the real broker: a tenant-bound token sees and changes
only its own tenant's adapters and examples; the house adapter is the admin's."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from headwater.events import HOUSE, ExampleEvent
from headwater.runtime.clients import consumer
from service.gateway import create_app
from service.routes.adapters import AdapterAdmin
from tests.test_trainer_runs import announcements, fake_version
from trainer.queue import Requests
from trainer.registry import Registry


@pytest.fixture
def http(settings):
    s = settings.model_copy(
        update={
            "tenants": ["a", "b"],
            "default_tenant": "a",
            "api_tokens": {"tok-a": "a", "tok-b": "b"},
            "api_token": SecretStr("admin"),
        }
    )
    app = create_app(s, searcher=None, publisher=None, query_client=None,
                     adapters=AdapterAdmin(s))  # fmt: skip
    with TestClient(app) as client:
        yield s, client


A = {"Authorization": "Bearer tok-a"}
B = {"Authorization": "Bearer tok-b"}
ADMIN = {"Authorization": "Bearer admin"}


def test_a_tenant_token_sees_and_changes_only_its_own_adapters(http):
    s, client = http
    a, b = Registry(s, "a"), Registry(s, "b")
    a1, a2 = fake_version(s, a), fake_version(s, a)
    # Version ids count per tenant (the name `b/<version>` is unique): b's third is not a's.
    b1 = [fake_version(s, b) for _ in range(3)][-1]
    b.promote(b1)

    got = client.get("/v1/adapters", headers=A).json()
    assert got["tenant"] == "a" and [v["version"] for v in got["versions"]] == [a1, a2]
    assert got["current"] is None and "pending" in got
    assert client.get("/v1/adapters", headers=B).json()["current"] == b1
    # Another tenant's name in X-Tenant is refused; its versions are unknown to this tenant.
    assert client.get("/v1/adapters", headers=A | {"X-Tenant": "b"}).status_code == 403
    r = client.post("/v1/adapters/promote", json={"version": b1}, headers=A)
    assert r.status_code == 422 and "unknown version" in r.json()["detail"]
    assert b.current() == b1

    assert client.post("/v1/adapters/promote", json={"version": a2}, headers=A).json() == {
        "tenant": "a", "current": a2,
    }  # fmt: skip
    assert a.current() == a2 and b.current() == b1
    assert [x.version for x in announcements(s, "a")] == [a2]
    assert client.post("/v1/adapters/rollback", headers=A).json()["current"] is None
    assert client.post("/v1/adapters/rollback", headers=A).status_code == 422  # nothing left
    assert b.current() == b1 and [x.version for x in announcements(s, "b")] == [b1]

    r = client.post("/v1/adapters/train", headers=B)
    assert r.status_code == 202 and Requests(s).pending() == {"b"}
    drift = client.get("/v1/adapters/drift", headers=B).json()
    assert drift["tenant"] == "b" and drift["due"] and drift["reason"] == "requested"
    assert drift["queue_position"] == 1 and "tenants" not in drift  # nothing of a's
    assert client.get("/v1/adapters", headers={}).status_code == 401


def test_examples_and_the_house_adapter(http):
    s, client = http
    r = client.post("/v1/examples", json={"prompt": "Hi?", "response": "Hello."}, headers=B)
    assert r.status_code == 200 and r.json()["tenant"] == "b"
    # Shared examples and the house adapter are not a tenant token's to touch.
    shared = {"prompt": "Hi?", "response": "Hello.", "shared": True}
    assert client.post("/v1/examples", json=shared, headers=B).status_code == 403
    assert client.get("/v1/adapters?house=true", headers=A).status_code == 403
    assert client.post("/v1/adapters/train?house=true", headers=A).status_code == 403
    assert client.post("/v1/examples", json=shared, headers=ADMIN).status_code == 200
    h1 = fake_version(s, Registry(s, HOUSE))
    r = client.post("/v1/adapters/promote?house=true", json={"version": h1}, headers=ADMIN)
    assert r.json() == {"tenant": HOUSE, "current": h1}
    assert client.get("/v1/adapters?house=true", headers=ADMIN).json()["tenant"] == HOUSE
    bad = client.post("/v1/examples", json={"prompt": "x", "response": "y", "weight": -1},
                      headers=A)  # fmt: skip
    assert bad.status_code == 422

    c = consumer(s, s.examples_topic, group_id=None, consumer_timeout_ms=3000)
    got = [ExampleEvent.model_validate_json(m.value) for m in c]
    c.close()
    want = [("a", True, "api"), ("b", False, "api")]  # partitions: no order across keys
    assert sorted((e.tenant, e.shared, e.source) for e in got) == want
