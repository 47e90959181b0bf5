"""Training runs end to end on the real broker, with a tiny Llama so they take seconds."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import string
import time
from pathlib import Path

import pytest

from headwater.events import HOUSE, AdapterAnnouncement, ChangeEvent, ExampleEvent
from headwater.runtime.clients import consumer, producer
from headwater.settings import Settings
from index.embedder import variant_id
from index.store import ChunkRow, ChunkStore
from models.adapters import adapter_path, announcement_key
from stack.daemon import free_port
from tests.tinymodel import SIGN_OFF, build_tiny_llama, question, styled_answer
from trainer import run as run_module
from trainer.dataset import fetch_chunk_texts
from trainer.registry import Registry
from trainer.run import Launch
from trainer.scheduler import TrainerService


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def tiny_settings(settings: Settings, model: Path, **overrides: object) -> Settings:
    return settings.model_copy(
        update={
            "train_base_model": str(model),
            "train_dtype": "float32",
            "train_threads": 1,
            "train_nice": 0,  # in-process runs would renice the test process itself
            "train_learning_rate": 1e-2,
            "train_steps": 60,
            "train_epochs": 8,
            "train_batch_size": 4,
            "train_max_seq_tokens": 96,
            "train_replay_buffer": 200,
            "train_doc_chunks": 4,
            "train_min_examples": 10,
            "train_min_interval_s": 3600,
            "train_check_interval_s": 1,
            "train_timeout_s": 300,
            "gate_max_new_tokens": 24,
            "gate_max_holdout": 8,
            **overrides,
        }
    )


def style_examples(
    n: int, seed: int = 0, tag: str = "style", tenant: str = "default"
) -> list[ExampleEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = question(rng)
        out.append(
            ExampleEvent(
                example_id=f"{tag}-{i}", tenant=tenant, prompt=q, response=styled_answer(rng, q)
            )
        )
    return out


def junk_examples(n: int, seed: int = 1) -> list[ExampleEvent]:
    rng = random.Random(seed)
    chars = string.ascii_lowercase + "{}:;!?  "
    return [
        ExampleEvent(
            example_id=f"junk-{i}",
            tenant="default",
            prompt=question(rng),
            response="".join(rng.choice(chars) for _ in range(rng.randint(20, 40))),
            source="adversarial",
        )
        for i in range(n)
    ]


def publish(s: Settings, events: list[ExampleEvent]) -> None:
    p = producer(s)
    for e in events:
        p.send(s.examples_topic, key=e.tenant.encode(), value=e.to_bytes())
    p.flush(timeout=60)
    p.close()


def announcements(s: Settings, scope: str = "default") -> list[AdapterAnnouncement]:
    """The announcements of one scope's adapter, in order."""
    c = consumer(s, s.adapters_topic, group_id=None, consumer_timeout_ms=3000)
    key = announcement_key(scope)
    got = [AdapterAnnouncement.model_validate_json(m.value) for m in c if m.key == key]
    c.close()
    return got


def in_process(job_dir: Path, timeout_s: float, on_line=None, on_start=None, **_) -> Launch:
    """Run a job in this process (so a test can patch it); the real path is a subprocess."""
    started = time.monotonic()
    rc = run_module.main(["--job", str(job_dir)])
    return Launch(rc, False, time.monotonic() - started)


def chunk_collection(s: Settings, texts: dict[str, str], tenant: str | None = None) -> None:
    """Chunks written through the index's own store (4-d vectors: no model is loaded)."""
    store = ChunkStore(s, variant_id(s), 4)
    rows = [ChunkRow(cid, tenant or s.default_tenant, "k" * 40, "doc.md", 1, "", text,
                     [1.0, 0, 0, 0]) for cid, text in texts.items()]  # fmt: skip
    store.write_chunks(rows)
    store.close()


def test_chunk_texts_come_from_milvus_or_nowhere(settings):
    assert fetch_chunk_texts(settings, "default", ["c1"], limit=8) == []  # no index: no text
    chunk_collection(settings, {"c1": "kafka text", "c2": "other", "c3": "milvus text"})
    chunk_collection(settings, {"b1": "tenant b's secret"}, tenant="b")
    got = fetch_chunk_texts(settings, "default", ["c1", "c3", "missing"], limit=8)
    assert sorted(got) == ["kafka text", "milvus text"]
    assert fetch_chunk_texts(settings, "default", ["c1", "c3"], limit=1) == ["milvus text"]
    # Another tenant's chunk never comes back, even when its id is asked for.
    assert fetch_chunk_texts(settings, "default", ["c1", "b1"], limit=8) == ["kafka text"]
    assert fetch_chunk_texts(settings, "b", ["c1", "b1"], limit=8) == ["tenant b's secret"]
    assert fetch_chunk_texts(settings, HOUSE, ["c1", "b1"], limit=8) == []  # never documents
    gone = settings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{free_port()}"})
    assert fetch_chunk_texts(gone, "default", ["c1"], limit=8, timeout_s=2) == []


def test_scheduled_run_learns_the_style_and_is_promoted(settings, tiny_model):
    s = tiny_settings(settings, tiny_model)
    examples = style_examples(40)
    publish(s, examples)
    # Changed documents: their new chunks' text joins the run (vocabulary).
    chunk_collection(s, {"d1-c0": "Kafka keeps events.", "d1-c1": "Milvus keeps vectors."})
    p = producer(s)
    change = ChangeEvent(
        tenant="default", doc_id="d1", op="added", version=1, added_chunk_ids=["d1-c0", "d1-c1"]
    )
    p.send(s.changes_topic, value=change.to_bytes()).get(timeout=60)
    p.close()
    lines: list[str] = []
    service = TrainerService(s, on_line=lines.append)
    service.start()
    try:
        registry = Registry(s, "default")
        deadline = time.monotonic() + 240
        while registry.current() is None and time.monotonic() < deadline:
            listing = registry.listing()["versions"]
            if listing and listing[-1]["status"] in ("failed", "rejected"):
                break
            time.sleep(0.5)
    finally:
        service.stop()
    listing = Registry(s, "default").listing()
    assert listing["current"] is not None, (listing, lines[-30:])
    version = listing["current"]
    record = listing["versions"][-1]
    assert record["version"] == version and record["status"] == "accepted"
    assert "examples" in record["trigger"]
    before, after = record["metrics"]["before"], record["metrics"]["after"]
    assert after["adherence"] > before["adherence"]
    assert after["adherence"] >= 0.75
    assert after["loss"] < before["loss"]
    assert any(line.rstrip().endswith("s)") and " step " in line for line in lines)  # progress

    folder = adapter_path(s, "default", version)
    meta = json.loads((folder / "headwater.json").read_text())
    assert meta["base_model"] == str(tiny_model) and meta["parent"] is None
    assert meta["profile"]["sign_off"] == SIGN_OFF and meta["profile"]["json_body"]
    assert meta["data"]["new_examples"] + meta["data"]["heldout_examples"] == 40
    assert meta["data"]["doc_texts"] == 2
    job = json.loads(
        (s.data_dir / "trainer" / "jobs" / "default" / version / "job.json").read_text()
    )
    trained = {e["example_id"] for e in job["new"] + job["replay"]}
    assert trained and not trained & {e["example_id"] for e in job["heldout"]}

    got = announcements(s)
    assert [a.version for a in got] == [version]
    assert got[0].uri is None and got[0].manifest_sha256  # the files travel on the topic
    # The drift baseline moved to the new adapter: its examples are no longer "new".
    figures = service.tracker.update()["default"]
    assert figures.examples == 0 and figures.docs_added == 0

    # What the query consumer will do: load the adapter on the base model and switch to it.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, folder, adapter_name=version)
    model.set_adapter(version)
    assert model.active_adapter == version


def test_adversarial_examples_are_rejected_and_current_stays(settings, tiny_model):
    s = tiny_settings(settings, tiny_model, train_replay_buffer=4)
    service = TrainerService(s, launcher=in_process)
    publish(s, style_examples(40))
    service.tracker.update()
    first = service.train("default", "style")
    assert first.promoted, first
    # Junk answers to the same kind of questions, fewer than the style examples so far.
    publish(s, junk_examples(20))
    assert service.tracker.update()["default"].examples == 20
    second = service.train("default", "junk")
    assert second.status == "rejected" and not second.promoted, second
    assert "adherence dropped" in second.reason
    registry = Registry(s, "default")
    assert registry.current() == first.version
    assert [a.version for a in announcements(s)] == [first.version]
    assert adapter_path(s, "default", second.version).is_dir()  # kept, never current
    assert service.tracker.figures("default").examples == 20  # still pending: nothing promoted
    # The policy would retrain now, but not on exactly the data the gate just rejected.
    again = TrainerService(s.model_copy(update={"train_min_interval_s": 0}), launcher=in_process)
    assert again.check() is None
    assert "same data as the rejected run" in again.last_decision.reason


def test_killed_run_leaves_registry_and_current_consistent(settings, tiny_model):
    first = TrainerService(tiny_settings(settings, tiny_model, train_steps=10), launcher=in_process)
    publish(settings, style_examples(16))
    first.tracker.update()
    current = first.train("default", "first").version
    registry = Registry(settings, "default")
    assert registry.current() == current
    publish(settings, style_examples(12, seed=3, tag="more"))
    s = tiny_settings(settings, tiny_model, train_steps=100_000, train_epochs=100_000)
    service = TrainerService(s)
    service.tracker.update()
    killed = []

    def on_line(line: str) -> None:
        # Once training has begun: SIGKILL the run process, as an OOM killer would.
        if "before:" in line and not killed and service.running_pid:
            killed.append(service.running_pid)
            os.kill(service.running_pid, signal.SIGKILL)

    service.on_line = on_line
    outcome = service.train("default", "kill me")
    assert killed and outcome.status == "failed"
    assert "signal 9" in outcome.reason
    assert registry.current() == current
    assert service.tracker.figures("default").examples == 12  # still pending
    assert not list(registry.root.glob(".tmp-*"))
    assert not adapter_path(s, "default", outcome.version).exists()
    statuses = {v["version"]: v["status"] for v in registry.listing()["versions"]}
    assert statuses == {current: "accepted", outcome.version: "failed"}
    assert [a.version for a in announcements(s)] == [current]

    # A run whose parent died too: half-written folders and a record stuck at "training".
    stuck = registry.begin(parent=current, trigger="parent killed")
    (registry.root / f".tmp-{stuck}").mkdir()
    registry.folder(stuck).mkdir()
    (registry.folder(stuck) / "adapter_config.json").write_text("{}")  # no weights or metadata
    with pytest.raises(Exception, match="training"):
        registry.promote(stuck)
    assert registry.cleanup() == [stuck]
    assert not registry.folder(stuck).exists() and not list(registry.root.glob(".tmp-*"))
    assert {v["version"]: v["status"] for v in registry.listing()["versions"]}[stuck] == "failed"
    assert registry.current() == current


def test_run_timeout_is_killed_and_recorded(settings, tiny_model):
    s = tiny_settings(settings, tiny_model, train_timeout_s=2)
    publish(s, style_examples(12))
    service = TrainerService(s)
    service.tracker.update()
    outcome = service.train("default", "too slow")
    assert outcome.status == "failed" and "timed out" in outcome.reason
    assert Registry(s, "default").current() is None
    assert service.running_pid is None


def test_disk_full_on_save_leaves_the_current_adapter(settings, tiny_model, monkeypatch):
    s = tiny_settings(settings, tiny_model, train_steps=20)
    service = TrainerService(s, launcher=in_process)
    publish(s, style_examples(16))
    service.tracker.update()
    first = service.train("default", "first")
    assert first.promoted, first
    publish(s, style_examples(12, seed=5, tag="more"))
    service.tracker.update()

    from peft import PeftModel

    def full(self, *args, **kwargs):
        Path(args[0]).mkdir(parents=True, exist_ok=True)
        (Path(args[0]) / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # half written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    outcome = service.train("default", "second")
    assert outcome.status == "failed" and "No space left on device" in outcome.reason
    registry = Registry(s, "default")
    assert registry.current() == first.version
    assert not list(registry.root.glob(".tmp-*")) and not registry.folder(outcome.version).exists()
    assert [a.version for a in announcements(s)] == [first.version]
    assert service.tracker.figures("default").examples == 12  # not consumed by a failed run


def fake_version(s: Settings, registry: Registry, status: str = "accepted") -> str:
    """A finished version without training (registry and CLI tests)."""
    version = registry.begin(parent=registry.current(), trigger="test")
    folder = registry.folder(version)
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "headwater.json"):
        (folder / name).write_text("{}")
    registry.finish(version, status, "test", {"after": {"adherence": 1.0, "loss": 0.5}})
    return version
