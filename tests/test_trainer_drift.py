"""Drift figures and example intake on the real broker."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from headwater.events import ChangeEvent, ExampleEvent
from headwater.runtime.clients import consumer, producer
from headwater.settings import Settings
from service.cli import main
from trainer.drift import DriftTracker
from trainer.examples import ExampleLog


def cli_env(monkeypatch: pytest.MonkeyPatch, s: Settings) -> None:
    """Point `headwater` (which builds Settings from the environment) at a test's settings."""
    for key, value in {
        "DATA_DIR": s.data_dir,
        "KAFKA_PORT": s.kafka_port,
        "MILVUS_PORT": s.milvus_port,
        "TOPIC_PREFIX": s.topic_prefix,
        "COLLECTION_PREFIX": s.collection_prefix,
        "TENANTS": json.dumps(s.tenants),
        "TRAIN_BASE_MODEL": s.train_base_model,
    }.items():
        monkeypatch.setenv(f"HEADWATER_{key}", str(value))


def make_changes(rng: random.Random, n: int, dim: int = 8, start: int = 0) -> list[ChangeEvent]:
    events = []
    for i in range(start, start + n):
        op = rng.choice(["added", "changed", "deleted"])
        added = [] if op == "deleted" else [f"d{i}-c{j}" for j in range(rng.randint(1, 4))]
        removed = [] if op == "added" else [f"old{i}-c{j}" for j in range(rng.randint(1, 3))]
        vecs = np.array([rng.gauss(0, 1) for _ in range(dim * len(added))]).reshape(-1, dim)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
        events.append(
            ChangeEvent(
                tenant="default",
                doc_id=f"doc{i}",
                op=op,
                version=i,
                added_chunk_ids=added,
                removed_chunk_ids=removed,
                embedding_sum=vecs.sum(axis=0).tolist() if added else None,
                terms=rng.sample([f"w{k}" for k in range(60)], rng.randint(0, 5)) if added else [],
            )
        )
    return events


def make_examples(rng: random.Random, n: int) -> list[ExampleEvent]:
    return [
        ExampleEvent(
            tenant="default",
            prompt=f"q{rng.random()}",
            response=f"a{i}",
            weight=rng.choice([0.5, 1.0, 2.0]),
        )
        for i in range(n)
    ]


def publish(s: Settings, topic: str, events: list) -> None:
    p = producer(s)
    for e in events:
        p.send(topic, key=e.tenant.encode(), value=e.to_bytes())
    p.flush(timeout=60)
    p.close()


def expected(changes: list[ChangeEvent], examples: list[ExampleEvent]) -> dict[str, object]:
    return {
        "docs_added": sum(c.op == "added" for c in changes),
        "docs_changed": sum(c.op == "changed" for c in changes),
        "docs_deleted": sum(c.op == "deleted" for c in changes),
        "chunks_added": sum(len(c.added_chunk_ids) for c in changes),
        "chunks_removed": sum(len(c.removed_chunk_ids) for c in changes),
        "new_terms": len({t for c in changes for t in c.terms}),
        "examples": len(examples),
        "example_weight": pytest.approx(sum(e.weight for e in examples)),
    }


def picked(figures: dict[str, object], keys) -> dict[str, object]:
    return {k: figures[k] for k in keys}


def test_drift_counts_match_and_survive_restart(settings):
    rng = random.Random(7)
    changes, examples = make_changes(rng, 40), make_examples(rng, 13)
    publish(settings, settings.changes_topic, changes)
    publish(settings, settings.examples_topic, examples)
    # A broken event on each topic: skipped and counted as such, never fatal.
    p = producer(settings)
    p.send(settings.changes_topic, value=b"{not json")
    p.send(settings.examples_topic, value=json.dumps({"tenant": "default"}).encode())
    p.flush(timeout=60)
    p.close()

    want = expected(changes, examples)
    got = DriftTracker(settings).update().flat()
    assert picked(got, want) == want
    assert got["skipped_events"] == 2
    assert got["changed_docs"] == len(changes)
    assert got["embedding_shift"] == 0.0  # no adapter snapshot yet

    # A fresh tracker (a restart) resumes from the saved offsets: nothing counted twice.
    again = DriftTracker(settings).update().flat()
    assert picked(again, want) == want
    assert len(ExampleLog(settings.data_dir / "trainer" / "examples.jsonl").read()) == 13

    more_c, more_e = make_changes(rng, 9, start=100), make_examples(rng, 4)
    publish(settings, settings.changes_topic, more_c)
    publish(settings, settings.examples_topic, more_e)
    after = DriftTracker(settings).update().flat()
    assert picked(after, want) == expected(changes + more_c, examples + more_e)


def test_drift_crash_between_log_append_and_save_counts_once(settings):
    rng = random.Random(3)
    first = make_examples(rng, 5)
    publish(settings, settings.examples_topic, first)
    tracker = DriftTracker(settings)
    tracker.update()
    committed = tracker.examples.size()
    # Simulate a crash after appending a batch to the log but before saving offsets.
    second = make_examples(rng, 3)
    tracker.examples.append(second)
    publish(settings, settings.examples_topic, second)
    figures = DriftTracker(settings).update()
    assert figures.examples == 8
    assert [e.example_id for e in tracker.examples.read()] == [e.example_id for e in first + second]
    assert tracker.examples.size() > committed


def test_drift_rebase_keeps_snapshot_and_what_came_after(settings):
    rng = random.Random(11)
    before = make_changes(rng, 30)
    publish(settings, settings.changes_topic, before)
    publish(settings, settings.examples_topic, make_examples(rng, 6))
    tracker = DriftTracker(settings)
    tracker.update()
    mark = tracker.mark()
    # Arrives while the run trains: must stay counted after the promotion.
    during_c, during_e = make_changes(rng, 7, start=200), make_examples(rng, 2)
    publish(settings, settings.changes_topic, during_c)
    publish(settings, settings.examples_topic, during_e)
    tracker.update()
    figures = tracker.rebase(mark).flat()

    snapshot_terms = {t for c in before for t in c.terms}
    want = expected(during_c, during_e)
    want["new_terms"] = len({t for c in during_c for t in c.terms} - snapshot_terms)
    assert picked(figures, want) == want

    def total(events):
        sums = [np.array(c.embedding_sum) for c in events if c.embedding_sum]
        return np.sum(sums, axis=0), sum(len(c.added_chunk_ids) for c in events if c.embedding_sum)

    (b_sum, b_n), (d_sum, d_n) = total(before), total(during_c)
    shift = np.linalg.norm((b_sum + d_sum) / (b_n + d_n) - b_sum / b_n)
    assert figures["embedding_shift"] == pytest.approx(shift, rel=1e-6)
    assert DriftTracker(settings).figures().flat() == figures  # persisted


def test_cli_drift_json(settings, monkeypatch, capsys):
    rng = random.Random(5)
    changes = make_changes(rng, 6)
    publish(settings, settings.changes_topic, changes)
    cli_env(monkeypatch, settings)
    assert main(["drift", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = expected(changes, [])
    assert picked(out, want) == want
    assert all(not isinstance(v, dict | list) for v in out.values())  # flat
    assert main(["drift"]) == 0
    assert "docs_changed" in capsys.readouterr().out


def test_cli_example_add(settings, monkeypatch, capsys, tmp_path):
    cli_env(monkeypatch, settings)
    assert main(["example", "add", "--prompt", "Hi?", "--response", "Hello.\n-- Bot"]) == 0
    rows = [
        {"prompt": "a?", "response": "b", "weight": 2.5},
        {"prompt": "c?", "response": "d", "tenant": "default", "example_id": "fixed-1"},
    ]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert main(["example", "add", "--file", str(good)]) == 0
    capsys.readouterr()

    # Bad input: clear one-line errors, and nothing is published.
    assert main(["example", "add", "--prompt", "x", "--response", "y", "--tenant", "acme"]) == 2
    assert "unknown tenant 'acme'" in capsys.readouterr().err
    assert main(["example", "add", "--prompt", "x", "--response", "y", "--weight", "-1"]) == 2
    assert "weight" in capsys.readouterr().err
    assert main(["example", "add", "--prompt", "x"]) == 2
    assert "--response" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "no response"}) + "\n")
    assert main(["example", "add", "--file", str(bad)]) == 2
    assert f"{bad}:2: missing text field(s) response" in capsys.readouterr().err
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n")
    assert main(["example", "add", "--file", str(bad)]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err

    c = consumer(settings, settings.examples_topic, group_id=None, consumer_timeout_ms=3000)
    got = [ExampleEvent.model_validate_json(m.value) for m in c]
    c.close()
    assert sorted(e.prompt for e in got) == ["Hi?", "a?", "c?"]
    assert {e.prompt: e.weight for e in got}["a?"] == 2.5
    assert "fixed-1" in {e.example_id for e in got}
    figures = DriftTracker(settings).update()
    assert figures.examples == 3 and figures.example_weight == pytest.approx(4.5)
