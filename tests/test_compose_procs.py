"""docker-compose.yml, run as processes, driven end to end and hurt mid-stream.

Every headwater service runs its compose command with its compose environment (see
tests/compose_procs.py) on a local 3-node Kafka cluster (replication 3, min.insync.replicas 2)
and a local Milvus, each with a data dir of its own. The scenario: authenticated HTTP publish,
search with the freshness token, a streamed ask, then documents published over HTTP while an
indexer (and, in the full run, a broker) is killed with SIGKILL and restarted: every
acknowledged document is in the index (`headwater verify` clean). The full run (`make soak`)
also adds style examples, runs a training round in the trainer's environment, and checks that
both answerers (other data dirs) fetch, verify and serve the new adapter.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from consumers.truth import read_documents_topic
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from models.adapters import adapter_path
from service.cli import main
from tests.chaos import private_lite
from tests.compose_procs import ComposeRun, kill_node
from tests.test_trainer_runs import style_examples


class Publisher:
    """Publishes documents over HTTP in a thread; remembers what was acknowledged (a 200)."""

    def __init__(self, run: ComposeRun, prefix: str, count: int, pause_s: float = 0.1) -> None:
        self.run, self.prefix, self.count, self.pause_s = run, prefix, count, pause_s
        self.acked: dict[str, tuple[str, str]] = {}  # doc_id -> (text, token)
        self.refused: list[str] = []
        self.thread = threading.Thread(target=self._publish, daemon=True)

    def _publish(self) -> None:
        headers = {"Authorization": f"Bearer {self.run.api_token}"}
        with httpx.Client(base_url=self.run.api, headers=headers, timeout=60) as http:
            for i in range(self.count):
                doc_id = f"{self.prefix}/note-{i:04d}.md"
                text = (
                    f"# Note {i}\n\nThe {self.prefix} ledger entry number {i} records item {i * 7}."
                )
                try:
                    r = http.post("/v1/documents", json={"doc_id": doc_id, "text": text})
                except httpx.HTTPError as exc:
                    self.refused.append(f"{doc_id}: {exc!r}")
                    continue
                if r.status_code == 200:
                    self.acked[doc_id] = (text, r.json()["token"])
                else:  # not acknowledged (a broker failing over, say): may or may not be there
                    self.refused.append(f"{doc_id}: {r.status_code} {r.text[:200]}")
                time.sleep(self.pause_s)

    def token(self) -> str:
        merged = FreshnessToken()
        for _, token in self.acked.values():
            merged = merged | FreshnessToken.parse(token)
        return str(merged)


def _until(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _ask(http: httpx.Client, question: str, token: str | None = None) -> list[dict]:
    events = []
    body = {"question": question, "k": 3, **({"token": token} if token else {})}
    with http.stream("POST", "/v1/ask", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind:
                events.append({"kind": kind, **json.loads(line.split(":", 1)[1])})
                if kind in ("done", "error"):
                    break
    return events


def publish_search_ask(run: ComposeRun) -> None:
    """The first steps of a user: publish (authenticated), search fresh, ask (streamed)."""
    with httpx.Client(base_url=run.api, timeout=120) as anonymous:
        r = anonymous.post("/v1/documents", json={"doc_id": "x.md", "text": "x"})
        assert r.status_code == 401
    headers = {"Authorization": f"Bearer {run.api_token}"}
    with httpx.Client(base_url=run.api, headers=headers, timeout=120) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        text = "# Ferries\n\nThe night ferry to the island leaves at 23:40 from pier 9."
        r = http.post("/v1/documents", json={"doc_id": "guide/ferries.md", "text": text})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = http.get("/v1/search", params={"q": "night ferry pier", "token": token})
        assert r.status_code == 200, r.text
        assert r.json()["hits"][0]["doc_id"] == "guide/ferries.md"
        events = _ask(http, "When does the night ferry leave?", token)
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "hits" and kinds[-1] == "done" and "token" in kinds, events[-1]
        assert events[0]["hits"][0]["doc_id"] == "guide/ferries.md"


def nothing_acknowledged_is_lost(
    run: ComposeRun, publisher: Publisher, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert publisher.acked, publisher.refused
    headers = {"Authorization": f"Bearer {run.api_token}"}
    token = publisher.token()
    with httpx.Client(base_url=run.api, headers=headers, timeout=120) as http:

        def caught_up() -> bool:  # 504 while the restarted indexer rejoins and catches up
            return http.get("/v1/search", params={"q": "ledger", "token": token}).status_code == 200

        assert _until(caught_up, 300, 2.0), "the indexers never applied the acknowledged writes"
    client = run.settings()
    truth = {lg.event.doc_id: lg.event for lg in read_documents_topic(client)}  # in log order
    for doc_id, (text, _) in publisher.acked.items():
        assert doc_id in truth and truth[doc_id].text == text, f"acknowledged, then lost: {doc_id}"
    # `headwater verify` in this process (a new one would load torch and the model again),
    # with the API service's environment.
    for key in [k for k in os.environ if k.startswith("HEADWATER_")]:
        monkeypatch.delenv(key)
    for key, value in run.of("api")[0].env.items():
        if key.startswith("HEADWATER_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(run.base / "data" / "verify"))
    code = main(["verify", "--json", "--sample", "10"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["ok"], report
    assert report["docs"] >= len(publisher.acked) + 1


def _restart_when_dead(run: ComposeRun, name: str) -> None:
    proc = run.procs[name]
    run.kill(proc)
    time.sleep(2.0)
    run.start(proc)  # compose's restart: unless-stopped, same environment and data dir


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_compose_as_processes_survives_an_indexer_kill(tmp_path: Path, monkeypatch, capsys):
    """`make test`'s variant: two indexers, one answerer and the API on Lite; one indexer is
    killed mid-stream and the other takes its partitions over (the full run restarts it)."""
    with private_lite(Settings(), tmp_path / "milvus") as (milvus, _):
        run = ComposeRun(
            tmp_path,
            milvus.milvus_address,
            overrides={"HEADWATER_GENERATOR": ""},  # extractive answers: no LM in this variant
            replicas={"indexer": 2, "answerer": 1},
            only={"indexer", "answerer", "api"},
        )
        try:
            run.up()
            publish_search_ask(run)
            publisher = Publisher(run, "small", count=20)
            publisher.thread.start()
            assert _until(lambda: len(publisher.acked) >= 6, 120)
            run.kill(run.procs["indexer-1"])
            publisher.thread.join(300)
            nothing_acknowledged_is_lost(run, publisher, monkeypatch, capsys)
        finally:
            run.down()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def tiny_training(model: Path) -> dict[str, str]:
    """A training run of seconds on the tiny model (values of tests/test_trainer_runs.py)."""
    return {
        "HEADWATER_GENERATOR": str(model),
        "HEADWATER_TRAIN_BASE_MODEL": str(model),
        "HEADWATER_MAX_NEW_TOKENS": "24",
        "HEADWATER_TRAIN_DTYPE": "float32",
        "HEADWATER_TRAIN_THREADS": "1",
        "HEADWATER_TRAIN_LEARNING_RATE": "0.01",
        "HEADWATER_TRAIN_STEPS": "60",
        "HEADWATER_TRAIN_EPOCHS": "8",
        "HEADWATER_TRAIN_BATCH_SIZE": "4",
        "HEADWATER_TRAIN_MAX_SEQ_TOKENS": "96",
        "HEADWATER_TRAIN_DOC_CHUNKS": "4",
        "HEADWATER_TRAIN_MIN_EXAMPLES": "10",
        "HEADWATER_GATE_MAX_NEW_TOKENS": "24",
        "HEADWATER_GATE_MAX_HOLDOUT": "8",
    }


def train_and_serve_everywhere(run: ComposeRun) -> str:
    """Examples in, a run in the trainer's environment, the adapter served by every answerer."""
    examples = run.base / "examples.jsonl"
    with examples.open("w") as f:
        for e in style_examples(40, seed=3, tag="compose"):
            f.write(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n")
    done = run.exec("api", "example", "add", "--file", str(examples))
    assert done.returncode == 0, done.stderr[-2000:]
    done = run.exec("trainer", "train", "--now", timeout=900)
    # The trainer service's own schedule may have started the run as the examples arrived.
    assert done.returncode == 0 or "already in progress" in done.stderr, done.stderr[-3000:]

    def versions() -> list:
        return json.loads(run.exec("trainer", "adapters", "list", "--json").stdout)["versions"]

    assert _until(lambda: bool(versions()), 900, step=5), run.of("trainer")[0].tail()
    listing = json.loads(run.exec("trainer", "adapters", "list", "--json").stdout)
    version = listing["versions"][-1]["version"]
    if listing["current"] != version:  # the gate said no: promote by hand, it still ships
        assert run.exec("trainer", "adapters", "promote", version).returncode == 0
    trained = adapter_path(Settings(data_dir=run.of("trainer")[0].data_dir), "default", version)
    name = f"default/{version}"  # what answerers load and report it as
    for proc in run.of("answerer"):
        fetched = adapter_path(Settings(data_dir=proc.data_dir), "default", version)

        def served(proc=proc) -> bool:
            return f'headwater_adapter_swaps_total{{version="{name}"}}' in run.metrics(proc)

        assert _until(served, 180), f"{proc.name} does not serve {version}: {proc.tail()}"
        assert fetched != trained
        for path in trained.iterdir():  # rebuilt from the topic, byte for byte
            assert (fetched / path.name).read_bytes() == path.read_bytes()
    headers = {"Authorization": f"Bearer {run.api_token}"}
    with httpx.Client(base_url=run.api, headers=headers, timeout=300) as http:
        events = _ask(http, "When does the night ferry leave?")
    assert events[-1]["kind"] == "done" and events[-1]["adapter_version"] == name, events[-1]
    return version


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("backend", ["lite"])
def test_compose_as_processes_end_to_end(
    tmp_path: Path, tiny_llama: Path, backend: str, monkeypatch, capsys
):
    """Every service of the compose file; training; a broker and an indexer killed mid-stream."""
    with private_lite(Settings(), tmp_path / "milvus") as (milvus, _):
        run = ComposeRun(tmp_path, milvus.milvus_address, overrides=tiny_training(tiny_llama))
        try:
            run.up()
            assert len(run.of("indexer")) == 3 and len(run.of("answerer")) == 2
            publish_search_ask(run)
            train_and_serve_everywhere(run)

            publisher = Publisher(run, "full", count=120)
            publisher.thread.start()
            assert _until(lambda: len(publisher.acked) >= 20, 180)
            node = run.node(2)
            kill_node(node)
            _restart_when_dead(run, "indexer-1")
            assert _until(lambda: len(publisher.acked) >= 40, 180), publisher.refused[-3:]
            assert run.kafka is not None
            run.kafka.start_node(node)
            publisher.thread.join(600)
            run.wait_ready()
            nothing_acknowledged_is_lost(run, publisher, monkeypatch, capsys)
        finally:
            run.down()
