"""The consumer runtime on the real broker: produced records that fail, and readers that outlive
a broker outage."""

from __future__ import annotations

import threading
import time

from kafka.admin import ConfigResource, ConfigResourceType

from consumers.adapters import AdapterFollower
from consumers.answerer import Answerer
from consumers.replies import QueryClient
from headwater.errors import ProduceFailed
from headwater.events import AdapterAnnouncement, DocumentEvent, Hit
from headwater.progress import Progress
from headwater.runtime.clients import admin, producer
from headwater.runtime.deadletter import DeadLetter, DeadLetters
from headwater.topics import ensure_topics
from models.adapters import adapters_root, announcement_key
from tests.chaos import IndexerThread, kill_daemon, private_broker, read_topic
from tests.indexing import send
from tests.test_generation import V1, V2, one_torch_thread, tiny_adapters, tiny_generator

__all__ = ["one_torch_thread"]  # the autouse fixture, imported to apply here too


def _limit_topic(settings, topic: str, max_bytes: int) -> None:
    client = admin(settings)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic,
                                  configs={"max.message.bytes": str(max_bytes)})  # fmt: skip
        client.alter_configs([resource], raise_on_unknown=False)
    finally:
        client.close()


def test_a_refused_change_event_is_dead_lettered_before_its_offset_is_committed(settings, embedder):
    """The broker refuses every change event (over the topic's max.message.bytes, for good):
    the document's offset must not be committed until its record is dead-lettered, with why."""
    _limit_topic(settings, settings.changes_topic, 512)  # a change event carries 384 floats
    docs = [DocumentEvent(tenant="default", doc_id=f"big{i}.md", op="upsert", version=1,
                          text=f"# Big {i}\n\nSome text about rivers and lakes {i}.")
            for i in range(3)]  # fmt: skip
    send(settings, docs)
    seen: list[tuple[str, int, int]] = []  # (reason, offset, committed offset at that moment)
    dead_letters = DeadLetters(settings.dlq_topic)
    progress = Progress(settings)

    def policy(exc, record, out):
        committed = progress.applied_offsets().get(record.partition, 0)
        seen.append((str(exc), record.offset, committed))
        assert isinstance(exc, ProduceFailed)
        dead_letters(exc, record, out)

    member = IndexerThread(settings, embedder, on_error=policy)
    try:
        deadline = time.monotonic() + 120
        while not progress.caught_up() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert progress.caught_up(), "the indexer never committed past the refused records"
    finally:
        member.close()
        progress.close()
    assert len(seen) == 3
    for reason, offset, committed in seen:
        assert "MessageSizeTooLarge" in reason, reason
        assert committed <= offset, "committed past a record whose change event was refused"
    letters = [DeadLetter.from_record(r) for r in read_topic(settings, settings.dlq_topic)]
    assert sorted(d.offset for d in letters) == sorted(o for _, o, _ in seen)
    assert {d.stage for d in letters} == {"produce"}
    assert all("MessageSizeTooLarge" in d.error and d.value for d in letters)
    assert read_topic(settings, settings.changes_topic) == []


class _Searcher:
    def search(self, query, *, tenant, k=5, token=None):
        return [Hit(doc_id="a.md", version=1, chunk_id="c1", score=1.0, text="Rivers flow.")]


def _announce(settings, version: str) -> None:
    p = producer(settings)
    event = AdapterAnnouncement(tenant="default", version=version, base_model="tiny")
    p.send(settings.adapters_topic, key=announcement_key("default"), value=event.to_bytes()).get(30)
    p.close()


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_follower_and_query_client_recover_from_a_broker_outage(settings, tmp_path):
    with private_broker(settings, tmp_path / "broker") as (own, broker):
        own = own.model_copy(update={"query_timeout_s": 120.0})
        ensure_topics(own)
        generator = tiny_generator(max_new_tokens=4)
        tiny_adapters(adapters_root(own) / "default", generator.tokenizer, versions=(V1, V2))
        _announce(own, V1)
        stop = threading.Event()
        follower = AdapterFollower(own, generator)
        answerer = Answerer(own, _Searcher(), None, follow_adapters=False)
        threads = [threading.Thread(target=t.run, args=(stop,), daemon=True)
                   for t in (follower, answerer)]  # fmt: skip
        for t in threads:
            t.start()
        client = QueryClient(own)
        try:
            assert follower.ready.wait(60) and generator.current("default") == f"default/{V1}"
            assert answerer.ready.wait(60)
            assert [h.chunk_id for h in client.search("rivers?")] == ["c1"]

            kill_daemon(broker.daemon)  # kill -9: no goodbye to any client
            time.sleep(5)  # every client notices: polls fail, connections drop
            broker.start()

            _announce(own, V2)
            assert _until(lambda: generator.current("default") == f"default/{V2}", 120), (
                "the follower did not recover"
            )
            assert [h.chunk_id for h in client.search("rivers?")] == ["c1"]
            events = list(client.ask("rivers again?"))
            assert events[-1].kind == "done", events[-1]
        finally:
            stop.set()
            client.close()
            for t in threads:
                t.join(30)
        assert not any(t.is_alive() for t in threads), "a loop did not stop on its stop event"
