"""Freshness first, on the real broker and Milvus: training waits for the indexer's backlog, and
a run in progress pauses while one lasts (a tiny Llama, in its own niced process)."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from consumers.indexer import Indexer
from headwater.settings import Settings
from headwater.threads import ThreadBudget, budget
from index.store import ChunkStore
from producers.publisher import DocumentPublisher
from tests.test_generation import shared_embedder
from tests.test_trainer_runs import publish, style_examples, tiny_model, tiny_settings
from trainer.queue import Schedule
from trainer.registry import Registry
from trainer.scheduler import TrainerService
from trainer.status import drift_report

__all__ = ["tiny_model"]


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class IndexerThread:
    def __init__(self, s, embedder, store) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=Indexer(s, embedder, store).run, args=(self.stop,), daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.slow
def test_training_defers_to_the_indexer_and_pauses_on_a_backlog(settings, tiny_model):
    s = tiny_settings(
        settings, tiny_model, train_max_index_lag=2, train_lag_check_s=0.5, train_nice=5,
        train_steps=200, train_epochs=200, train_check_interval_s=3600, train_timeout_s=900,
    )  # fmt: skip
    embedder = shared_embedder(s)
    store = ChunkStore(s, embedder.model_id, embedder.dim)
    publisher = DocumentPublisher(s)
    publish(s, style_examples(16))
    for i in range(5):  # no indexer yet: five document events wait
        publisher.upsert(f"doc{i}.md", f"Document {i} about rivers and lakes.")
    service = TrainerService(s)
    service.start()
    indexer: IndexerThread | None = None
    try:
        until(lambda: Schedule.load(s).action == "deferred", 60, "a deferral")
        report = drift_report(s)
        assert report["scheduler"]["action"] == "deferred"
        assert "indexer lag 5 document events > 2" in report["scheduler"]["reason"]
        assert report["freshness"]["index_lag"] == 5 and report["freshness"]["hold"]
        assert [q["tenant"] for q in report["queue"]] == ["default"]  # due, but waiting
        assert Registry(s, "default").listing()["versions"] == []  # nothing started

        indexer = IndexerThread(s, embedder, store)  # the backlog drains: the run starts
        until(lambda: service.running_pid is not None, 300, "the run to start")
        pid = service.running_pid
        proc = psutil.Process(pid)
        assert proc.nice() >= psutil.Process().nice() + 5  # niced: it yields the cores
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # only cycles nobody else wants
        until(lambda: cpu_s(proc) > 2, 300, "the run to work")
        indexer.close()  # a backlog appears while the run trains
        for i in range(5, 10):
            publisher.upsert(f"doc{i}.md", f"Document {i} about trains and ships.")
        until(lambda: (Schedule.load(s).running or {}).get("paused"), 60, "the pause")
        assert proc.status() == psutil.STATUS_STOPPED
        running = drift_report(s)["scheduler"]["running"]
        assert running["paused"] and "indexer lag" in running["reason"]
        used = cpu_s(proc)
        time.sleep(2)
        assert cpu_s(proc) == used  # stopped: it takes no CPU from the indexer

        indexer = IndexerThread(s, embedder, store)  # caught up again: the run resumes
        until(lambda: not (Schedule.load(s).running or {}).get("paused"), 120, "the resume")
        until(lambda: Registry(s, "default").listing()["versions"][-1]["status"] != "training",
              600, "the run to finish")  # fmt: skip
        record = Registry(s, "default").listing()["versions"][-1]
        assert record["status"] in ("accepted", "rejected"), record
        assert record["metrics"]["pauses"] >= 1 and record["metrics"]["paused_s"] > 1
    finally:
        service.stop()
        if indexer is not None:
            indexer.close()
        publisher.close()


def test_the_thread_budget_splits_the_cores():
    def of(cores: int, **kw: int) -> ThreadBudget:
        return budget(Settings(cpu_cores=cores, **kw))

    assert of(8) == ThreadBudget(cores=8, embed=4, generate=2, train=2)
    assert of(4) == ThreadBudget(cores=4, embed=2, generate=1, train=1)
    assert of(2) == ThreadBudget(cores=2, embed=1, generate=1, train=1)  # training yields
    for cores in (3, 4, 6, 8, 16, 64):
        b = of(cores)
        assert b.embed + b.generate + b.train <= cores and b.embed >= b.train
    assert of(8, train_threads=1).train == 1 and of(8, train_threads=1).embed == 5
    assert of(8).of("embed", "generate") == 6  # `headwater up` hosts both
    assert of(2).of("embed", "generate") == 2  # never beyond the cores
