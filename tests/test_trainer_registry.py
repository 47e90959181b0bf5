"""Adapter registry and its CLI: list --json, promote, rollback, announcements on the broker."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from headwater.errors import RegistryError
from headwater.events import HOUSE
from models.adapters import VERSION_RE, adapter_path
from service.cli import main
from tests.test_trainer_drift import cli_env
from tests.test_trainer_runs import announcements, fake_version
from trainer.registry import Registry


def test_versions_are_sortable_and_never_reused(settings):
    registry = Registry(settings, "default")
    t = datetime(2026, 11, 24, 15, 30, tzinfo=UTC)
    a = registry.begin(None, "x", now=t)
    assert a == "v0001-20261124T1530" and VERSION_RE.match(a)
    registry.finish(a, "failed", "boom")
    (registry.root / ".tmp-v0007-20261124T1530").mkdir()  # a leftover folder still counts
    b = registry.begin(None, "y", now=t)
    assert b == "v0008-20261124T1530"
    assert sorted([b, a]) == [a, b]
    # Each scope numbers its own versions; the adapter name (scope/version) stays unique.
    other = Registry(settings, HOUSE)
    assert other.begin(None, "z", now=t) == "v0001-20261124T1530"
    assert other.folder(a) != registry.folder(a)
    for bad in ("..", "a/b", "_nope", ""):
        with pytest.raises(ValueError, match="scope"):
            Registry(settings, bad)


def test_cli_promote_rollback_and_list_json(settings, monkeypatch, capsys):
    registry = Registry(settings, "default")
    v1 = fake_version(settings, registry)
    v2 = fake_version(settings, registry)
    rejected = fake_version(settings, registry, status="rejected")
    failed = registry.begin(None, "x")
    registry.finish(failed, "failed", "killed")
    cli_env(monkeypatch, settings)

    assert main(["adapters", "promote", v1]) == 0
    assert main(["adapters", "promote", v2]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--json", "--tenant", "default"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"tenant", "versions", "current", "pending"}
    assert listing["current"] == v2 and listing["tenant"] == "default"
    assert listing["pending"]["examples"] == 0 and listing["pending"]["queue_position"] is None
    assert [v["version"] for v in listing["versions"]] == [v1, v2, rejected, failed]
    by_version = {v["version"]: v for v in listing["versions"]}
    assert by_version[v2]["current"] and not by_version[v1]["current"]
    assert by_version[failed]["status"] == "failed" and by_version[failed]["reason"] == "killed"
    assert by_version[v1]["metrics"]["after"]["adherence"] == 1.0
    for v in listing["versions"]:
        assert {"version", "status", "created", "parent", "reason", "metrics", "current"} <= set(v)

    assert main(["adapters", "promote", failed]) == 2
    assert "failed" in capsys.readouterr().err
    assert main(["adapters", "promote", "v9999-20260101T0000"]) == 2
    assert "unknown version" in capsys.readouterr().err

    assert main(["adapters", "rollback"]) == 0
    assert v1 in capsys.readouterr().out
    assert registry.current() == v1
    assert main(["adapters", "rollback", "--tenant", "nobody"]) == 2
    assert "unknown tenant" in capsys.readouterr().err
    # A rejected run can still be promoted by hand (an operator override), and rolled back.
    assert main(["adapters", "promote", rejected]) == 0
    assert main(["adapters", "rollback"]) == 0
    assert registry.current() == v1
    assert main(["adapters", "rollback"]) == 0
    assert registry.current() is None
    capsys.readouterr()
    assert main(["adapters", "rollback"]) == 2
    assert "no current adapter" in capsys.readouterr().err
    assert main(["adapters", "list"]) == 0
    assert v2 in capsys.readouterr().out

    got = [(a.version, a.base_model) for a in announcements(settings)]
    base = settings.train_base_model
    assert got == [(v, base) for v in (v1, v2, v1, rejected, v1, None)]


def test_promotion_is_atomic_when_the_disk_is_full(settings, monkeypatch):
    registry = Registry(settings, "default")
    v1 = fake_version(settings, registry)
    v2 = fake_version(settings, registry)
    registry.promote(v1)
    before = registry.path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        registry.promote(v2)
    monkeypatch.undo()
    assert registry.path.read_bytes() == before and registry.current() == v1
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".registry.json")]


def test_incomplete_folder_cannot_be_promoted(settings):
    registry = Registry(settings, "default")
    v = fake_version(settings, registry)
    (adapter_path(settings, "default", v) / "headwater.json").unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.promote(v)
    assert registry.current() is None


def test_cli_train_without_data(settings, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    assert main(["train"]) == 0
    assert "no run: nothing changed" in capsys.readouterr().out
    assert main(["train", "--now"]) == 2
    assert "no new examples" in capsys.readouterr().err
    assert Registry(settings, "default").listing()["versions"] == []


def test_cli_trainer_runs_until_sigterm(settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    env |= {
        "HEADWATER_DATA_DIR": str(settings.data_dir),
        "HEADWATER_KAFKA_PORT": str(settings.kafka_port),
        "HEADWATER_MILVUS_PORT": str(settings.milvus_port),
        "HEADWATER_TOPIC_PREFIX": settings.topic_prefix,
        "HEADWATER_TRAIN_CHECK_INTERVAL_S": "1",
        "HEADWATER_TRAIN_CRON": "*/5 * * * *",
    }
    err = tmp_path / "stderr.txt"
    with err.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "trainer"], env=env, stderr=sink
        )
        try:
            deadline = time.monotonic() + 120
            while "trainer check: wait: nothing changed" not in err.read_text():
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "trainer running: checks every 1 s and on '*/5 * * * *'" in err.read_text()
