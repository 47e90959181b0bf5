"""docker-compose.yml run as local processes: what `docker compose up` would start, minus Docker.

Kafka's three services become a local 3-node KRaft cluster from the same jars
(`stack.broker.LocalBroker`), Milvus (with etcd and MinIO) a local Milvus server; every other
service runs its compose `command` with its compose `environment` (interpolated from an env
file made like .env.example), with the service hostnames mapped to the local ports, the
wildcard binds narrowed to loopback, and one data dir per process, so nothing shares a disk.
A test may override environment values (tiny models, say); each override is explicit.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from headwater.settings import Settings
from stack.broker import LocalBroker, Node
from stack.daemon import free_port, free_ports, last_line, pid_alive
from tests.composefile import environment, load, read_env_file

HEADWATER = str(Path(sys.executable).with_name("headwater"))
READY_TIMEOUT_S = 420.0


@dataclass
class Proc:
    """One replica of a compose service, as a local process."""

    name: str  # e.g. "indexer-2"
    service: str
    argv: list[str]
    env: dict[str, str]
    data_dir: Path
    log: Path
    popen: subprocess.Popen | None = None

    @property
    def metrics_port(self) -> int | None:
        port = self.env.get("HEADWATER_METRICS_PORT")
        return int(port) if port else None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class ComposeRun:
    """The compose stack as processes under `base`; `up()`, drive it, `down()`."""

    base: Path
    milvus_uri: str  # a running local Milvus (Lite server, or the 2.3 standalone)
    milvus_password: str = "Milvus"  # root's password there (Lite accepts any)
    overrides: Mapping[str, str] = field(default_factory=dict)  # env values for every service
    replicas: Mapping[str, int] = field(default_factory=dict)  # instead of deploy.replicas
    only: set[str] | None = None  # services to run (None: all of them)
    env_file: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    kafka: LocalBroker | None = None
    hosts: dict[str, str] = field(default_factory=dict)  # "kafka-1:19092" -> "127.0.0.1:40001"

    # -- setup ---------------------------------------------------------------------------------
    def up(self) -> ComposeRun:
        self.env_file = deployment_env() | {"MILVUS_ROOT_PASSWORD": self.milvus_password}
        compose = load(self.env_file)
        services = compose["services"]
        self._start_kafka(services)
        self.hosts[_milvus_address(services)] = self.milvus_uri.removeprefix("http://")
        init = services["init"]
        self._run_once("init", init)
        for name, svc in services.items():
            if (svc.get("command") or [""])[0] != "headwater" or name == "init":
                continue
            if self.only is not None and name not in self.only:
                continue
            count = self.replicas.get(name, (svc.get("deploy") or {}).get("replicas", 1))
            for i in range(1, count + 1):
                proc = self._proc(name, svc, f"{name}-{i}")
                self.procs[proc.name] = proc
                self.start(proc)
        self.wait_ready()
        return self

    def _start_kafka(self, services: dict[str, Any]) -> None:
        nodes = sorted((int(environment(s)["KAFKA_NODE_ID"]), n) for n, s in services.items()
                       if "KAFKA_NODE_ID" in environment(s))  # fmt: skip
        first = free_ports(2 * len(nodes))
        local = Settings(
            data_dir=self.base / "kafka-cluster", kafka_brokers=len(nodes), kafka_port=first,
            kafka_controller_port=first + 1, kafka_bootstrap=None, milvus_uri=None,
        )  # fmt: skip
        self.kafka = LocalBroker(local)
        self.kafka.start()
        for (node_id, name), node in zip(nodes, self.kafka.nodes, strict=True):
            assert node.node_id == node_id
            listeners = environment(services[name])["KAFKA_ADVERTISED_LISTENERS"]
            internal = dict(x.split("://") for x in listeners.split(","))["INTERNAL"]
            self.hosts[internal] = node.address

    def _map(self, value: str) -> str:
        for compose_address, local in self.hosts.items():
            value = value.replace(compose_address, local)
        return value

    def _environment(self, svc: Mapping[str, Any], data_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
        for key, value in environment(svc).items():
            env[key] = self._map(value)
        env |= {
            "HEADWATER_DATA_DIR": str(data_dir),  # one data dir per process: no shared disk
            "HEADWATER_CACHE_DIR": str(Settings().cache_dir),  # converted weights, jars
            "OMP_NUM_THREADS": "1",  # eight processes on a small machine
        }
        for key in ("HEADWATER_METRICS_HOST", "HEADWATER_API_HOST"):
            if env.get(key) == "0.0.0.0":
                env[key] = "127.0.0.1"  # a shared host: the ports stay on loopback
        if env.get("HEADWATER_METRICS_PORT"):
            env["HEADWATER_METRICS_PORT"] = str(free_port())
        if env.get("HEADWATER_API_PORT"):
            env["HEADWATER_API_PORT"] = str(free_port())
        env |= dict(self.overrides)
        return env

    def _proc(self, service: str, svc: Mapping[str, Any], name: str) -> Proc:
        data_dir = self.base / "data" / name
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [HEADWATER, *svc["command"][1:]]
        env = self._environment(svc, data_dir)
        return Proc(name, service, argv, env, data_dir, self.base / "logs" / f"{name}.log")

    def _run_once(self, name: str, svc: Mapping[str, Any]) -> None:
        proc = self._proc(name, svc, name)
        proc.log.parent.mkdir(parents=True, exist_ok=True)
        with open(proc.log, "wb") as log:
            done = subprocess.run(proc.argv, env=proc.env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, f"{name} exited with {done.returncode}: {proc.tail()}"

    # -- processes -----------------------------------------------------------------------------
    def start(self, proc: Proc) -> None:
        proc.log.parent.mkdir(parents=True, exist_ok=True)
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                proc.argv, env=proc.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def kill(self, proc: Proc) -> None:
        """kill -9: no goodbye to the group, nothing flushed."""
        assert proc.popen is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(30)

    def wait_ready(self, procs: list[Proc] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every process's /readyz answers 200 (compose's `service_healthy`)."""
        waiting = list(procs or self.procs.values())
        deadline = time.monotonic() + timeout
        while waiting:
            for proc in list(waiting):
                assert proc.alive(), f"{proc.name} exited: {proc.tail()}"
                if self.ready(proc):
                    waiting.remove(proc)
            if time.monotonic() > deadline:
                raise AssertionError(
                    "not ready: " + ", ".join(f"{p.name}: {self.readiness(p)}" for p in waiting)
                    + "\n" + "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in waiting)
                )  # fmt: skip
            time.sleep(1.0)

    def readiness(self, proc: Proc) -> object:
        try:
            return httpx.get(f"http://127.0.0.1:{proc.metrics_port}/readyz", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            return repr(exc)

    def ready(self, proc: Proc) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{proc.metrics_port}/readyz", timeout=5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def metrics(self, proc: Proc) -> str:
        token = proc.env["HEADWATER_METRICS_TOKEN"]
        r = httpx.get(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10,
                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        r.raise_for_status()
        return r.text

    def of(self, service: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.service == service]

    def exec(self, service: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`docker compose exec <service> headwater ...`: its environment and data dir."""
        proc = self.of(service)[0]
        return subprocess.run([HEADWATER, *args], env=proc.env, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    # -- the API -------------------------------------------------------------------------------
    @property
    def api(self) -> str:
        (proc,) = self.of("api")
        return f"http://127.0.0.1:{proc.env['HEADWATER_API_PORT']}"

    @property
    def api_token(self) -> str:
        tokens = json.loads(self.env_file["HEADWATER_API_TOKENS"])
        return next(t for t, tenant in tokens.items() if tenant == "default")

    def settings(self, **update: Any) -> Settings:
        """`Settings()` from the API service's environment (a client of this stack)."""
        env = {k: v for k, v in self.of("api")[0].env.items() if k.startswith("HEADWATER_")}
        env["HEADWATER_DATA_DIR"] = str(self.base / "data" / "client")
        with _environment(env):
            return Settings().model_copy(update=update)

    def node(self, node_id: int) -> Node:
        assert self.kafka is not None
        return self.kafka.nodes[node_id - 1]

    # -- teardown ------------------------------------------------------------------------------
    def down(self) -> None:
        for proc in self.procs.values():
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(30)
        if self.kafka is not None:
            self.kafka.stop()


def deployment_env() -> dict[str, str]:
    """An env file like .env.example, with real values (what an operator writes into .env)."""
    env = read_env_file()
    tokens = json.loads(env["HEADWATER_API_TOKENS"])
    return env | {
        "KAFKA_CLUSTER_ID": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
        "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(16),
        "HEADWATER_API_TOKENS": json.dumps({secrets.token_urlsafe(16): t for t in tokens.values()}),
        "HEADWATER_METRICS_TOKEN": secrets.token_urlsafe(16),
    }


def _milvus_address(services: Mapping[str, Any]) -> str:
    uris = {environment(s).get("HEADWATER_MILVUS_URI") for s in services.values()} - {None}
    (uri,) = uris
    return uri.removeprefix("http://")


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """No HEADWATER_* variable of the test process leaks into a Settings() built here."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("HEADWATER_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def kill_node(node: Node) -> None:
    """kill -9 one Kafka node and wait until it is gone."""
    pid = node.daemon.pid()
    assert pid is not None, f"{node.daemon.name} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    node.daemon.pidfile.unlink(missing_ok=True)
    assert not pid_alive(pid), last_line(node.daemon.logfile)
