"""Hostile input through the whole indexer, and the small hostile cases (issue 11, 5 and 8).

A document the indexer cannot handle in its bounds (chunking time, chunks per document) is
dead-lettered with the reason, alone: the rest of its batch, other tenants' documents included,
is indexed, and the index equals the topic (minus what was dead-lettered) afterwards.
"""

from __future__ import annotations

import json
import unicodedata
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pymilvus import MilvusClient

from consumers.indexer import Indexer
from headwater.errors import DeliveryError, StoreError
from headwater.events import DocumentEvent
from headwater.runtime.clients import max_record_bytes
from headwater.settings import Settings
from index.search import Searcher
from index.store import ChunkStore, doc_key
from service.gateway import create_app
from tests.chaos import assert_truth, truth
from tests.indexing import drain, send
from tests.test_reliability import dead_letters


def doc(doc_id: str, text: str | None, tenant: str = "default") -> DocumentEvent:
    op = "upsert" if text is not None else "delete"
    return DocumentEvent(tenant=tenant, doc_id=doc_id, op=op, text=text)


def good(i: int, tenant: str = "default") -> DocumentEvent:
    return doc(f"good-{i}.md", f"# Good {i}\n\nreliable content number {i}", tenant)


def found(ix: Indexer, tenant: str, query: str = "reliable content number") -> set[str]:
    searcher = Searcher(ix.settings, ix.embedder, ix.store)
    return {h.doc_id for h in searcher.search(query, tenant=tenant, k=20)}


@pytest.fixture
def two_tenants(settings: Settings) -> Settings:
    return settings.model_copy(update={"tenants": ["default", "other"]})


def test_a_document_over_its_chunking_budget_is_dead_lettered_alone(two_tenants, embedder):
    # ~1.9 MB of one-line sections take seconds to chunk: far over a 0.2 s budget. Small
    # documents take microseconds of it.
    # The chunk limit would stop it first (it is checked as chunks are made): lift it here.
    s = two_tenants.model_copy(update={"chunk_budget_s": 0.2, "max_doc_chunks": 1_000_000})
    hostile = "".join(f"# h{i}\n" for i in range(200_000))
    assert len(hostile) < s.max_text_bytes
    send(s, [good(0), doc("hostile.md", hostile), good(1, "other"), good(2)])
    ix = Indexer(s, embedder=embedder)
    try:
        drain(ix)
        (letter,) = dead_letters(s)
        assert letter.stage == "chunk" and "budget" in letter.error
        assert json.loads(letter.value)["doc_id"] == "hostile.md"
        assert found(ix, "default") == {"good-0.md", "good-2.md"}
        assert found(ix, "other") == {"good-1.md"}
        assert ix.stats.dead_lettered == 1
    finally:
        ix.close()
    assert_truth(truth(s, embedder))


def test_too_many_chunks_is_dead_lettered_and_the_last_good_version_stays(two_tenants, embedder):
    s = two_tenants.model_copy(update={"max_doc_chunks": 50})
    sections = "\n\n".join(f"## Part {i}\n\nline {i}" for i in range(200))
    v1 = doc("manual.md", "# Manual\n\nversion one of the manual")
    # In one batch: a good version, then one over the bound, then another tenant's document.
    send(s, [v1, doc("manual.md", sections), good(0, "other")])
    ix = Indexer(s, embedder=embedder)
    try:
        drain(ix)
        (letter,) = dead_letters(s)
        assert letter.stage == "chunk"
        assert "more than 50 chunks" in letter.error and "MAX_DOC_CHUNKS" in letter.error
        key = doc_key("default", "manual.md")
        state = ix.store.doc_states([key])[key]
        assert not state.deleted and len(state.chunk_ids) == 1  # version one, not nothing
        assert found(ix, "other") == {"good-0.md"}
    finally:
        ix.close()
    assert_truth(truth(s, embedder))


def test_an_oversize_record_after_lowering_the_limit_is_dead_lettered_as_a_reference(
    settings, embedder
):
    """Point 5: records written under a larger `max_text_bytes` than the indexer now has. The
    dead letter of the original is too large for the indexer's producer: a reference goes to
    the dead-letter topic instead, and indexing goes on."""
    big = doc("big.md", "# Big\n\n" + "word " * 300_000)  # 1.5 MB: fine under the default
    send(settings, [good(0), big, good(1)])
    low = settings.model_copy(update={"max_text_bytes": 100_000})
    assert len(big.to_bytes()) > max_record_bytes(low)  # the indexer's producer refuses it
    ix = Indexer(low, embedder=embedder)
    try:
        drain(ix)
        (letter,) = dead_letters(low)
        assert letter.truncated and letter.value is None
        assert letter.stage == "parse" and "larger than the limit" in letter.error
        assert letter.topic == low.documents_topic and letter.offset >= 0
        assert found(ix, "default") == {"good-0.md", "good-1.md"}
    finally:
        ix.close()


def test_tombstones_delete_and_doc_ids_are_nfc(settings, embedder):
    nfc = "caf\u00e9.md"
    nfd = unicodedata.normalize("NFD", nfc)
    raw = json.loads(doc(nfc, "x").to_bytes())
    send(settings, [
        doc("gone.md", "# Gone\n\nreliable content number 9"),
        good(1),
        (b"default/gone.md", None),  # the ecosystem's tombstone: a delete
        # A decomposed doc id under the composed key: one document, stored composed.
        (f"default/{nfc}".encode(), json.dumps({**raw, "doc_id": nfd,
                                                "text": "# Cafe\n\nreliable content number 3"})
         .encode()),
        # Under the decomposed key it could land on another partition: refused.
        (f"default/{nfd}".encode(), json.dumps({**raw, "doc_id": nfd}).encode()),
    ])  # fmt: skip
    ix = Indexer(settings, embedder=embedder)
    try:
        drain(ix)
        (letter,) = dead_letters(settings)
        assert "NFC" in letter.error
        key = doc_key("default", "gone.md")
        assert ix.store.doc_states([key])[key].deleted
        assert found(ix, "default") == {"good-1.md", nfc}
    finally:
        ix.close()
    assert_truth(truth(settings, embedder))


# -- small ones: auth, headers, limits, secrets, error bodies, ids ---------------------------------


class Refusing:
    """A publisher and searcher whose service is down, with internals in their messages."""

    def upsert(self, *args, **kwargs):
        raise DeliveryError("not acknowledged by 10.1.2.3:9092 within 15 s: KafkaTimeoutError")

    def delete(self, *args, **kwargs):
        raise DeliveryError("could not send to t.documents on 10.1.2.3:9092")

    def search(self, *args, **kwargs):
        raise StoreError("Milvus search failed: <MilvusException: (code=65535, message=segcore)>")


@pytest.fixture
def api():
    s = Settings(tenants=["a"], default_tenant="a", api_tokens={"tok-a": "a", "tøk-b": "a"})
    app = create_app(s, searcher=Refusing(), publisher=Refusing(), query_client=None,
                     subscriptions=SimpleNamespace())  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_non_ascii_bearer_tokens_are_401_not_500(api):
    for token in ("tøk-a", "тест", "\u00ff" * 40, "tok-a\u00e9"):
        r = api.get("/v1/search", params={"q": "x"},
                    headers={"Authorization": f"Bearer {token}".encode()})  # fmt: skip
        assert r.status_code == 401, (token, r.status_code)
    # A configured non-ASCII token works (compared as UTF-8 bytes; sent as the header's bytes).
    r = api.get("/v1/search", params={"q": "x"},
                headers={"Authorization": "Bearer tøk-b".encode()})  # fmt: skip
    assert r.status_code == 503


def test_a_bad_last_event_id_is_422_not_500(api):
    sid = "0" * 32
    for bad in ("²", "1e3", "-1", "12 ", "9" * 30):
        r = api.get(f"/v1/subscriptions/{sid}/events", headers={
            "Authorization": "Bearer tok-a", "Last-Event-ID": bad.encode()})  # fmt: skip
        assert r.status_code == 422, (bad, r.status_code, r.text)


def test_versions_past_int64_are_422_at_the_api(api):
    auth = {"Authorization": "Bearer tok-a"}
    for version in (2**63, 2**64 + 5):
        r = api.post("/v1/documents", json={"doc_id": "d", "text": "t", "version": version},
                     headers=auth)  # fmt: skip
        assert r.status_code == 422 and "version" in r.text
        r = api.delete("/v1/documents/d", params={"version": version}, headers=auth)
        assert r.status_code == 422


def test_error_bodies_name_the_failure_without_internals(api, caplog):
    auth = {"Authorization": "Bearer tok-a"}
    r = api.post("/v1/documents", json={"doc_id": "d", "text": "t"}, headers=auth)
    assert r.status_code == 503 and "Kafka" in r.json()["detail"]
    r2 = api.get("/v1/search", params={"q": "x"}, headers=auth)
    assert r2.status_code == 503 and "Milvus" in r2.json()["detail"]
    for body in (r.text, r2.text, api.delete("/v1/documents/d", headers=auth).text):
        assert "10.1.2.3" not in body and "9092" not in body and "segcore" not in body
    assert "10.1.2.3:9092" in caplog.text and "segcore" in caplog.text  # the log keeps them


def test_settings_reprs_hide_api_tokens():
    s = Settings(api_tokens={"s3cret-tenant-token": "a"}, api_token="adm1n-secret")
    shown = repr(s) + str(s) + repr(s.model_dump(exclude={"api_tokens", "api_token"}))
    assert "s3cret-tenant-token" not in shown and "adm1n-secret" not in shown
    assert s.api_tokens == {"s3cret-tenant-token": "a"}  # still there for the gateway


def test_every_id_reaching_pymilvus_is_checked(settings, embedder):
    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    try:
        for hostile in ('x" or tenant != "', "a\n", "", "é", "x" * 65):
            with pytest.raises(ValueError, match="Milvus"):
                store._call(store.client.query, store.chunks, ids=[hostile])
            with pytest.raises(ValueError, match="Milvus"):
                store._call(store.client.get, store.docs, ids=["ok", hostile])
            with pytest.raises(ValueError, match="filter expression"):
                store.doc_states([hostile])
        assert store._call(store.client.get, store.docs, ids=["a" * 40]) == []
    finally:
        store.close()
    assert isinstance(store.client, MilvusClient)
