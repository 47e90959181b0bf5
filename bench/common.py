"""What every benchmark shares: the stack it runs on, the embedder, corpora, timing and results.

A benchmark run starts its own broker and Milvus Lite server on free ports in a temp dir (unless
the settings point at existing ones), gives each benchmark its own topics, collections and
consumer groups, and writes one JSON file per benchmark with the machine, date, git commit and
exact command beside the figures. Ratios are always measured side by side in one run: on a
shared 2-core machine only a ratio from one run means anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from headwater.errors import BenchError
from headwater.settings import Settings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
DEFAULT_OUT = Path("bench") / "results"


# -- the stack ----------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_stack(settings: Settings) -> Iterator[Settings]:
    """Settings of a running stack: the configured one, or a local one started here (and stopped).

    Kafka and Milvus are decided separately: HEADWATER_KAFKA_BOOTSTRAP / HEADWATER_MILVUS_URI
    point at existing services, anything unset is started on free ports in a temp data dir.
    """
    from stack.broker import LocalBroker
    from stack.daemon import free_port
    from stack.liteserver import LiteServer

    tmp = Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    update: dict[str, Any] = {"data_dir": tmp}
    if settings.uses_local_kafka:
        update |= {"kafka_port": free_port(), "kafka_controller_port": free_port()}
    if settings.uses_local_milvus:
        update["milvus_port"] = free_port()
    base = settings.model_copy(update=update)
    started: list[Any] = []
    try:
        if base.uses_local_kafka:
            broker = LocalBroker(base)
            started.append(broker)
            broker.start()
        if base.uses_local_milvus:
            lite = LiteServer(base)
            started.append(lite)
            lite.start()
        log.info("bench stack: kafka %s, milvus %s", base.bootstrap, base.milvus_address)
        yield base
    finally:
        for service in reversed(started):
            with contextlib.suppress(Exception):
                service.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scoped(base: Settings, name: str, **overrides: Any) -> Iterator[Settings]:
    """Own topics, collections, groups and data dir for one benchmark; dropped afterwards."""
    from headwater.runtime.clients import admin
    from headwater.topics import ensure_topics

    tag = f"b{name[:6]}{uuid.uuid4().hex[:6]}"
    data = base.data_dir / tag
    data.mkdir(parents=True, exist_ok=True)
    s = base.model_copy(
        update={
            "topic_prefix": tag,
            "collection_prefix": tag,
            "indexer_group": f"{tag}-indexer",
            "query_group": f"{tag}-query",
            "standing_group": f"{tag}-standing",
            "data_dir": data,
            **overrides,
        }
    )
    topics = ensure_topics(s)
    _wait_for_leaders(s)
    try:
        yield s
    finally:
        _drop_collections(s)
        with contextlib.suppress(Exception):
            a = admin(s)
            try:
                a.delete_topics(topics)
            finally:
                a.close()


def _wait_for_leaders(s: Settings, timeout: float = 60.0) -> None:
    """Until the documents topic has a leader for every partition.

    A consumer that joins its group before the new topic's metadata reaches it is assigned
    nothing and only notices the topic at its next metadata refresh, minutes later.
    """
    from headwater.runtime.clients import consumer

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = consumer(s)
        try:
            if len(c.partitions_for_topic(s.documents_topic) or ()) == s.partitions:
                return
        finally:
            c.close()
        time.sleep(0.2)
    raise BenchError(f"topic {s.documents_topic} has no partitions after {timeout:.0f} s")


def _drop_collections(s: Settings) -> None:
    from pymilvus import MilvusClient

    with contextlib.suppress(Exception):
        client = MilvusClient(**s.milvus_client_config())
        try:
            for name in client.list_collections():
                if name.startswith(f"{s.collection_prefix}_"):
                    client.drop_collection(name)
        finally:
            client.close()


# -- embeddings ---------------------------------------------------------------------------------


class VectorMemo:
    """Vectors of texts already embedded in this run by the real model, shared by benchmarks.

    Only phases that are not measured use it (e.g. loading a snapshot before a freshness run), so
    the same 10k chunks are not embedded three times on a 2-core machine. `computed` counts the
    texts the model really embedded through the memo.
    """

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.computed = 0

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        for t, v in zip(texts, vectors, strict=True):
            self.vectors[t] = v

    def encode(self, embedder: Any, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            self.put(missing, embedder.encode(missing))
            self.computed += len(missing)
        if not texts:
            return np.zeros((0, embedder.dim), dtype=np.float32)
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed (all else passes through).

    With `memo` set, vectors of texts embedded earlier in the run are reused instead of computed
    again; `use_memo` can be switched off before a measured phase.
    """

    def __init__(self, inner: Any, memo: VectorMemo | None = None) -> None:
        self.inner = inner
        self.memo = memo
        self.use_memo = memo is not None
        self.texts = 0
        self.calls = 0
        self.seconds = 0.0  # wall time inside encode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        self.calls += 1
        t0 = time.perf_counter()
        try:
            if self.use_memo and self.memo is not None:
                return self.memo.encode(self.inner, texts)
            return self.inner.encode(texts)
        finally:
            self.seconds += time.perf_counter() - t0


# -- the run ------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """One `headwater bench` invocation: stack settings, flags, output, shared model and memo."""

    settings: Settings
    quick: bool
    out_dir: Path
    command: str
    profile: bool = False
    memo: VectorMemo = field(default_factory=VectorMemo)
    _embedder: Any = None

    def embedder(self) -> Any:
        """The real embedder, loaded once per run."""
        if self._embedder is None:
            from index.embedder import load_embedder

            t0 = time.monotonic()
            self._embedder = load_embedder(self.settings)
            log.info("embedder loaded in %.1f s", time.monotonic() - t0)
        return self._embedder


class ServiceCPU:
    """CPU seconds used by the local broker and Milvus Lite (and their children) on this machine.

    On a 2-core machine the services compete with the embedder; this is how much.
    """

    def __init__(self, settings: Settings) -> None:
        import psutil

        from stack.broker import LocalBroker
        from stack.liteserver import LiteServer

        self.procs: list[Any] = []
        for service, local in ((LocalBroker, settings.uses_local_kafka),
                               (LiteServer, settings.uses_local_milvus)):  # fmt: skip
            pid = service(settings).daemon.pid() if local else None
            if pid is not None:
                self.procs.append(psutil.Process(pid))

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                for q in (p, *p.children(recursive=True)):
                    t = q.cpu_times()
                    total += t.user + t.system
        return total


def corpus(name: str) -> tuple[list[Any], list[Any]]:
    """(snapshot records, event records) of a shared corpus, each in seq order."""
    from producers.corpus import read_corpus

    folder = CORPORA / name
    snap, events = folder / "snapshot.jsonl.gz", folder / "events.jsonl.gz"
    if not (snap.is_file() and events.is_file()):
        raise BenchError(f"corpus {name!r} not found at {folder} (see shared/corpora/README.md)")
    return list(read_corpus(snap)), list(read_corpus(events))


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{'p50': .., 'p95': .., 'p99': .., 'max': .., 'mean': ..} (nearest-rank above q)."""
    if not values:
        return {f"p{q:g}": float("nan") for q in qs} | {"max": float("nan"), "mean": float("nan")}
    arr = np.asarray(values, dtype=float)
    out = {f"p{q:g}": float(np.percentile(arr, q, method="higher")) for q in qs}
    return out | {"max": float(arr.max()), "mean": float(arr.mean())}


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        threads = torch.get_num_threads()
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        threads, torch_version = None, None
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_result(ctx: BenchContext, name: str, figures: dict[str, Any], started: float) -> Path:
    """`<out>/<name>.json`: the figures with command, machine, date and git commit."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": ctx.command,
        "quick": ctx.quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
        "wall_s": round(time.monotonic() - started, 1),
        **figures,
    }
    path = ctx.out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def description(text: str) -> str | None:
    """The summary line of a tldr page (`> Archive files.`), a natural query for the page."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("> ") and "More information" not in line:
            return line[2:].strip() or None
    return None


def wait_caught_up(settings: Settings, timeout: float, worker: Any = None) -> None:
    """Until the indexer group has applied everything on the documents topic.

    With `worker` (the indexer's thread), fails as soon as that thread has died.
    """
    from headwater.progress import Progress

    deadline = time.monotonic() + timeout
    with Progress(settings) as progress:
        while time.monotonic() < deadline:
            if progress.caught_up():
                return
            if worker is not None and not worker.is_alive():
                raise BenchError("the indexer thread died (see the log above)")
            time.sleep(0.2)
    raise BenchError(f"the indexer did not catch up within {timeout:.0f} s")


def join_group(ix: Any, timeout: float = 60.0) -> None:
    """Poll an idle indexer until it owns its partitions, so a timed phase excludes the join."""
    deadline = time.monotonic() + timeout
    while not ix.consumer.assignment():
        if time.monotonic() > deadline:
            raise BenchError("the indexer got no partitions")
        ix.run_once()


def index_through(ix: Any, token: Any, timeout: float) -> None:
    """Run the indexer's loop in this thread until its group has committed past `token`.

    Committed offsets, not a count of consumed records: a batch that outlives
    max.poll.interval.ms is redelivered after a rebalance, and counting it twice would end the
    wait too early.
    """
    from headwater.progress import Progress

    deadline = time.monotonic() + timeout
    with Progress(ix.settings) as progress:
        while ix.pending or not progress.is_applied(token):
            if time.monotonic() > deadline:
                raise BenchError(f"the indexer did not apply {token} within {timeout:.0f} s")
            ix.run_once()
