"""The query consumer on the real broker and Milvus Lite: streamed answers, errors, hot swap."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from consumers.answerer import (
    NO_PASSAGES,
    Answerer,
    _trace,
    build_prompt,
    reply_topic_for,
)
from consumers.indexer import Indexer
from consumers.replies import QueryClient
from headwater.errors import InvalidInput, QueryTimeout, StoreError, UnknownTenantError
from headwater.events import AdapterAnnouncement, AnswerEvent, ChatTurn, Hit, QueryEvent
from headwater.runtime.clients import admin, consumer, producer
from headwater.settings import Settings
from index.search import Searcher
from index.store import ChunkStore
from models.adapters import adapters_root, announcement_key
from producers.publisher import DocumentPublisher
from service.cli import main
from tests.test_generation import (
    V1,
    V2,
    Gate,
    one_torch_thread,
    shared_embedder,
    tiny_adapters,
    tiny_generator,
)

__all__ = ["one_torch_thread"]  # the autouse fixture, imported to apply here too

HANDBOOK_V1 = (
    "Vacation policy. Employees get 20 vacation days per year. Unused days expire in March. "
    "Requests go to your manager two weeks ahead."
)
HANDBOOK_V2 = (
    "Vacation policy. Employees get 25 vacation days per year. Unused days carry over to the "
    "next year. Requests go to your manager two weeks ahead."
)
OTHER = "The office coffee machine is cleaned every Friday afternoon by the facilities team."


# -- the real stack ------------------------------------------------------------------------------


class Stack:
    """Indexer (in a thread), searcher, publisher and query client on one test's topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedder = shared_embedder(settings)
        self.store = ChunkStore(settings, self.embedder.model_id, self.embedder.dim)
        self.searcher = Searcher(settings, self.embedder, self.store)
        self.publisher = DocumentPublisher(settings)
        self.client = QueryClient(settings)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.answerer: Answerer | None = None
        self._start(Indexer(settings, self.embedder, self.store).run)

    def _start(self, target) -> None:
        t = threading.Thread(target=target, args=(self.stop,), daemon=True)
        t.start()
        self.threads.append(t)

    def start_answerer(self, generator=None, **kw) -> Answerer:
        self.answerer = Answerer(self.settings, self.searcher, generator, **kw)
        self._start(self.answerer.run)
        assert self.answerer.ready.wait(60), "answerer never got its partitions"
        return self.answerer

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.client.close()
        self.publisher.close()
        self.store.close()


@pytest.fixture
def stack(settings: Settings):
    s = Stack(settings)
    yield s
    s.close()


def _events(stream) -> list[AnswerEvent]:
    return list(stream)


def _read_answer(settings: Settings, query_id: str, timeout: float = 30.0) -> list[AnswerEvent]:
    """The answer events of one query, read from the answers topic's beginning."""
    c = consumer(settings, settings.answers_topic, group_id=None, consumer_timeout_ms=500)
    out: list[AnswerEvent] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for record in c:
                if record.key == query_id.encode():
                    out.append(AnswerEvent.model_validate_json(record.value))
                    if out[-1].kind in ("done", "error"):
                        return out
    finally:
        c.close()
    raise AssertionError(f"no final event for {query_id}: {out}")


def _committed(settings: Settings) -> int:
    a = admin(settings)
    try:
        found = a.list_group_offsets({settings.query_group: None})
    finally:
        a.close()
    offsets = found.get(settings.query_group, {})
    return sum(m.offset for tp, m in offsets.items() if tp.topic == settings.queries_topic)


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- real-stack tests ----------------------------------------------------------------------------


def test_ask_streams_hits_tokens_then_done_citing_the_latest_version(stack: Stack):
    stack.publisher.upsert("handbook.md", HANDBOOK_V1, version=1)
    stack.publisher.upsert("coffee.md", OTHER, version=1)
    token = stack.publisher.upsert("handbook.md", HANDBOOK_V2, version=2)
    stack.start_answerer()  # no generator: extractive answers
    events = _events(stack.client.ask("How many vacation days do employees get?", token=token))
    kinds = [e.kind for e in events]
    assert kinds[0] == "hits" and kinds[-1] == "done"
    assert kinds.count("token") >= 2 and set(kinds[1:-1]) == {"token"}
    assert [e.seq for e in events] == list(range(len(events)))
    hits = events[0].hits
    assert hits and hits[0].doc_id == "handbook.md"
    for h in hits:
        if h.doc_id == "handbook.md":
            assert h.version == 2 and "25 vacation days" in h.text and "20 vacation" not in h.text
    answer = "".join(e.text for e in events if e.kind == "token")
    assert "25 vacation days" in answer and "[1]" in answer
    done = events[-1]
    assert set(done.timing) >= {"retrieve_ms", "first_token_ms", "total_ms"}
    assert done.adapter_version is None
    # The query's offset is committed once its done was produced.
    assert _wait(lambda: _committed(stack.settings) == 1)


def test_search_mode_and_empty_results(stack: Stack):
    token = stack.publisher.upsert("coffee.md", OTHER)
    stack.start_answerer()
    hits = stack.client.search("When is the coffee machine cleaned?", token=token, k=3)
    assert [h.doc_id for h in hits] == ["coffee.md"]
    events = _events(stack.client.ask("coffee machine", mode="search", token=token))
    assert [e.kind for e in events] == ["hits", "done"]
    # Deleted: no passage left, and the answer says so instead of inventing one.
    token = stack.publisher.delete("coffee.md")
    events = _events(stack.client.ask("When is the coffee machine cleaned?", token=token))
    assert events[0].hits == []
    assert [e.kind for e in events] == ["hits", "token", "done"]
    assert events[1].text == NO_PASSAGES


def test_bad_queries_get_errors_and_never_stop_the_loop(settings: Settings):
    s = settings.model_copy(update={"freshness_wait_s": 2.0})
    stack = Stack(s)
    try:
        _bad_queries(stack)
    finally:
        stack.close()


def _bad_queries(stack: Stack) -> None:
    s = stack.settings
    answerer = stack.start_answerer()
    p = producer(s)
    try:
        p.send(s.queries_topic, value=b"\xff not json").get(30)
        p.send(s.queries_topic, value=b'{"query_id": "q-malformed", "tenant": "default"}').get(30)
        unknown = QueryEvent(tenant="nobody", text="hello", reply_topic=s.documents_topic)
        p.send(s.queries_topic, value=unknown.to_bytes()).get(30)
        stale = QueryEvent(tenant="default", text="hello", token="0:999999")
        p.send(s.queries_topic, value=stale.to_bytes()).get(30)
    finally:
        p.close()
    malformed = _read_answer(s, "q-malformed")
    assert [e.kind for e in malformed] == ["error"]
    assert "malformed query" in malformed[0].error and "text" in malformed[0].error
    # An unknown tenant is refused, and a reply topic outside answers.* is not written to.
    refused = _read_answer(s, unknown.query_id)
    assert [e.kind for e in refused] == ["error"] and "unknown tenant" in refused[0].error
    c = consumer(s, s.documents_topic, group_id=None, consumer_timeout_ms=1000)
    assert [r for r in c] == []
    c.close()
    # A token the index never reaches: a bounded wait, then a clear error.
    stale_events = _read_answer(s, stale.query_id)
    assert stale_events[-1].kind == "error" and "token" in stale_events[-1].error
    # The loop is alive: a good query is answered after all of that.
    events = _events(stack.client.ask("anything", mode="search"))
    assert events[-1].kind == "done"
    assert answerer.errors >= 4
    assert _wait(lambda: _committed(s) == 5)


def test_client_times_out_clearly_without_an_answerer(stack: Stack):
    stream = stack.client.ask("is anyone there?", timeout=1.5)
    with pytest.raises(QueryTimeout, match="is an answerer running"):
        list(stream)
    with pytest.raises(UnknownTenantError, match="unknown tenant"):
        stack.client.ask("hello", tenant="nobody")
    with pytest.raises(InvalidInput, match="invalid query"):
        stack.client.ask("")


def test_adapter_swap_while_twenty_queries_stream(stack: Stack, tmp_path):
    s = stack.settings
    token = stack.publisher.upsert("handbook.md", HANDBOOK_V2)
    assert stack.searcher.search("vacation", tenant="default", token=token)
    generator = tiny_generator(max_new_tokens=16)
    paths = tiny_adapters(adapters_root(s) / "default", generator.tokenizer, versions=(V1, V2))
    n1, n2 = f"default/{V1}", f"default/{V2}"

    def announce(version: str) -> None:
        p = producer(s)
        ann = AdapterAnnouncement(tenant="default", version=version, base_model="tiny")
        p.send(s.adapters_topic, key=announcement_key("default"), value=ann.to_bytes()).get(30)
        p.close()

    announce(V1)
    stack.start_answerer(generator)
    assert _wait(lambda: generator.current("default") == n1)
    # Loading needs the model between two steps; have v2 on hand so that the swap itself can
    # happen while a step is held inside the model (the follower's load is then a no-op).
    generator.load_adapter(n1)
    generator.load_adapter(n2, paths[V2])
    gate = Gate(generator.base)  # the first step is held inside the model
    question = "How many vacation days do employees get?"
    streams = [stack.client.ask(question, timeout=120) for _ in range(20)]
    assert gate.entered.wait(60)
    announce(V2)
    assert _wait(lambda: generator.current("default") == n2)
    gate.release()
    answers = [_events(st) for st in streams]
    finals = [a[-1] for a in answers]
    assert [f.kind for f in finals] == ["done"] * 20, [f.error for f in finals]
    used = [f.adapter_version for f in finals]
    assert n1 in used and n2 in used and set(used) == {n1, n2}
    assert used.count(n1) <= s.query_workers  # only queries already generating kept v1
    # Each answer is exactly what its adapter generates for that prompt alone: no mixing.
    generator.load_adapter(n1, paths[V1])
    for events in answers:
        assert sum(e.kind == "token" for e in events) >= 2
        prompt = build_prompt(question, events[0].hits, s.prompt_max_chars)
        text = "".join(e.text for e in events if e.kind == "token")
        assert text == "".join(generator.stream(prompt, adapter=events[-1].adapter_version))


def test_cli_ask_prints_the_answer_then_sources(stack: Stack, monkeypatch, capsys):
    token = stack.publisher.upsert("handbook.md", HANDBOOK_V2, version=7)
    stack.start_answerer()
    s = stack.settings
    monkeypatch.setenv("HEADWATER_KAFKA_PORT", str(s.kafka_port))
    monkeypatch.setenv("HEADWATER_TOPIC_PREFIX", s.topic_prefix)
    assert main(["ask", "How many vacation days?", "--token", str(token)]) == 0
    out = capsys.readouterr().out
    assert "25 vacation days" in out
    assert "[1] handbook.md (v7) score" in out
    assert main(["ask", "vacation", "--search-only", "--json", "--k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["kind"] for e in lines] == ["hits", "done"]
    assert main(["ask", "vacation", "--tenant", "nobody"]) == 1
    assert "unknown tenant" in capsys.readouterr().err


# -- pure logic (fakes) ----------------------------------------------------------------------


def FakeHit(doc_id, version, chunk_id, score, text, section=""):
    return Hit(doc_id=doc_id, version=version, chunk_id=chunk_id, score=score, text=text,
               section=section)  # fmt: skip


class FakeSearcher:
    def __init__(self, hits=(), error: Exception | None = None) -> None:
        self.hits, self.error, self.calls = list(hits), error, []

    def search(self, query, *, tenant, k=5, token=None):
        self.calls.append((query, tenant, k, token))
        if self.error:
            raise self.error
        return self.hits[:k]


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, AnswerEvent]] = []

    def send(self, topic, key, value, headers=None):
        self.sent.append((topic, key, AnswerEvent.model_validate_json(value)))
        return SimpleNamespace(get=lambda timeout=None: None)


def _answerer(settings, searcher, generator=None):
    return Answerer(settings, searcher, generator, producer=FakeProducer(), follow_adapters=False)


def test_build_prompt_numbers_passages_within_budget():
    hits = [FakeHit("a.md", 1, "c1", 0.9, "alpha " * 50, "Intro"), FakeHit("b", 1, "c2", 0.5, "b")]
    msgs = build_prompt("Why?", hits, max_chars=200)
    assert msgs[0]["role"] == "system" and "[1]" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert user.startswith("Passages:") and user.endswith("Question: Why?")
    assert "[1] (a.md, Intro) alpha" in user
    assert "[2]" not in user  # the budget went to the first passage
    assert len(user) < 300


def test_build_prompt_keeps_the_latest_chat_turns_within_budget():
    history = [
        ChatTurn(role="system", content="Be brief."),
        ChatTurn(role="user", content="old question " * 30),
        ChatTurn(role="assistant", content="old answer"),
        ChatTurn(role="user", content="recent question"),
        ChatTurn(role="assistant", content="recent answer"),
    ]
    hits = [FakeHit("a.md", 1, "c1", 0.9, "alpha")]
    msgs = build_prompt("Why?", hits, max_chars=200, history=history)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].endswith("\n\nBe brief.")
    # The 390-character old question does not fit the 200 left: it and all before it go, and
    # so does the old answer (an answer without its question).
    assert [(m["role"], m["content"]) for m in msgs[1:-1]] == [
        ("user", "recent question"), ("assistant", "recent answer"),
    ]  # fmt: skip
    assert msgs[-1]["role"] == "user" and msgs[-1]["content"].endswith("Question: Why?")


def test_reply_topic_is_confined_to_answers(settings):
    a = settings.answers_topic
    assert reply_topic_for(settings, None) == a
    assert reply_topic_for(settings, a + ".client7") == a + ".client7"
    assert reply_topic_for(settings, settings.documents_topic) == a
    assert reply_topic_for(settings, a + "x") == a


def test_trace_recovers_what_it_can():
    s = Settings(tenants=["default", "t1"])
    assert _trace(b"nope", s) is None
    assert _trace(b'{"tenant": "t1"}', s) is None
    assert _trace(b'{"query_id": "q", "tenant": "bad tenant!"}', s) == (
        "q",
        "default",
        s.answers_topic,
    )
    assert _trace(b'{"query_id": "q", "tenant": "t1"}', s)[1] == "t1"


def test_answer_events_with_fakes():
    s = Settings(tenants=["default"], answer_token_batch=2)
    hit = FakeHit("a.md", 3, "c1", 0.8, "Rivers flow downhill. Water is wet.")
    a = _answerer(s, FakeSearcher([hit]))
    q = QueryEvent(tenant="default", text="rivers?", k=3, token="0:1")
    assert a.answer(q) == "done"
    events = [e for _, _, e in a.producer.sent]
    assert a.searcher.calls == [("rivers?", "default", 3, "0:1")]
    assert events[0].hits[0].chunk_id == "c1" and events[0].hits[0].version == 3
    tokens = [e for e in events if e.kind == "token"]
    assert len(tokens) >= 3 and all(e.query_id == q.query_id for e in events)
    assert "".join(e.text for e in tokens) == "Rivers flow downhill. Water is wet. [1]"
    # A failing search ends the answer with an error event, counted; the event says what failed
    # without Milvus' own message (addresses, internals stay in the log).
    a = _answerer(s, FakeSearcher(error=StoreError("Milvus search failed at 10.0.0.7:19530\n")))
    assert a.answer(q) == "error"
    ((_, _, err),) = a.producer.sent
    assert err.kind == "error" and a.errors == 1
    assert err.error.startswith("the index (Milvus) is unavailable") and "10.0.0.7" not in err.error
    a = _answerer(s, FakeSearcher(error=RuntimeError("a bug")))
    assert a.answer(q) == "error"
    ((_, _, err),) = a.producer.sent
    assert err.error == "internal error (details in the server log)"


def test_generated_answer_with_fakes():
    s = Settings(tenants=["default"])
    gen = tiny_generator(max_new_tokens=8)
    a = _answerer(s, FakeSearcher([FakeHit("a.md", 1, "c1", 0.8, "the river flows")]), gen)
    assert a.answer(QueryEvent(tenant="default", text="river?")) == "done"
    events = [e for _, _, e in a.producer.sent]
    assert events[-1].kind == "done" and events[-1].adapter_version is None
    assert "first_token_ms" in events[-1].timing
    assert sum(e.kind == "token" for e in events) >= 2


@pytest.mark.slow
def test_real_smollm2_answers_with_citations(stack: Stack):
    from consumers.generation import load_generator

    token = stack.publisher.upsert("handbook.md", HANDBOOK_V2)
    generator = load_generator(stack.settings.model_copy(update={"max_new_tokens": 48}))
    stack.start_answerer(generator)
    events = _events(stack.client.ask("How many vacation days do employees get?", token=token))
    assert events[0].kind == "hits" and events[0].hits[0].doc_id == "handbook.md"
    assert events[-1].kind == "done", events[-1].error
    assert sum(e.kind == "token" for e in events) >= 3
    assert "".join(e.text for e in events if e.kind == "token").strip()
