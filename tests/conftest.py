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
