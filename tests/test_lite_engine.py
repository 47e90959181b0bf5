"""The local Milvus Lite server: milvus-lite 2.5's binary behind `stack.litebinary`'s guards.

Each test starts its own server on its own data dir (a few seconds each), since what is tested
is what happens to a server: a second one on the same data, on the same port, and a kill -9.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pymilvus import DataType, MilvusClient

from headwater.settings import Settings
from stack.daemon import free_port, pid_alive, port_open
from stack.litebinary import DB_FILE
from stack.liteserver import LiteServer


def _settings(tmp_path, name: str = "a") -> Settings:
    return Settings(
        data_dir=tmp_path / name, milvus_port=free_port(), milvus_uri=None, kafka_bootstrap=None
    )


def _launch(db_file, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stack.litebinary", "--db-file", str(db_file), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _refused(proc: subprocess.Popen) -> tuple[int, str]:
    """The launcher's exit code and message; a launcher that started a server fails the test."""
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the launcher started a second server instead of refusing")
    return proc.returncode, err


def test_a_second_server_is_refused_on_the_same_data_and_on_a_busy_port(tmp_path):
    s = _settings(tmp_path)
    lite = LiteServer(s)
    lite.start()
    try:
        # Same data file, another port: the data dir's lock is held.
        code, err = _refused(_launch(lite.home / DB_FILE, free_port()))
        assert code == 3 and "served by another process" in err
        # Another data file, the running server's port: its gRPC socket has SO_REUSEPORT, so
        # the binary would start and the kernel would split clients between two servers.
        code, err = _refused(_launch(tmp_path / "other" / DB_FILE, s.milvus_port))
        assert code == 4 and "in use" in err
        # A listener that is not Milvus counts too.
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            code, err = _refused(_launch(tmp_path / "third" / DB_FILE, busy.getsockname()[1]))
        assert code == 4
        # The first server still answers, alone.
        client = MilvusClient(uri=s.milvus_address, dedicated=True)
        try:
            assert client.list_collections() == []
        finally:
            client.close()
    finally:
        lite.stop()


def test_kill_9_frees_the_data_dir_and_keeps_acknowledged_writes(tmp_path):
    s = _settings(tmp_path)
    lite = LiteServer(s)
    lite.start()
    pid = lite.daemon.pid()
    assert pid is not None
    client = MilvusClient(uri=s.milvus_address, dedicated=True)
    try:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        idx = client.prepare_index_params()
        idx.add_index("v", index_type="FLAT", metric_type="COSINE")
        client.create_collection("c", schema=schema, index_params=idx)
        client.insert("c", [{"id": i, "v": [1.0, float(i), 0.0, 1.0]} for i in range(100)])
        client.delete("c", filter="id not in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]")
    finally:
        client.close()
    os.kill(pid, signal.SIGKILL)  # the launcher exec'd the binary: this pid is the server
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    # The kernel closes the dead server's socket as it reaps it (slow on a loaded machine).
    while port_open("127.0.0.1", s.milvus_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    lite.start()  # the locks died with the server
    client = MilvusClient(uri=s.milvus_address, dedicated=True)
    try:
        rows = client.query("c", filter="id >= 0", output_fields=["id"], limit=1000)
        assert sorted(r["id"] for r in rows) == list(range(10))
    finally:
        client.close()
        lite.stop()
