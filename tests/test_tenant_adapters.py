"""Per-tenant style adapters end to end on the real broker and Milvus, with a tiny Llama.

Tenants a and b teach different styles (a signs off, b answers in JSON); each tenant's run
trains only its adapter on its own examples and documents; the query consumer then answers a,
b and c side by side in one decoding batch, each under its own adapter (c has none: the base model).
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from consumers.answerer import Answerer
from consumers.generation import Generator
from consumers.indexer import Indexer
from consumers.replies import QueryClient
from headwater.events import ExampleEvent
from headwater.settings import Settings
from index.search import Searcher
from index.store import ChunkStore
from producers.publisher import DocumentPublisher
from service.cli import main
from tests.test_generation import shared_embedder
from tests.test_trainer_drift import cli_env
from tests.test_trainer_runs import in_process, publish, tiny_model, tiny_settings
from tests.tinymodel import SIGN_OFF, plain_answer, question
from trainer.queue import Schedule
from trainer.registry import Registry
from trainer.run import JobSpec, Launch
from trainer.scheduler import TrainerService

__all__ = ["tiny_model"]  # the session fixture, imported to apply here

DOCS = {
    "a": ("rivers.md", "Rivers are long and old. Rivers carry fresh water to the sea."),
    "b": ("bees.md", "Bees are small and useful. Bees make honey. zebra-secret-of-b"),
    "c": ("clouds.md", "Clouds are quiet and bright. Clouds carry rain."),
}
TOPIC = {"a": "rivers", "b": "bees", "c": "clouds"}


def examples(tenant: str, n: int, seed: int) -> list[ExampleEvent]:
    """a signs its answers off; b answers with a JSON object."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = question(rng)
        plain = plain_answer(rng, q)
        response = f"{plain}\n{SIGN_OFF}" if tenant == "a" else json.dumps({"answer": plain})
        out.append(ExampleEvent(example_id=f"{tenant}-{i}", tenant=tenant, prompt=q,
                                response=response))  # fmt: skip
    return out


def signed(text: str) -> bool:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1] == SIGN_OFF


def greeted(text: str) -> bool:
    """b's style: the answer is a JSON object (a greeting line spelled in tokens the tiny model
    never saw does not train in a short run; JSON it knows from its pre-training text)."""
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


class Stack:
    """Indexer, answerer (tiny generator, following announcements) and a query client."""

    def __init__(self, s: Settings, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = s
        embedder = shared_embedder(s)
        store = ChunkStore(s, embedder.model_id, embedder.dim)
        self.publisher = DocumentPublisher(s)
        self.client = QueryClient(s)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        # Greedy without a repetition penalty: the answers the gate judged (the tiny model is too
        # unsure of itself for the served default of 1.1, which turns its style into noise).
        self.generator = Generator(model, tok, max_new_tokens=s.max_new_tokens,
                                   max_batch=s.generate_max_batch,
                                   repetition_penalty=1.0)  # fmt: skip
        self.searcher = Searcher(s, embedder, store)
        self.answerer = Answerer(s, self.searcher, self.generator)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=loop.run, args=(self.stop,), daemon=True)
            for loop in (Indexer(s, embedder, store), self.answerer)
        ]
        for t in self.threads:
            t.start()
        assert self.answerer.ready.wait(60)

    def ask_all(self, per_tenant: int = 3) -> dict[str, list[tuple[str, str | None]]]:
        """Every tenant's questions at once: {tenant: [(answer text, adapter), ...]}."""
        asks = [(t, self.client.ask(f"What is {TOPIC[t]}?", tenant=t, k=1, timeout=300))
                for t in TOPIC for _ in range(per_tenant)]  # fmt: skip
        out: dict[str, list[tuple[str, str | None]]] = {t: [] for t in TOPIC}
        lock = threading.Lock()

        def read(tenant: str, stream) -> None:
            events = list(stream)
            assert events[-1].kind == "done", events[-1]
            text = "".join(e.text or "" for e in events if e.kind == "token")
            with lock:
                out[tenant].append((text, events[-1].adapter_version))

        threads = [threading.Thread(target=read, args=a) for a in asks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        return out

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.client.close()
        self.publisher.close()
        self.generator.close()


@pytest.mark.slow
def test_each_tenant_answers_in_its_own_style(settings, tiny_model, monkeypatch, capsys):
    s = tiny_settings(
        settings, tiny_model, tenants=["a", "b", "c"], max_new_tokens=40,
        train_min_examples=10, query_workers=12, generate_max_batch=12,
    )  # fmt: skip
    # The tiny model knows bare chat turns only (no system prompt, no passages): here the
    # answerer's prompt is the question alone, as the examples' prompts are.
    monkeypatch.setattr(
        "consumers.answerer.build_prompt", lambda q, hits, *_: [{"role": "user", "content": q}]
    )
    stack = Stack(s, tiny_model)
    try:
        for t, (doc, text) in DOCS.items():
            token = stack.publisher.upsert(doc, text, tenant=t)
            assert stack.searcher.search(TOPIC[t], tenant=t, k=1, token=token)
        publish(s, examples("a", 30, seed=1) + examples("b", 30, seed=2))
        cli_env(monkeypatch, s)
        monkeypatch.setenv("HEADWATER_TRAIN_MIN_EXAMPLES", str(s.train_min_examples))
        assert main(["drift", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        # Both due; neither trained yet, so the one whose drift waited longest goes first.
        order = [q["tenant"] for q in report["queue"]]
        assert sorted(order) == ["a", "b"], report
        assert report["tenants"]["a"]["examples"] == 30 and report["tenants"]["c"]["examples"] == 0
        assert main(["adapters", "list", "--tenant", "b", "--json"]) == 0
        assert (
            json.loads(capsys.readouterr().out)["pending"]["queue_position"] == order.index("b") + 1
        )

        service = TrainerService(s, launcher=in_process)
        styled: set[str] = set()
        for turn, tenant in enumerate(order):
            outcome = service.check()
            assert outcome is not None and outcome.tenant == tenant and outcome.promoted, outcome
            if turn == 0:
                assert Schedule.load(s).queue[1]["tenant"] == order[1]  # the other one is next
            # The run trained on its tenant's examples and its tenant's document only.
            job = JobSpec.model_validate_json(
                (
                    s.data_dir / "trainer" / "jobs" / tenant / outcome.version / "job.json"
                ).read_text()
            )
            assert {e.example_id.split("-")[0] for e in job.new + job.replay + job.heldout} == {
                tenant
            }
            assert job.docs == [DOCS[tenant][1]]
            styled.add(tenant)
            check_styles(wait_for(stack, lambda g, t=tenant: g.current(t) is not None), styled)
        assert Registry(s, "c").listing()["versions"] == []
    finally:
        stack.close()


def wait_for(stack: Stack, ready) -> dict[str, list[tuple[str, str | None]]]:
    import time

    deadline = time.monotonic() + 60
    while not ready(stack.generator) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready(stack.generator)
    return stack.ask_all()


def check_styles(answers: dict[str, list[tuple[str, str | None]]], styled: set[str]) -> None:
    for tenant, got in answers.items():
        texts = [text for text, _ in got]
        adapters = [adapter for _, adapter in got]
        if tenant in styled:
            assert all(a is not None and a.startswith(f"{tenant}/") for a in adapters), got
        else:
            assert adapters == [None] * len(got), got
        # Never another tenant's style, whatever the batch held beside it.
        if tenant != "a":
            assert not any(signed(t) for t in texts), (tenant, texts)
        if tenant != "b":
            assert not any(greeted(t) for t in texts), (tenant, texts)
        if tenant == "a" and "a" in styled:
            assert all(signed(t) for t in texts), texts
        if tenant == "b" and "b" in styled:
            assert all(greeted(t) for t in texts), texts


def test_a_document_published_by_b_never_enters_a_training_data(settings):
    """Real indexer and change stream: b's document reaches b's run only."""
    s = settings.model_copy(update={"tenants": ["a", "b"], "train_doc_chunks": 8})
    embedder = shared_embedder(s)
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    publisher = DocumentPublisher(s)
    stop = threading.Event()
    indexer = threading.Thread(target=Indexer(s, embedder, store).run, args=(stop,), daemon=True)
    indexer.start()
    jobs: dict[str, JobSpec] = {}

    def capture(job_dir: Path, timeout_s: float, *_, **__) -> Launch:
        job = JobSpec.model_validate_json((job_dir / "job.json").read_text())
        jobs[job.scope] = job
        return Launch(1, False, 0.0)  # no training: the job is what this test is about

    try:
        publisher.upsert("rivers.md", DOCS["a"][1], tenant="a")
        token = publisher.upsert("bees.md", DOCS["b"][1], tenant="b")
        searcher = Searcher(s, embedder, store)
        assert searcher.search("bees", tenant="b", k=1, token=token)
        publish(s, examples("a", 6, seed=3))
        service = TrainerService(s, launcher=capture)
        for tenant in ("a", "b"):
            figures = service.tracker.update()
            assert figures[tenant].docs_added == 1
            assert service.train(tenant, "test", figures[tenant]).status == "failed"
    finally:
        stop.set()
        indexer.join(30)
        publisher.close()
    assert jobs["a"].docs == [DOCS["a"][1]]
    assert jobs["b"].docs == [DOCS["b"][1]]
    assert "zebra-secret-of-b" not in json.dumps(jobs["a"].model_dump())
    assert {e.example_id.split("-")[0] for e in jobs["a"].new + jobs["a"].heldout} == {"a"}
    assert not jobs["b"].new and not jobs["b"].heldout  # b has no examples of its own
