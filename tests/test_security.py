"""Security: API auth, tenant isolation on the real stack, filter-expression injection, and
Kafka SASL/SSL and Milvus token settings reaching every client that headwater builds."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from consumers.indexer import Indexer
from headwater.errors import UnknownTenantError
from headwater.progress import Progress
from headwater.runtime import clients
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from index import store as store_module
from index.search import Searcher
from index.store import ChunkStore, doc_key, lit
from producers.publisher import DocumentPublisher
from service.gateway import create_app
from tests.chaos import IndexerThread, assert_truth, truth
from tests.test_reliability import HOSTILE_IDS

REPO = Path(__file__).resolve().parent.parent

# -- the API on the real stack ---------------------------------------------------------------


@pytest.fixture
def api(settings: Settings, embedder):
    s = settings.model_copy(
        update={
            "tenants": ["a", "b"],
            "default_tenant": "a",
            "api_tokens": {"tok-a": "a", "tok-b": "b"},
        }
    )
    member = IndexerThread(s, embedder)
    member.wait_assigned()
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    publisher = DocumentPublisher(s)
    app = create_app(
        s, searcher=Searcher(s, embedder, store), publisher=publisher, query_client=None
    )
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, settings=s, store=store, embedder=embedder)
    member.close()
    publisher.close()
    store.close()


A = {"Authorization": "Bearer tok-a"}
B = {"Authorization": "Bearer tok-b"}
PAYROLL = "# Payroll\n\nConfidential salary bands of tenant b: engineers earn 9000 credits."
NOTES = "# Notes\n\nTenant a keeps its meeting notes about salary reviews here."


def _search(api, q: str, headers: dict, token: str | None = None, k: int = 20) -> list[dict]:
    params = {"q": q, "k": k} | ({"token": token} if token else {})
    r = api.client.get("/v1/search", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def test_api_refuses_missing_and_wrong_tokens(api):
    c = api.client
    wrong = ["Bearer nope", "tok-a", "Basic tok-a", "Bearer tok-a2", "Bearer  ", "bearer"]
    for headers in [{}, *({"Authorization": w} for w in wrong)]:
        assert c.get("/v1/search", params={"q": "x"}, headers=headers).status_code == 401
        r = c.post("/v1/documents", json={"doc_id": "x.md", "text": "t"}, headers=headers)
        assert r.status_code == 401
        assert c.delete("/v1/documents/x.md", headers=headers).status_code == 401
    # A bound token cannot name another tenant, nor an unknown or hostile one.
    for tenant in ("b", "c", 'a" or tenant != "', "../b"):
        r = c.get("/v1/search", params={"q": "x"}, headers={**A, "X-Tenant": tenant})
        assert r.status_code == 403, (tenant, r.text)
    assert api.store.count_chunks() == 0  # nothing refused reached the index


def test_a_tenant_cannot_read_or_delete_another_tenants_documents(api):
    c = api.client
    r = c.post("/v1/documents", json={"doc_id": "payroll.md", "text": PAYROLL}, headers=B)
    assert r.status_code == 200 and r.json()["tenant"] == "b"
    _search(api, "salary", B, r.json()["token"])  # the token makes the search wait for it
    r = c.post("/v1/documents", json={"doc_id": "notes.md", "text": NOTES}, headers=A)
    _search(api, "salary", A, r.json()["token"])

    # Reading: a sees only its own document, whatever it asks for.
    for q in ("salary bands engineers 9000 credits", "payroll.md", "Confidential", "tenant b"):
        hits = _search(api, q, A)
        assert {h["doc_id"] for h in hits} <= {"notes.md"}, hits
        assert all("Confidential" not in h["text"] for h in hits)
    assert {h["doc_id"] for h in _search(api, "salary bands", B)} >= {"payroll.md"}

    # Deleting: b's document ids, spelled every way, only ever name a's own (absent) documents.
    tokens = []
    for path in ("payroll.md", "b/payroll.md", "..%2Fb%2Fpayroll.md", "%2E%2E/b/payroll.md"):
        r = c.delete(f"/v1/documents/{path}", headers=A)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["tenant"] == "a"
        tokens.append(r.json()["token"])
    r = c.delete("/v1/documents/payroll.md", headers={**A, "X-Tenant": "b"})
    assert r.status_code == 403
    for t in tokens:
        _search(api, "salary", A, t)  # every delete is applied
    hits = _search(api, "salary bands engineers", B)
    assert "payroll.md" in {h["doc_id"] for h in hits}
    states = api.store.doc_states([doc_key("b", "payroll.md"), doc_key("a", "payroll.md")])
    assert not states[doc_key("b", "payroll.md")].deleted
    assert states[doc_key("a", "payroll.md")].deleted  # a tombstone in a's namespace, nothing more
    assert_truth(truth(api.settings, api.embedder, sample=5))


# -- filter-expression injection -----------------------------------------------------------------


def test_hostile_doc_ids_cannot_touch_other_rows(settings: Settings, embedder):
    """Ids shaped like filter expressions are upserted and deleted in one tenant; another tenant
    holding the same ids, and everything else, is untouched."""
    s = settings.model_copy(update={"tenants": ["default", "evil"]})
    member = IndexerThread(s, embedder)
    member.wait_assigned()
    try:
        with DocumentPublisher(s) as pub:
            token = FreshnessToken()
            for i, doc_id in enumerate(HOSTILE_IDS):
                token |= pub.upsert(doc_id, f"# Safe {i}\n\nthe default tenant's document {i}")
                token |= pub.upsert(doc_id, f"# Evil {i}\n\nthe evil copy {i}", tenant="evil")
            token |= pub.upsert("bystander.md", "# Bystander\n\nan unrelated document of default")
            token |= pub.upsert("victim", "# Victim\n\nthe evil tenant's plain id", tenant="evil")
            for doc_id in HOSTILE_IDS:
                token |= pub.delete(doc_id, tenant="evil")
            with Progress(s) as progress:
                assert progress.wait_for_token(token, timeout=120)
    finally:
        member.close()
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    try:
        fields = store.client.describe_collection(store.chunks)["fields"]
        # A server prunes by the tenant partition key; milvus-lite cannot filter such a
        # collection, so there the tenant filter alone keeps tenants apart (checked below).
        tenant_field = next(f for f in fields if f["name"] == "tenant")
        assert bool(tenant_field.get("is_partition_key")) == store.engine.partition_key
        searcher = Searcher(s, embedder, store)
        mine = {h.doc_id for h in searcher.search("document", tenant="default", k=100)}
        assert mine == {*HOSTILE_IDS, "bystander.md"}
        theirs = {h.doc_id for h in searcher.search("copy", tenant="evil", k=100)}
        assert theirs == {"victim"}
        states = store.doc_states(doc_key("default", d) for d in HOSTILE_IDS)
        assert len(states) == len(HOSTILE_IDS) and not any(st.deleted for st in states.values())
        assert store.count_chunks("default") == len(HOSTILE_IDS) + 1
    finally:
        store.close()
    assert_truth(truth(s, embedder, sample=10))


def test_no_user_value_reaches_a_filter_expression(settings: Settings, embedder):
    # Only hex digests and validated tenant ids are spliced into expressions.
    for hostile in ('x" or tenant != "', "a' or '1'='1", "t in [", ") or (", "a\\", "", "é"):
        with pytest.raises(ValueError, match="filter expression"):
            lit(hostile)
    assert lit(doc_key("default", 'x" or tenant != "')).strip('"').isalnum()
    # Even a wildcard tenant setting cannot smuggle an expression through the tenant argument.
    s = settings.model_copy(update={"tenants": ["*"]})
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    try:
        searcher = Searcher(s, embedder, store)
        with pytest.raises(ValueError):
            searcher.search("anything", tenant='default" or tenant != "')
        with pytest.raises(UnknownTenantError):
            Searcher(settings, embedder, store).search("anything", tenant="nobody")
    finally:
        store.close()


# -- Kafka SASL/SSL and Milvus token pass-through ------------------------------------------------

SECURE = {
    "kafka_bootstrap": "broker-1.example:9093,broker-2.example:9093",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "headwater",
    "kafka_sasl_password": "s3cret-pass",
    "kafka_ssl_cafile": "/etc/headwater/ca.pem",
    "kafka_ssl_certfile": "/etc/headwater/client.pem",
    "kafka_ssl_keyfile": "/etc/headwater/client.key",
    "milvus_uri": "https://milvus.example:19530",
    "milvus_token": "root:Milvus-pass",
}
EXPECTED_KAFKA = {
    "bootstrap_servers": ["broker-1.example:9093", "broker-2.example:9093"],
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "headwater",
    "sasl_plain_password": "s3cret-pass",
    "ssl_cafile": "/etc/headwater/ca.pem",
    "ssl_certfile": "/etc/headwater/client.pem",
    "ssl_keyfile": "/etc/headwater/client.key",
}


class _Client:
    """Stands in for a kafka-python client: records its keyword arguments, does nothing."""

    made: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, *topics: str, **kwargs: object) -> None:
        _Client.made.append((type(self).__name__, kwargs))

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def subscribe(self, *args: object, **kwargs: object) -> None:
        pass

    def close(self, *args: object, **kwargs: object) -> None:
        pass


class FakeProducer(_Client):
    pass


class FakeConsumer(_Client):
    pass


class FakeAdmin(_Client):
    def list_group_offsets(self, group_specs: dict) -> dict:
        return {}


class FakeMilvus:
    made: ClassVar[list[dict]] = []

    def __init__(self, **kwargs: object) -> None:
        FakeMilvus.made.append(kwargs)

    def get_server_version(self, timeout: float | None = None) -> str:
        return "v2.5.0"  # a server: the store keeps the tenant partition key

    def has_collection(self, name: str) -> bool:
        return True

    def describe_collection(self, name: str) -> dict:
        return {"fields": [{"name": "sparse"}]}

    def load_collection(self, name: str) -> None:
        pass


@pytest.fixture
def fake_clients(monkeypatch):
    _Client.made.clear()
    FakeMilvus.made.clear()
    monkeypatch.setattr(clients, "KafkaProducer", FakeProducer)
    monkeypatch.setattr(clients, "KafkaConsumer", FakeConsumer)
    monkeypatch.setattr(clients, "KafkaAdminClient", FakeAdmin)
    monkeypatch.setattr(store_module, "MilvusClient", FakeMilvus)
    return _Client.made


def test_settings_build_secure_client_configs():
    s = Settings(**SECURE)
    assert s.kafka_client_config() == EXPECTED_KAFKA
    milvus = s.milvus_client_config()
    assert milvus["uri"] == "https://milvus.example:19530"
    assert milvus["token"] == "root:Milvus-pass"
    # Secrets never show in reprs or logs of the settings.
    shown = repr(s) + str(s)
    assert "s3cret-pass" not in shown and "Milvus-pass" not in shown


def test_every_kafka_client_gets_the_security_settings(fake_clients):
    s = Settings(**SECURE)
    clients.producer(s)
    clients.consumer(s, "t", group_id="g")
    clients.admin(s)
    DocumentPublisher(s)._ensure_producer()
    assert Progress(s).applied_offsets() == {}
    embedder = SimpleNamespace(model_id="m", dim=4, max_tokens=256)
    Indexer(s, embedder=embedder, store=SimpleNamespace())  # its consumer, producer and DLQ
    kinds = [kind for kind, _ in fake_clients]
    assert kinds.count("FakeProducer") == 3 and kinds.count("FakeConsumer") == 2
    assert kinds.count("FakeAdmin") == 2
    for kind, kwargs in fake_clients:
        got = {k: kwargs.get(k) for k in EXPECTED_KAFKA}
        assert got == EXPECTED_KAFKA, kind


def test_milvus_clients_get_the_uri_and_token(fake_clients):
    s = Settings(**SECURE)
    store = ChunkStore(s, "m", 4)
    (made,) = FakeMilvus.made
    assert made["uri"] == "https://milvus.example:19530" and made["token"] == "root:Milvus-pass"
    assert store.client.__class__ is FakeMilvus
    ChunkStore(Settings(milvus_port=19999), "m", 4)
    assert FakeMilvus.made[-1]["uri"] == "http://127.0.0.1:19999"
    assert "token" not in FakeMilvus.made[-1]


CLIENTS = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "MilvusClient"}
CONFIGS = {"kafka_client_config", "milvus_client_config"}


def test_no_client_is_built_without_the_connection_settings():
    """Outside headwater/runtime/clients.py (tested above), every Kafka or Milvus client built
    in the code passes `**settings.kafka_client_config()` / `milvus_client_config()`."""
    offenders = []
    for package in ("headwater", "producers", "consumers", "index", "trainer", "models", "service"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "headwater" / "runtime" / "clients.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name not in CLIENTS:
                    continue
                spread = [
                    kw.value.func.attr
                    for kw in node.keywords
                    if kw.arg is None
                    and isinstance(kw.value, ast.Call)
                    and isinstance(kw.value.func, ast.Attribute)
                ]
                if not CONFIGS & set(spread):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not offenders, offenders
