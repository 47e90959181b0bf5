"""Liveness, readiness and metrics of a service: what they report, when, and to whom.

The group-member and lag figures run on the real broker: a consumer stuck in a batch shows a
freshness age that rises at every scrape and a lag that grows, not its last good values.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from headwater.errors import InsecureService
from headwater.health import Health, KafkaCheck, group_check
from headwater.probes import ProbeServer, guard_exposure, is_loopback
from headwater.runtime import lag, member
from headwater.runtime.batches import BatchLoop
from headwater.runtime.clients import producer
from headwater.runtime.deadletter import skip
from service.gateway import create_app
from stack.daemon import free_port


def test_guard_refuses_beyond_loopback_without_authentication(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("api")
    guard_exposure("127.0.0.1", False, "the API", "TOKENS", insecure=False)
    guard_exposure("0.0.0.0", True, "the API", "TOKENS", insecure=False)
    with pytest.raises(InsecureService, match=r"the API would listen on 0\.0\.0\.0 without"):
        guard_exposure("0.0.0.0", False, "the API", "TOKENS", insecure=False)
    guard_exposure("0.0.0.0", False, "the API", "TOKENS", insecure=True)  # allowed, loudly
    assert "INSECURE" in capsys.readouterr().err


def test_readiness_reflects_each_check_and_goes_stale():
    state = {"kafka": True}

    def kafka() -> str:
        if not state["kafka"]:
            raise ConnectionError("no route to kafka-1:19092")
        return "3 brokers"

    health = Health(interval_s=0.05, stale_s=0.5)
    health.ready_check("kafka", kafka)
    ok, results = health.ready()
    assert not ok and results["kafka"].detail == "not checked yet"
    health.refresh()
    ok, results = health.ready()
    assert ok and results["kafka"].detail == "3 brokers"
    state["kafka"] = False
    health.refresh()
    ok, results = health.ready()
    assert not ok and "no route" in results["kafka"].detail
    state["kafka"] = True
    health.refresh()
    time.sleep(0.6)  # nobody refreshed the check for longer than stale_s
    ok, results = health.ready()
    assert not ok and results["kafka"].detail.startswith("stale")


def test_probe_port_answers_probes_openly_and_metrics_only_with_the_token():
    health = Health()
    health.ready_check("milvus", lambda: (_ for _ in ()).throw(OSError("refused at 10.0.0.7")))
    health.live_check("loop", lambda: "running")
    health.refresh()
    server = ProbeServer(health, host="127.0.0.1", port=0, metrics_token="m-secret").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        r = httpx.get(f"{base}/readyz", timeout=5)
        assert r.status_code == 503
        assert r.json() == {"status": "failing", "checks": {"milvus": "failing"}}
        assert "10.0.0.7" not in r.text  # why goes to the log, not to whoever asks
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 503
        assert httpx.get(f"{base}/livez", timeout=5).json()["status"] == "ok"
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{base}/metrics", headers=bad, timeout=5).status_code == 401
        good = {"Authorization": "Bearer m-secret"}
        r = httpx.get(f"{base}/metrics", headers=good, timeout=5)
        assert r.status_code == 200 and "python_info" in r.text
        assert httpx.get(f"{base}/nope", timeout=5).status_code == 404
    finally:
        server.stop()


def test_api_healthz_reflects_kafka_and_milvus_and_metrics_need_a_service_token(settings):
    from fastapi.testclient import TestClient

    down = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    health = Health()
    health.ready_check("kafka", KafkaCheck(down))
    health.refresh()
    s = settings.model_copy(update={"api_tokens": {"tenant-tok": "default"},
                                    "metrics_token": None})  # fmt: skip
    from pydantic import SecretStr

    s = s.model_copy(update={"api_token": SecretStr("admin-tok")})
    client = TestClient(create_app(s, searcher=None, publisher=None, query_client=None,
                                   health=health))  # fmt: skip
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["checks"] == {"kafka": "failing"}
    up = Health()
    up.ready_check("kafka", KafkaCheck(settings))
    up.refresh()
    client = TestClient(create_app(s, searcher=None, publisher=None, query_client=None,
                                   health=up))  # fmt: skip
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/metrics").status_code == 401
    tenant = {"Authorization": "Bearer tenant-tok"}
    assert client.get("/metrics", headers=tenant).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer admin-tok"}).status_code == 200
    health.stop()
    up.stop()


def _scrape(registry_text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in registry_text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    assert want is not None
    return None


def test_a_stuck_consumer_shows_rising_freshness_age_and_lag(settings, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    lag.register(settings, registry)
    release = threading.Event()
    entered = threading.Event()

    def write(items, out):
        entered.set()
        release.wait(60)  # the batch is stuck (a hostile document, Milvus away, ...)
        return []

    group = settings.indexer_group
    loop = BatchLoop(settings, [settings.documents_topic], group=group, client_id="probe-test",
                     decode=lambda r: r.value, write=write, on_error=skip,
                     max_records=10, max_wait_ms=50)  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not loop.member.assignment() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Other members of this process (a session's live app) are listed too: find ours.
        assert f"{group} owns {settings.partitions} partitions" in group_check().split("; ")
        p = producer(settings)
        for i in range(5):
            p.send(settings.documents_topic, key=b"k", value=b"v%d" % i).get(30)
        p.close()
        assert entered.wait(60)
        first = _scrape(generate_latest(registry).decode(), "headwater_freshness_lag_seconds",
                        group=group)  # fmt: skip
        time.sleep(1.5)
        text = generate_latest(registry).decode()
        second = _scrape(text, "headwater_freshness_lag_seconds", group=group)
        assert first is not None and second is not None and second >= first + 1.0, (first, second)
        behind = [
            line
            for line in text.splitlines()
            if line.startswith("headwater_consumer_lag{") and f'group="{group}"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in behind) >= 5, behind
        # Readiness: a member that stopped polling is not doing its work.
        monkeypatch.setattr(member, "STALL_S", 0.5)
        time.sleep(0.6)
        with pytest.raises(RuntimeError, match="has not polled"):
            group_check()
        monkeypatch.setattr(member, "STALL_S", 60.0)
        release.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = generate_latest(registry).decode()
            if _scrape(text, "headwater_freshness_lag_seconds", group=group) == 0.0:
                break
            time.sleep(0.2)
        assert _scrape(text, "headwater_freshness_lag_seconds", group=group) == 0.0
    finally:
        release.set()
        stop.set()
        thread.join(30)
    assert not member.members() or loop.member not in member.members()


def test_a_batch_loop_outlives_a_poll_that_raises(settings):
    """kafka-python raises out of poll when the coordinator's broker dies (ECONNREFUSED): the
    loop keeps its batch and polls again instead of dying with the process."""
    from kafka.errors import KafkaConnectionError

    got = []
    loop = BatchLoop(settings, [settings.documents_topic], group=settings.indexer_group,
                     client_id="poll-fails", decode=lambda r: r.value,
                     write=lambda items, out: got.extend(v for _, v in items) or [],
                     on_error=skip, max_records=10, max_wait_ms=200)  # fmt: skip
    real = loop.member.poll
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KafkaConnectionError("111 ECONNREFUSED")
        return real(*args, **kwargs)

    loop.member.poll = flaky
    try:
        p = producer(settings)
        p.send(settings.documents_topic, key=b"k", value=b"one").get(30)
        p.close()
        deadline = time.monotonic() + 60
        while b"one" not in got and time.monotonic() < deadline:
            loop.run_once()
        assert calls["n"] >= 2 and got == [b"one"]
    finally:
        loop.close()


def test_the_cli_refuses_to_listen_openly_without_tokens(monkeypatch, capsys, tmp_path):
    from service.cli import main

    for key, value in {
        "HEADWATER_DATA_DIR": str(tmp_path),
        "HEADWATER_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "HEADWATER_MILVUS_URI": f"http://127.0.0.1:{free_port()}",
        "HEADWATER_API_HOST": "0.0.0.0",
        "HEADWATER_METRICS_HOST": "0.0.0.0",
        "HEADWATER_METRICS_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "the API would listen on 0.0.0.0 without authentication" in err
    assert "HEADWATER_API_TOKENS" in err and "--insecure" in err
    for command in ("indexer", "answerer", "standing", "trainer"):
        assert main([command]) == 2, command
        assert "the metrics port would listen on 0.0.0.0" in capsys.readouterr().err
