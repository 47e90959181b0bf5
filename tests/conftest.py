"""Session fixtures: one real Kafka broker and one Milvus Lite server for the whole test run.

Both start on free ports in a temp dir. Each test gets its own topic and collection prefix, so
tests never see each other's events or rows. When the stack cannot start (no Java, say), the
tests that need it fail with the reason: they are never skipped silently.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from headwater.settings import Settings
from headwater.topics import ensure_topics
from stack.broker import LocalBroker
from stack.daemon import free_port
from stack.liteserver import LiteServer
from stack.milvusserver import MilvusServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of the session's broker and Lite server (started here, stopped at the end)."""
    data = tmp_path_factory.mktemp("stack")
    base = Settings(
        data_dir=data,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        milvus_port=free_port(),
        partitions=3,
        kafka_bootstrap=None,
        milvus_uri=None,
    )
    broker = LocalBroker(base)
    lite = LiteServer(base)
    try:
        broker.start()
        lite.start()
        _warm_group_coordinator(base)
        yield base
    finally:
        broker.stop()
        lite.stop()


def _warm_group_coordinator(settings: Settings) -> None:
    """Join and commit once, so the broker creates and loads __consumer_offsets now.

    Otherwise the first test's consumer groups pay for it (NotCoordinator retries for seconds).
    """
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from headwater.runtime.clients import consumer

    warm = settings.model_copy(update={"topic_prefix": "warmup"})
    ensure_topics(warm)
    c = consumer(warm, warm.documents_topic, group_id="warmup")
    try:
        deadline = time.monotonic() + 90
        while not c.assignment() and time.monotonic() < deadline:
            c.poll(timeout_ms=200)
        tp = TopicPartition(warm.documents_topic, 0)
        c.commit({tp: OffsetAndMetadata(0, "", -1)})
    finally:
        c.close()


@pytest.fixture
def settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    """Per-test settings on the session stack: own topics, collections, groups and data dir."""
    tag = "t" + uuid.uuid4().hex[:10]
    s = stack_settings.model_copy(
        update={
            "topic_prefix": tag,
            "collection_prefix": tag,
            "indexer_group": f"{tag}-indexer",
            "query_group": f"{tag}-query",
            "standing_group": f"{tag}-standing",
            "data_dir": tmp_path / "data",
            "batch_max_ms": 50,
            "freshness_wait_s": 60.0,
        }
    )
    s.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(s)
    return s


@pytest.fixture(scope="session")
def milvus_server(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """A Milvus 2.3 standalone server (PyPI `milvus`), started on first use for the session.

    It enforces what Lite does not (a JSON field's 65,536 bytes, JSON objects only, no BM25).
    Its binary is unpacked once per machine into the cache dir; startup takes 30-120 s.
    """
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"), stack_settings.cache_dir)
    try:
        server.start()
        yield server
    finally:
        server.kill()  # a throwaway server in a temp dir: its graceful stop takes ~20 s


@pytest.fixture
def server_settings(settings: Settings, milvus_server: MilvusServer) -> Settings:
    """Per-test settings (own topics, collections, groups) with Milvus on the 2.3 server."""
    return milvus_server.settings(settings)


@pytest.fixture(scope="session")
def embedder():
    """The real default embedder (all-MiniLM-L6-v2 from its package), loaded once per session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from index.embedder import load_embedder

    return load_embedder(Settings())


def pytest_sessionstart(session: pytest.Session) -> None:
    # Models come from packages or local folders; never reach for a hub during tests.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """On a failure, attach the stack of every other live thread (where an indexer hangs)."""
    report = yield
    if report.failed and call.when == "call":
        import sys
        import threading
        import traceback

        frames = sys._current_frames()
        stacks = []
        for t in threading.enumerate():
            if t is threading.current_thread() or t.ident not in frames:
                continue
            stack = "".join(traceback.format_stack(frames[t.ident])[-12:])
            stacks.append(f"--- thread {t.name} ---\n{stack}")
        report.sections.append(("live threads at failure", "\n".join(stacks)))
    return report


@pytest.fixture(scope="session")
def live_app(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """One gateway on the real stack for the protocol tests, served over HTTP on a free port.

    Indexer, query consumer (the tiny test generator: it always writes `max_new_tokens` tokens)
    and standing matcher run in threads; tenants are open ("*"): `admin` (the admin token, with
    X-Tenant) or `tok-a`/`tok-b` (bound to tenants a and b), `secret` (tenant-a, the README's).
    Tests pick their own tenants.
    """
    import threading
    from types import SimpleNamespace

    from pydantic import SecretStr

    from consumers.answerer import Answerer
    from consumers.indexer import Indexer
    from consumers.replies import QueryClient
    from consumers.standing import StandingMatcher
    from consumers.subscriptions import SubscriptionClient
    from index.index import open_index
    from producers.publisher import DocumentPublisher
    from service.gateway import create_app, serve
    from service.routes.openai_compat import adapter_models
    from stack.daemon import port_open
    from tests.test_generation import shared_embedder, tiny_generator

    tag = "p" + uuid.uuid4().hex[:10]
    s = stack_settings.model_copy(
        update={
            "topic_prefix": tag, "collection_prefix": tag, "indexer_group": f"{tag}-indexer",
            "query_group": f"{tag}-query", "standing_group": f"{tag}-standing",
            "data_dir": tmp_path_factory.mktemp("live"), "batch_max_ms": 20,
            "freshness_wait_s": 60.0, "tenants": ["*"], "api_port": free_port(),
            "api_token": SecretStr("admin"),
            "api_tokens": {"tok-a": "a", "tok-b": "b", "secret": "tenant-a"},
            "max_new_tokens": 12, "query_timeout_s": 60.0,
        }
    )  # fmt: skip
    ensure_topics(s)
    embedder = shared_embedder(s)
    indexes = [open_index(s, embedder=embedder) for _ in range(3)]
    stop = threading.Event()
    answerer = Answerer(s, indexes[1].searcher, tiny_generator(max_new_tokens=12),
                        follow_adapters=False)  # fmt: skip
    loops = [Indexer(s, embedder, indexes[0].store).run, answerer.run,
             StandingMatcher(s, embedder, indexes[2].store).run]  # fmt: skip
    threads = [threading.Thread(target=run, args=(stop,), daemon=True) for run in loops]
    publisher, queries, subs = DocumentPublisher(s), QueryClient(s), SubscriptionClient(s)
    app = create_app(s, searcher=indexes[1].searcher, publisher=publisher, query_client=queries,
                     subscriptions=subs, models=adapter_models(s))  # fmt: skip
    threads.append(threading.Thread(target=serve, args=(app, s, stop), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", s.api_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answerer.ready.wait(60), "the answerer never got its partitions"
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{s.api_port}", settings=s, embedder=embedder,
            admin="admin", model=s.generator, answerer=answerer,
        )  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for closer in (queries.close, subs.close, publisher.close, *(i.close for i in indexes)):
            closer()
