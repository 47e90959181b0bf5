"""Change-data input: CloudEvents (both Kafka bindings), Debezium envelopes and null-value deletes.

CloudEvents are built with the `cloudevents` SDK's own Kafka binding helpers; the Debezium events
are the documentation's examples (tests/data/debezium_postgresql_customers.json says where from).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from kafka.admin import NewTopic

from consumers.indexer import Indexer
from consumers.intake import Intake
from headwater.errors import EventError, NoChange
from headwater.runtime.clients import admin, producer
from headwater.runtime.deadletter import DeadLetter
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings
from index.store import ChunkStore, doc_key
from tests.test_generation import shared_embedder

DEBEZIUM = json.loads(
    (Path(__file__).parent / "data" / "debezium_postgresql_customers.json").read_text()
)
COLUMNS = {"doc_id": "id", "text": "first_name"}


def upsert(subject: str, text: str, **attrs) -> CloudEvent:
    return CloudEvent(
        attributes={"type": "com.example.docs.updated", "source": "/cms", "subject": subject,
                    "datacontenttype": "application/json", **attrs},
        data={"text": text, "metadata": {"lang": "en"}},
    )  # fmt: skip


def record(msg=None, *, topic="t.documents", key=None, value=None, headers=None, offset=7):
    """A consumed record as kafka-python hands it over (headers: a list of (name, bytes))."""
    if msg is not None:
        key, value, headers = msg.key, msg.value, list(msg.headers.items())
    return SimpleNamespace(topic=topic, key=key, value=value, headers=headers or [],
                           timestamp=1_700_000_000_000, offset=offset, partition=0)  # fmt: skip


@pytest.fixture
def intake():
    """The real Intake; returns the event (its log position is checked where it matters)."""
    s = Settings(tenants=["default", "acme"], topic_prefix="t", debezium_topics=["db.customers"],
                 debezium_columns=COLUMNS, debezium_metadata_columns=["email"])  # fmt: skip
    real = Intake(s)
    return lambda rec: real(rec).event


# -- the mapping (pure logic: fake records, the real Intake) -------------------------------------


def test_cloudevents_both_kafka_bindings_map_field_by_field(intake):
    event = upsert("docs/a.md", "Alpha text.", tenant="acme", version="42")
    for msg in (ce_kafka.to_binary_event(event), ce_kafka.to_structured_event(event)):
        doc = intake(record(msg))
        attrs = event.get_attributes()
        assert (doc.tenant, doc.doc_id, doc.op, doc.version) == ("acme", "docs/a.md", "upsert", 42)
        assert doc.text == "Alpha text." and doc.metadata == {"lang": "en"}
        assert doc.event_id == attrs["id"] and doc.source == "ce:/cms"
        assert doc.ts == attrs["time"]
    # No version anywhere: the record's place in the log orders it; no tenant: the default.
    plain = CloudEvent(attributes={"type": "docs.deleted", "source": "/cms", "subject": "b.md"})
    doc = intake(record(ce_kafka.to_binary_event(plain), offset=1234))
    assert (doc.tenant, doc.op, doc.text, doc.version) == ("default", "delete", None, None)
    s = Settings(tenants=["default"], topic_prefix="t")
    logged = Intake(s)(record(ce_kafka.to_binary_event(plain), offset=1234))
    assert (logged.stamp.version, logged.stamp.offset, logged.stamp.reported) == (None, 1234, 1234)
    text = CloudEvent(
        attributes={"type": "x.create", "source": "s", "subject": "c.md",
                    "datacontenttype": "text/markdown"}, data="# Title\n\nBody.",
    )  # fmt: skip
    for msg in (ce_kafka.to_binary_event(text), ce_kafka.to_structured_event(text)):
        assert intake(record(msg)).text == "# Title\n\nBody."


def test_bad_cloudevents_say_why(intake):
    cases = {
        "neither an upsert nor a delete": upsert("a.md", "x", type="com.example.docs.archived"),
        "no subject": CloudEvent(attributes={"type": "a.upsert", "source": "s"}, data="x"),
        "unknown tenant": upsert("a.md", "x", tenant="mallory"),
        "version extension": upsert("a.md", "x", version="yesterday-ish"),
    }
    for reason, event in cases.items():
        for msg in (ce_kafka.to_binary_event(event), ce_kafka.to_structured_event(event)):
            with pytest.raises(EventError, match=reason):
                intake(record(msg))
    wrong_key = upsert("a.md", "x", partitionkey="default/b.md")  # b.md's partition, not a.md's
    with pytest.raises(EventError, match="key does not match"):
        intake(record(ce_kafka.to_structured_event(wrong_key)))
    no_text = CloudEvent(attributes={"type": "a.upsert", "source": "s", "subject": "a"},
                         data={"body": "x"})  # fmt: skip
    with pytest.raises(EventError, match=r"needs data\.text"):
        intake(record(ce_kafka.to_structured_event(no_text)))


def test_null_values_delete_the_document_their_key_names(intake):
    doc = intake(record(key=b"acme/notes/a.md", value=None))
    assert (doc.tenant, doc.doc_id, doc.op) == ("acme", "notes/a.md", "delete")
    for key in (None, b"no-slash", b"acme/"):
        with pytest.raises(EventError, match="null value"):
            intake(record(key=key, value=None))
    with pytest.raises(EventError, match="unknown tenant"):
        intake(record(key=b"mallory/a.md", value=None))


def test_debezium_documentation_examples_map_to_document_events(intake):
    key = json.dumps(DEBEZIUM["key"]).encode()
    on = {"topic": "db.customers", "key": key}
    created = intake(record(**on, value=json.dumps(DEBEZIUM["create"]).encode()))
    assert (created.doc_id, created.op, created.text) == ("1", "upsert", "Anne")
    assert created.metadata == {"email": "annek@noanswer.org"}
    assert created.source == "debezium:PostgreSQL_server.public.customers"
    updated = intake(record(**on, value=json.dumps(DEBEZIUM["update"]).encode()))
    assert (updated.doc_id, updated.text) == ("1", "Anne Marie")
    deleted = intake(record(**on, value=json.dumps(DEBEZIUM["delete"]).encode()))
    assert (deleted.doc_id, deleted.op, deleted.text) == ("1", "delete", None)
    tombstone = intake(record(**on, value=None))
    assert (tombstone.doc_id, tombstone.op) == ("1", "delete")
    # The same bytes on the documents topic are not a Debezium event: decoding is by topic.
    with pytest.raises(EventError):
        intake(record(key=key, value=json.dumps(DEBEZIUM["create"]).encode()))
    with pytest.raises(NoChange):
        intake(record(topic="db.customers", key=b'"opaque"', value=None))
    truncate = {"source": DEBEZIUM["delete"]["source"], "op": "t", "ts_ms": 1}
    with pytest.raises(EventError, match="truncate"):
        intake(record(topic="db.customers", key=None, value=json.dumps(truncate).encode()))


def test_debezium_version_and_tenant_columns():
    s = Settings(tenants=["default", "acme"], debezium_topics=["db.docs"],
                 debezium_columns={"doc_id": "slug", "text": "body", "version": "updated_at",
                                   "tenant": "org"})  # fmt: skip
    row = {"slug": "faq", "body": "Q and A", "org": "acme", "updated_at": "2026-01-02T03:04:05Z"}
    value = json.dumps({"before": None, "after": row, "op": "c", "source": {}}).encode()
    doc = Intake(s)(record(topic="db.docs", value=value)).event
    assert (doc.tenant, doc.doc_id, doc.version) == ("acme", "faq", 1767323045000000)
    with pytest.raises(EventError, match="'org'"):
        bad = {**row, "org": None}
        Intake(s)(record(topic="db.docs", value=json.dumps({"after": bad, "op": "u"}).encode()))


# -- on the real broker and Milvus Lite ---------------------------------------------------------


def test_change_data_reaches_the_index_through_kafka(settings):
    s = settings.model_copy(update={
        "tenants": ["default", "acme"], "debezium_topics": [f"{settings.topic_prefix}.pg.rows"],
        "debezium_columns": COLUMNS, "debezium_metadata_columns": ["last_name"],
    })  # fmt: skip
    a = admin(s)
    try:
        a.create_topics([NewTopic(s.debezium_topics[0], 2, 1)])  # Kafka Connect's topic
    finally:
        a.close()
    embedder = shared_embedder(s)
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    indexer = Indexer(s, embedder, store)
    stop = threading.Event()
    thread = threading.Thread(target=indexer.run, args=(stop,), daemon=True)
    thread.start()
    p = producer(s)

    def put(msg, topic=s.documents_topic, key=None) -> None:
        key = key or msg.key
        key = key.encode() if isinstance(key, str) else key  # the SDK's keys are text
        p.send(topic, key=key, value=msg.value, headers=list(msg.headers.items())).get(timeout=30)

    def state(tenant: str, doc_id: str, want) -> object:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = store.doc_states([doc_key(tenant, doc_id)]).get(doc_key(tenant, doc_id))
            if want(got):
                return got
            time.sleep(0.2)
        raise AssertionError(f"{tenant}/{doc_id}: {got}")

    try:
        binary = ce_kafka.to_binary_event(upsert("docs/a.md", "Binary mode text.", tenant="acme"))
        put(binary, key=b"acme/docs/a.md")
        b = upsert("docs/b.md", "Structured mode text.", partitionkey="default/docs/b.md")
        put(ce_kafka.to_structured_event(b))  # the SDK keys it by its partitionkey
        put(SimpleNamespace(key=b"default/docs/c.md", value=None, headers={}))  # delete of c
        put(ce_kafka.to_structured_event(upsert("x.md", "x", type="docs.archived")), key=b"x/x.md")
        key = json.dumps(DEBEZIUM["key"]).encode()
        for name in ("create", "update"):
            put(SimpleNamespace(key=key, value=json.dumps(DEBEZIUM[name]).encode(), headers={}),
                topic=s.debezium_topics[0])  # fmt: skip
        a = state("acme", "docs/a.md", lambda st: st is not None and not st.deleted)
        assert a.metadata == {"lang": "en"}
        assert list(store.texts(a.chunk_ids).values()) == ["Binary mode text."]
        state("default", "docs/b.md", lambda st: st is not None and not st.deleted)
        state("default", "docs/c.md", lambda st: st is not None and st.deleted)
        row = state("default", "1", lambda st: st is not None and st.metadata)
        assert list(store.texts(row.chunk_ids).values()) == ["Anne Marie"]
        assert row.metadata == {"last_name": "Kretchmar"}

        put(SimpleNamespace(key=key, value=json.dumps(DEBEZIUM["delete"]).encode(), headers={}),
            topic=s.debezium_topics[0])  # fmt: skip
        put(SimpleNamespace(key=key, value=None, headers={}), topic=s.debezium_topics[0])
        put(ce_kafka.to_binary_event(CloudEvent(attributes={
            "type": "docs.deleted", "source": "/cms", "subject": "docs/a.md", "tenant": "acme"})),
            key=b"acme/docs/a.md")  # fmt: skip
        state("default", "1", lambda st: st is not None and st.deleted)
        state("acme", "docs/a.md", lambda st: st is not None and st.deleted)
    finally:
        stop.set()
        thread.join(30)
        p.close()
        store.close()
    dead = [DeadLetter.from_record(r) for r in read_to_end(s, s.dlq_topic, timeout_s=30)]
    assert [d.key for d in dead] == [b"x/x.md"]
    assert [d.error for d in dead] == [
        "type 'docs.archived' is neither an upsert nor a delete (its last word must be one of "
        "changed, create, created, delete, deleted, put, remove, removed, update, updated, "
        "upsert, upserted)"
    ]
    assert indexer.stats.dead_lettered == 1
