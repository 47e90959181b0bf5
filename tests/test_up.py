"""`headwater up` end to end: one process, real broker and Milvus Lite, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from stack.daemon import free_port


@pytest.fixture
def up(settings, tmp_path):
    port = free_port()
    env = os.environ | {
        "HEADWATER_DATA_DIR": str(settings.data_dir),
        "HEADWATER_KAFKA_BOOTSTRAP": settings.bootstrap,
        "HEADWATER_MILVUS_URI": settings.milvus_address,
        "HEADWATER_TOPIC_PREFIX": settings.topic_prefix,
        "HEADWATER_COLLECTION_PREFIX": settings.collection_prefix,
        "HEADWATER_INDEXER_GROUP": settings.indexer_group,
        "HEADWATER_QUERY_GROUP": settings.query_group,
        "HEADWATER_PARTITIONS": str(settings.partitions),
        "HEADWATER_API_PORT": str(port),
        "HEADWATER_API_TOKENS": json.dumps({"secret-a": "default"}),
        "HEADWATER_METRICS_TOKEN": "metrics-secret",
        "HEADWATER_GENERATOR": "",  # extractive answers keep this test fast
        "HF_HUB_OFFLINE": "1",
    }
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--no-trainer"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("headwater up did not serve /healthz: " + (tmp_path / "up.log").read_text())
    yield base, proc, tmp_path / "up.log"
    if proc.poll() is None:
        proc.kill()
    log.close()


def test_up_serves_publish_search_ask_delete_and_stops_on_sigterm(up):
    base, proc, logfile = up
    auth = {"Authorization": "Bearer secret-a"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
        assert (
            http.get("/v1/search", params={"q": "x"}, headers={"Authorization": ""}).status_code
            == 401
        )
        r = http.post("/v1/documents", json={
            "doc_id": "guide/ferries.md",
            "text": "# Ferries\n\nThe night ferry to the island leaves at 23:40 from pier 9.",
        })  # fmt: skip
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = http.get("/v1/search", params={"q": "night ferry pier", "token": token})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert hits and hits[0]["doc_id"] == "guide/ferries.md"

        kinds = []
        with http.stream("POST", "/v1/ask", json={"question": "When does the night ferry leave?",
                                                   "k": 3, "token": token}) as resp:  # fmt: skip
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kinds.append(line.split(":", 1)[1].strip())
                if kinds and kinds[-1] in ("done", "error"):
                    break
        assert kinds[0] == "hits" and kinds[-1] == "done" and "token" in kinds, kinds

        r = http.delete("/v1/documents/guide/ferries.md")
        assert r.status_code == 200, r.text
        r = http.get("/v1/search", params={"q": "night ferry pier", "token": r.json()["token"]})
        assert all(h["doc_id"] != "guide/ferries.md" for h in r.json()["hits"])
        assert http.get("/metrics").status_code == 401  # a tenant's token reads no metrics
        metrics = http.get("/metrics", headers={"Authorization": "Bearer metrics-secret"}).text
        assert "headwater_events_consumed_total" in metrics
        assert 'headwater_consumer_lag{group="' in metrics  # computed at scrape time
        ready = http.get("/healthz").json()
        assert ready["status"] == "ok" and ready["checks"]["kafka"] == "ok", ready

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, logfile.read_text()[-3000:]
    assert f"http://127.0.0.1:{base.rsplit(':', 1)[1]}" in logfile.read_text()
