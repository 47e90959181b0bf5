"""Fault injection for the reliability suite: real processes killed, stopped and restarted.

Everything here drives real processes: `headwater indexer` subprocesses (kill -9, SIGTERM), a
private Kafka broker and a private Milvus Lite server (stop, kill -9, start on the same data).
Each helper records what it injected in a `Faults` tally, which RELIABILITY.md reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from pydantic import SecretStr

from consumers.indexer import Indexer, IndexerStats
from consumers.truth import read_documents_topic
from headwater.progress import Progress
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings
from index.embedder import Embedder
from index.search import Searcher
from index.store import ChunkStore
from index.verify import Report, check_search, expected_index, verify
from index.writer import IndexWriter
from producers.corpus import CorpusRecord, default_corpus_dir, read_corpus
from stack.broker import LocalBroker
from stack.daemon import Daemon, free_port, pid_alive
from stack.liteserver import LiteServer

READY_TIMEOUT_S = 240.0  # torch + the embedder take ~20 s to load on a quiet 2-core machine
HISTORY_START = 5425  # first `seq` of the tldr edit history (the snapshot comes before it)


@dataclass
class Faults:
    """What a scenario injected and how it went (printed by the tests, copied to RELIABILITY)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


# -- subprocesses ------------------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """An environment from which `Settings()` rebuilds exactly `settings` (HEADWATER_* only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list | dict):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"HEADWATER_{name.upper()}"] = text
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    # Two indexers on a 2-core machine: one torch thread each keeps them from thrashing.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def headwater_command() -> list[str]:
    """The installed `headwater` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("headwater")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


class IndexerProcess:
    """One `headwater indexer` subprocess per `start()`; each start logs to its own file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str = "indexer") -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.name = name
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*headwater_command(), "indexer"],
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_for_re(self, marker: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the current run logged a line matching `marker`; fail if it died first."""
        pattern = re.compile(marker)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern.search(self.log_text()):
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before {marker!r}:\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not log {marker!r} in {timeout:.0f}s:\n{self.tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, *, partitions: bool = True) -> None:
        """Until the member joined the group (and, by default, owns a partition)."""
        self.wait_for_re(r"indexer assigned \['" if partitions else "indexer assigned", timeout)

    def kill(self) -> None:
        """kill -9: no flush, no commit, no leaving the group."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM (finish the batch, commit, leave the group); kill -9 after `timeout`."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"{self.name} ignored SIGTERM for {timeout:.0f}s") from None
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop_quietly(self) -> None:
        if self.alive():
            self.kill()


class IndexerThread:
    """An in-process group member: `Indexer.run(stop)` in a thread (shares the test's embedder)."""

    def __init__(self, settings: Settings, embedder: Embedder, **options: object) -> None:
        self.indexer = Indexer(settings, embedder=embedder, **options)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self.thread.start()

    def wait_assigned(self, timeout: float = 120.0) -> None:
        """Until the member owns partitions (publishing before that is fine, just slower)."""
        deadline = time.monotonic() + timeout
        while not self.indexer.consumer.assignment():
            assert self.alive() and time.monotonic() < deadline, "the member got no partitions"
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            self.indexer.run(self.stop)
        except BaseException as exc:
            self.error = exc
            raise

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self, timeout: float = 120.0) -> IndexerStats:
        """Stop (finish the batch, commit, leave the group); re-raise what killed the loop."""
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the indexer did not stop"
        if self.error is not None:
            raise AssertionError(f"the indexer loop died: {self.error!r}") from self.error
        return self.indexer.stats


# -- private services --------------------------------------------------------------------------


@contextlib.contextmanager
def private_broker(base: Settings, data_dir: Path) -> Iterator[tuple[Settings, LocalBroker]]:
    """A broker of our own (own data dir and ports), so stopping it disturbs no other test."""
    s = base.model_copy(
        update={
            "data_dir": data_dir,
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
            "kafka_bootstrap": None,
        }
    )
    broker = LocalBroker(s)
    broker.start()
    try:
        yield s, broker
    finally:
        broker.stop()


@contextlib.contextmanager
def private_lite(base: Settings, data_dir: Path) -> Iterator[tuple[Settings, LiteServer]]:
    """A Milvus Lite server of our own (own data dir and port)."""
    s = base.model_copy(
        update={"data_dir": data_dir, "milvus_port": free_port(), "milvus_uri": None}
    )
    lite = LiteServer(s)
    lite.start()
    try:
        yield s, lite
    finally:
        lite.stop()
        shutil.rmtree(data_dir / "milvus", ignore_errors=True)


def kill_daemon(daemon: Daemon) -> None:
    """kill -9 a pidfile daemon (broker or Lite server) and wait until it is gone."""
    pid = daemon.pid()
    assert pid is not None, f"{daemon.name} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    daemon.pidfile.unlink(missing_ok=True)


# -- progress and truth ------------------------------------------------------------------------


def wait_caught_up(
    settings: Settings,
    timeout: float,
    *,
    alive: Callable[[], bool] | None = None,
    group: str | None = None,
) -> None:
    """Until the group has committed everything on the documents topic (bounded)."""
    deadline = time.monotonic() + timeout
    with Progress(settings) as progress:
        while time.monotonic() < deadline:
            with contextlib.suppress(KafkaError):  # a broker coming back answers errors a while
                if progress.caught_up(group):
                    return
            if alive is not None and not alive():
                raise RuntimeError("the indexer died before catching up")
            time.sleep(0.5)
        lag = progress.consumer_lag(group)
    raise TimeoutError(f"not caught up after {timeout:.0f}s; lag {lag}")


def lag(settings: Settings, group: str | None = None) -> int:
    with Progress(settings) as progress:
        return sum(progress.consumer_lag(group).values())


def truth(settings: Settings, embedder: Embedder, sample: int = 0) -> Report:
    """The truth checker: the index against the latest version of every event on the topic,
    plus `sample` searches by document text (right tenant, right version)."""
    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    try:
        writer = IndexWriter(settings, embedder, store)
        expected = expected_index(read_documents_topic(settings), writer.chunk)
        report = verify(store, expected)
        if sample:
            check_search(Searcher(settings, embedder, store), expected, report, sample=sample)
        return report
    finally:
        store.close()


def snapshot(settings: Settings, embedder: Embedder) -> tuple[dict, dict]:
    """Everything the index holds: chunk rows and document states, for before/after equality."""
    store = ChunkStore(settings, embedder.model_id, embedder.dim)
    try:
        chunks = {
            r["chunk_id"]: (r["doc_key"], r["version"], r["section"], r["text"])
            for r in store.iter_chunks()
        }
        # A source version sent again later in the log applies (same text, same chunks): only
        # its log position changes, which readers never see.
        states = {
            s.key: (s.version, s.deleted, s.chunk_ids, s.metadata) for s in store.iter_doc_states()
        }
        return chunks, states
    finally:
        store.close()


def read_topic(settings: Settings, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of `topic` from its beginning to its end now (no group)."""
    return list(read_to_end(settings, topic, timeout_s=timeout_s, client_id="chaos-reader"))


TRUTH_FIELDS = ("missing", "stale", "duplicates", "leaked", "deleted_present", "wrong_version")


def assert_truth(report: Report) -> None:
    counts = {k: getattr(report, k) for k in (*TRUTH_FIELDS, "search_wrong")}
    assert report.ok, f"{counts}; e.g. {report.examples[:5]}"


# -- corpus ------------------------------------------------------------------------------------


def tldr_slice(docs: int, deleted: int, max_events: int, seed: int = 0) -> list[CorpusRecord]:
    """A replay of `docs` tldr pages: their snapshot text and their edit history, in seq order.

    `deleted` of the pages are ones the history deletes (and sometimes re-adds), so the slice
    has edits, deletes and resurrections; at most `max_events` records in all.
    """
    records = list(read_corpus(default_corpus_dir("tldr")))
    history = [r for r in records if r.seq >= HISTORY_START]
    gone = list(dict.fromkeys(r.doc_id for r in history if r.op == "delete"))
    edited = list(dict.fromkeys(r.doc_id for r in history if r.op == "upsert"))
    rng = random.Random(seed)
    chosen = set(gone[:deleted])
    rest = [d for d in edited if d not in chosen]
    chosen |= set(rng.sample(rest, min(len(rest), max(0, docs - len(chosen)))))
    picked = [r for r in records if r.doc_id in chosen]
    return picked[:max_events]
