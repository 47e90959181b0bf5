"""Standing queries: notified when matching content is added, changed or removed; never else."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kafka import TopicPartition

from consumers.standing import StandingMatcher
from consumers.subscriptions import NotificationStream, SubscriptionClient, read_subscriptions
from headwater.events import ChangeEvent, Hit, Notification, Subscription
from headwater.runtime.clients import admin, consumer
from headwater.settings import Settings
from headwater.versions import Stamp
from index.store import DocState, doc_key
from service.cli import main
from service.gateway import create_app
from tests.test_answerer import HANDBOOK_V1, HANDBOOK_V2, OTHER, Stack
from tests.test_generation import one_torch_thread

__all__ = ["one_torch_thread"]

QUESTION = "How many vacation days do employees get?"
PTO = "Paid time off: staff may take up to 30 days of holiday leave each year."
PARKING = "The parking garage closes at ten in the evening and opens at six in the morning."


class Live:
    """Indexer and matcher threads on the real broker and Milvus, with a subscription client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(
            update={"standing_group": f"{settings.topic_prefix}-st"}
        )
        self.stack = Stack(self.settings)
        self.matcher = StandingMatcher(self.settings, self.stack.embedder, self.stack.store)
        self.stack._start(self.matcher.run)
        self.subs = SubscriptionClient(self.settings)
        assert self.matcher.ready.wait(60)

    def next_notes(self, stream: NotificationStream, n: int = 1, timeout=60) -> list[Notification]:
        got: list[Notification] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += [note for _, note in stream.poll(0.5)]
        assert len(got) == n, got
        return got

    def settle(self, token, stream: NotificationStream) -> list[Notification]:
        """Wait until the writes up to `token` were indexed and matched; what was notified since.

        The indexer publishes its change events before committing, and the matcher commits only
        after its notifications were acknowledged: once its committed offsets reach the end of
        the changes topic, every notification those changes cause is on the topic.
        """
        self.stack.searcher.wait(str(token))
        topic = self.settings.changes_topic
        c = consumer(self.settings, group_id=None)
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        end = c.end_offsets(tps)
        c.close()
        a = admin(self.settings)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                group = self.settings.standing_group
                found = a.list_group_offsets({group: None}).get(group, {})
                done = {tp: m.offset for tp, m in found.items()}
                if all(done.get(tp, 0) >= end[tp] for tp in tps if end[tp]):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"matcher did not catch up: {done} < {end}")
        finally:
            a.close()
        return [note for _, note in stream.poll(1.0)]

    def close(self) -> None:
        self.subs.close()
        self.stack.close()


@pytest.fixture
def live(settings: Settings):
    lv = Live(settings)
    yield lv
    lv.close()


def test_notified_on_add_change_and_delete_but_not_unrelated_changes(live: Live):
    pub = live.stack.publisher
    sub = live.subs.subscribe(QUESTION, threshold=0.5)
    with live.subs.notifications(sub) as stream:
        pub.upsert("handbook.md", HANDBOOK_V1, version=1)
        (note,) = live.next_notes(stream)
        assert (note.op, note.doc_id, note.version) == ("added", "handbook.md", 1)
        assert note.subscription_id == sub.subscription_id and note.tenant == "default"
        assert [c.doc_id for c in note.matched] == ["handbook.md"]
        assert "20 vacation days" in note.matched[0].text and note.matched[0].score >= 0.5
        assert note.removed == []
        first_chunk = note.matched[0].chunk_id

        # Unrelated documents (added, changed, deleted) notify nothing.
        pub.upsert("coffee.md", OTHER)
        pub.upsert("coffee.md", OTHER + " Milk is in the fridge.")
        assert live.settle(pub.delete("coffee.md"), stream) == []

        # Changed: the new text matches, the old chunk is gone.
        pub.upsert("handbook.md", HANDBOOK_V2, version=2)
        (note,) = live.next_notes(stream)
        assert (note.op, note.version) == ("changed", 2)
        assert "25 vacation days" in note.matched[0].text
        assert [c.chunk_id for c in note.removed] == [first_chunk]
        second_chunk = note.matched[0].chunk_id

        # Edited away: nothing matches any more, and the lost match is reported.
        pub.upsert("handbook.md", PARKING, version=3)
        (note,) = live.next_notes(stream)
        assert (note.op, note.version, note.matched) == ("changed", 3, [])
        assert [c.chunk_id for c in note.removed] == [second_chunk]
        assert "25 vacation days" in note.removed[0].text

        # Another matching document, then deleted.
        pub.upsert("pto.md", PTO, version=1)
        (note,) = live.next_notes(stream)
        assert note.op == "added" and note.doc_id == "pto.md"
        pub.delete("pto.md", version=2)
        (note,) = live.next_notes(stream)
        assert (note.op, note.doc_id, note.matched) == ("deleted", "pto.md", [])
        assert len(note.removed) == 1 and "30 days" in note.removed[0].text

        # Editing the no-longer-matching document again notifies nothing.
        token = pub.upsert("handbook.md", PARKING + " Bikes go to level two.", version=4)
        assert live.settle(token, stream) == []


def test_subscriptions_over_http_and_tenants(live: Live):
    settings = live.settings.model_copy(
        update={"tenants": ["default", "other"], "api_tokens": {"tok": "default", "o": "other"}}
    )
    app = create_app(
        settings,
        searcher=live.stack.searcher,
        publisher=live.stack.publisher,
        query_client=live.stack.client,
        subscriptions=live.subs,
    )
    me, them = {"Authorization": "Bearer tok"}, {"Authorization": "Bearer o"}
    with TestClient(app) as client:
        r = client.post("/v1/subscriptions", json={"query": QUESTION, "threshold": 0.5}, headers=me)
        assert r.status_code == 200, r.text
        sid = r.json()["subscription_id"]
        r = client.post("/v1/documents", json={"doc_id": "pto.md", "text": PTO}, headers=me)
        assert r.status_code == 200
        # The stream starts at the subscription's creation: nothing was missed before this GET.
        url = f"/v1/subscriptions/{sid}/events"
        with client.stream("GET", url, params={"limit": 1, "idle": 60}, headers=me) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line.startswith(("data:", "id:"))]
        data = json.loads(next(x for x in lines if x.startswith("data:"))[5:])
        assert data["doc_id"] == "pto.md" and data["op"] == "added" and data["matched"]
        offset = next(x for x in lines if x.startswith("id:"))[3:].strip()
        # Resuming after the last event id yields nothing old (the idle limit ends the stream).
        with client.stream(
            "GET", url, params={"idle": 1}, headers={**me, "Last-Event-ID": offset}
        ) as resp:
            assert not [x for x in resp.iter_lines() if x.startswith("data:")]
        # Another tenant cannot see it; bad ids are 404 too.
        assert client.get(url, params={"limit": 1}, headers=them).status_code == 404
        assert client.get("/v1/subscriptions/nope/events", headers=me).status_code == 404
        assert client.delete(f"/v1/subscriptions/{sid}", headers=them).status_code == 404
        assert client.delete(f"/v1/subscriptions/{sid}", headers=me).json() == {"cancelled": sid}
    assert sid not in read_subscriptions(live.settings)


def test_cli_subscribe_prints_notifications(live: Live, monkeypatch, capsys):
    s = live.settings
    monkeypatch.setenv("HEADWATER_KAFKA_PORT", str(s.kafka_port))
    monkeypatch.setenv("HEADWATER_TOPIC_PREFIX", s.topic_prefix)
    result: list[int] = []
    cli = threading.Thread(
        target=lambda: result.append(
            main(["subscribe", QUESTION, "--threshold", "0.5", "--max", "1", "--json"])
        )
    )
    cli.start()
    deadline = time.monotonic() + 30
    while not read_subscriptions(s) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_subscriptions(s), "the CLI never registered its subscription"
    live.stack.publisher.upsert("pto.md", PTO)
    cli.join(60)
    assert result == [0]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("subscription ")
    note = json.loads(out[1])
    assert note["doc_id"] == "pto.md" and note["op"] == "added"


# -- matching logic with fakes -------------------------------------------------------------------


class FakeEmbedder:
    model_id, dim = "fake", 3

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts):
        return np.asarray([self.vectors[t] for t in texts], dtype=np.float32)


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.reads = 0

    def put(self, chunk_id, tenant, doc_id, text, vector):
        self.rows[chunk_id] = {"chunk_id": chunk_id, "tenant": tenant,
                               "doc_key": doc_key(tenant, doc_id),
                               "doc_id": doc_id, "version": 1, "section": "", "text": text,
                               "dense": vector}  # fmt: skip

    def chunk_rows(self, ids, *, vectors=False):
        self.reads += 1
        return [self.rows[i] for i in ids if i in self.rows]

    def search(self, vector, text, *, tenant, limit):
        assert text == ""  # dense only: cosine scores
        out = []
        for r in self.rows.values():
            if r["tenant"] == tenant:
                score = float(np.dot(vector, r["dense"]) / np.linalg.norm(r["dense"]))
                out.append(Hit(doc_id=r["doc_id"], version=1, chunk_id=r["chunk_id"],
                               score=score, text=r["text"]))  # fmt: skip
        return sorted(out, key=lambda h: -h.score)[:limit]

    def doc_states(self, keys):
        return {
            k: DocState(k, "t", k, Stamp(1, 0, 0), False, tuple(c for c, r in self.rows.items()
                                                               if r["doc_key"] == k))
            for k in keys
        }  # fmt: skip


def _change(tenant, doc_id, op, added=(), removed=(), version=1):
    return ChangeEvent(tenant=tenant, doc_id=doc_id, op=op, version=version,
                       added_chunk_ids=list(added), removed_chunk_ids=list(removed))  # fmt: skip


def test_match_by_tenant_threshold_and_removal():
    emb = FakeEmbedder({"rivers": [1, 0, 0], "lakes": [0, 1, 0]})
    store = FakeStore()
    m = StandingMatcher(Settings(), emb, store, producer=SimpleNamespace())
    m.add(Subscription(subscription_id="a" * 32, tenant="t1", query="rivers", threshold=0.8))
    m.add(Subscription(subscription_id="b" * 32, tenant="t2", query="rivers", threshold=0.8))
    m.add(Subscription(subscription_id="c" * 32, tenant="t1", query="lakes", threshold=0.8))
    store.put("c1", "t1", "d1", "about rivers", [0.9, 0.1, 0])
    store.put("c2", "t1", "d1", "about stones", [0, 0, 1])
    (note,) = m.match(_change("t1", "d1", "added", ["c1", "c2"]))
    assert note.subscription_id == "a" * 32 and [c.chunk_id for c in note.matched] == ["c1"]
    assert note.matched[0].score == pytest.approx(0.9 / np.linalg.norm([0.9, 0.1]), abs=1e-5)
    # Other tenant's changes never reach t1's subscriptions, and cost no read without any.
    reads = store.reads
    assert m.match(_change("t3", "d9", "added", ["c1"])) == []
    assert store.reads == reads
    # Removing an unmatched chunk is silent; removing the matched one is reported.
    assert m.match(_change("t1", "d1", "changed", removed=["c2"], version=2)) == []
    (note,) = m.match(_change("t1", "d1", "deleted", removed=["c1"], version=3))
    assert note.op == "deleted" and [c.chunk_id for c in note.removed] == ["c1"]
    assert m.standing["a" * 32].matched == {}


def test_new_subscription_is_seeded_with_existing_matches():
    emb = FakeEmbedder({"rivers": [1, 0, 0]})
    store = FakeStore()
    store.put("c1", "t1", "d1", "about rivers", [1, 0, 0])
    store.put("c2", "t1", "d2", "about stones", [0, 1, 0])
    store.put("c3", "t2", "d3", "rivers elsewhere", [1, 0, 0])
    m = StandingMatcher(Settings(), emb, store, producer=SimpleNamespace())
    m.add(Subscription(subscription_id="a" * 32, tenant="t1", query="rivers", threshold=0.5))
    assert set(m.standing["a" * 32].matched) == {"c1"}
    (note,) = m.match(_change("t1", "d1", "deleted", removed=["c1"], version=2))
    assert note.removed[0].text == "about rivers"
    # Cancelling through the topic record removes it.
    m._apply_subscription(b"a" * 32, None)
    assert m.standing == {}
