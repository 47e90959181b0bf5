"""Drift figures and example intake on the real broker."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from headwater.events import HOUSE, ChangeEvent, ExampleEvent
from headwater.runtime.clients import consumer, producer
from headwater.settings import Settings
from service.cli import main
from trainer.drift import DriftTracker


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


def make_changes(
    rng: random.Random, n: int, dim: int = 8, start: int = 0, tenant: str = "default"
) -> list[ChangeEvent]:
    events = []
    for i in range(start, start + n):
        op = rng.choice(["added", "changed", "deleted"])
        added = [] if op == "deleted" else [f"d{i}-c{j}" for j in range(rng.randint(1, 4))]
        removed = [] if op == "added" else [f"old{i}-c{j}" for j in range(rng.randint(1, 3))]
        vecs = np.array([rng.gauss(0, 1) for _ in range(dim * len(added))]).reshape(-1, dim)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
        events.append(
            ChangeEvent(
                tenant=tenant,
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


def make_examples(
    rng: random.Random, n: int, tenant: str = "default", shared: bool = False
) -> list[ExampleEvent]:
    return [
        ExampleEvent(
            tenant=tenant,
            shared=shared,
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
    tracker = DriftTracker(settings)
    got = tracker.update()["default"].flat()
    assert picked(got, want) == want
    assert tracker.skipped() == 2
    assert got["changed_docs"] == len(changes)
    assert got["embedding_shift"] == 0.0  # no adapter snapshot yet

    # A fresh tracker (a restart) resumes from the saved offsets: nothing counted twice.
    again = DriftTracker(settings).update()["default"].flat()
    assert picked(again, want) == want
    assert len(tracker.examples("default").read()) == 13

    more_c, more_e = make_changes(rng, 9, start=100), make_examples(rng, 4)
    publish(settings, settings.changes_topic, more_c)
    publish(settings, settings.examples_topic, more_e)
    after = DriftTracker(settings).update()["default"].flat()
    assert picked(after, want) == expected(changes + more_c, examples + more_e)


def test_each_tenant_drifts_on_its_own(settings):
    """A tenant's changes and examples count toward its own scope only; shared examples
    toward the house scope only; a tenant nobody knows gets no scope at all."""
    s = settings.model_copy(update={"tenants": ["a", "b"]})
    rng = random.Random(13)
    changes = {t: make_changes(rng, n, start=100 * i, tenant=t)
               for i, (t, n) in enumerate((("a", 9), ("b", 4)))}  # fmt: skip
    examples = {"a": make_examples(rng, 5, tenant="a"), "b": make_examples(rng, 2, tenant="b")}
    shared = make_examples(rng, 3, tenant="b", shared=True)
    publish(s, s.changes_topic, changes["a"] + changes["b"])
    publish(s, s.examples_topic, examples["a"] + shared + examples["b"])
    publish(s, s.examples_topic, make_examples(rng, 2, tenant="stranger"))
    tracker = DriftTracker(s)
    figures = {k: f.flat() for k, f in tracker.update().items()}
    assert sorted(figures) == [HOUSE, "a", "b"]
    for t in ("a", "b"):
        assert picked(figures[t], expected(changes[t], examples[t])) == expected(
            changes[t], examples[t]
        )
        assert [e.example_id for e in tracker.examples(t).read()] == [
            e.example_id for e in examples[t]
        ]
    assert picked(figures[HOUSE], expected([], shared)) == expected([], shared)
    assert tracker.examples(HOUSE).read() == shared
    assert tracker.skipped() == 2
    # Crash after a's state was saved but before the read position was: a skips what it
    # counted, b (not saved) counts its new records once.
    more_a, more_b = make_changes(rng, 3, start=500, tenant="a"), make_examples(rng, 2, tenant="b")
    publish(s, s.changes_topic, more_a)
    publish(s, s.examples_topic, more_b)
    position, b_state = tracker.position_path.read_bytes(), tracker.path("b").read_bytes()
    tracker.update()
    tracker.position_path.write_bytes(position)  # the position save was lost
    tracker.path("b").write_bytes(b_state)  # and so was b's (its log is longer than it says)
    again = {k: f.flat() for k, f in DriftTracker(s).update().items()}
    want_a = expected(changes["a"] + more_a, examples["a"])
    assert picked(again["a"], want_a) == want_a
    want_b = expected(changes["b"], examples["b"] + more_b)
    assert picked(again["b"], want_b) == want_b
    assert len(tracker.examples("b").read()) == 4


def test_drift_crash_between_log_append_and_save_counts_once(settings):
    rng = random.Random(3)
    first = make_examples(rng, 5)
    publish(settings, settings.examples_topic, first)
    tracker = DriftTracker(settings)
    tracker.update()
    log = tracker.examples("default")
    committed = log.size()
    # Simulate a crash after appending a batch to the log but before saving offsets.
    second = make_examples(rng, 3)
    log.append(second)
    publish(settings, settings.examples_topic, second)
    figures = DriftTracker(settings).update()["default"]
    assert figures.examples == 8
    assert [e.example_id for e in log.read()] == [e.example_id for e in first + second]
    assert log.size() > committed


def test_drift_rebase_keeps_snapshot_and_what_came_after(settings):
    rng = random.Random(11)
    before = make_changes(rng, 30)
    publish(settings, settings.changes_topic, before)
    publish(settings, settings.examples_topic, make_examples(rng, 6))
    tracker = DriftTracker(settings)
    tracker.update()
    mark = tracker.mark("default")
    # Arrives while the run trains: must stay counted after the promotion.
    during_c, during_e = make_changes(rng, 7, start=200), make_examples(rng, 2)
    publish(settings, settings.changes_topic, during_c)
    publish(settings, settings.examples_topic, during_e)
    tracker.update()
    figures = tracker.rebase("default", mark).flat()

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
    assert DriftTracker(settings).figures("default").flat() == figures  # persisted


def test_cli_drift_json(settings, monkeypatch, capsys):
    rng = random.Random(5)
    changes = make_changes(rng, 6)
    publish(settings, settings.changes_topic, changes)
    cli_env(monkeypatch, settings)
    assert main(["drift", "--json", "--tenant", "default"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = expected(changes, [])
    assert picked(out, want) == want
    assert out["tenant"] == "default" and out["queue_position"] is None and not out["due"]
    assert out["freshness"]["max_index_lag"] == settings.train_max_index_lag
    assert main(["drift", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert picked(every["tenants"]["default"], want) == want and every["queue"] == []
    assert main(["drift"]) == 0
    assert "changed_docs" in capsys.readouterr().out
    assert main(["drift", "--tenant", "nobody"]) == 2


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
    figures = DriftTracker(settings).update()["default"]
    assert figures.examples == 3 and figures.example_weight == pytest.approx(4.5)
