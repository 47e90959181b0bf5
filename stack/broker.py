"""The local Apache Kafka on 127.0.0.1: one KRaft node (broker+controller), or a cluster of N.

Jars come from Maven Central through `stack/pom.xml` and are cached outside the repo, in
`<cache_dir>/kafka-<version>/libs`; the broker's data lives in `<data_dir>/kafka`. The compose
file's apache/kafka image has the same version as these jars.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from headwater.errors import StackError
from headwater.settings import Settings
from stack.daemon import Daemon, port_open

JAVA_MIN = 17
START_TIMEOUT_S = 90.0
FETCH_TIMEOUT_S = 900.0

LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
"""


@dataclass(frozen=True)
class Node:
    """One KRaft node (broker and controller) of the local cluster."""

    node_id: int  # from 1
    port: int
    controller_port: int
    home: Path
    daemon: Daemon

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "logs" / "server.log"


class LocalBroker:
    """Fetch, format, start, stop and report the local Kafka described by `settings`.

    One KRaft node by default; `kafka_brokers` nodes (combined broker + controller, a static
    quorum of all of them, the same mode as the apache/kafka image) form a local cluster whose
    default replication is min(3, nodes) with min.insync.replicas 2 from three nodes on.
    A single node keeps its files directly in `<data_dir>/kafka`, node i of a cluster in
    `<data_dir>/kafka/node-<i>`; `cluster.json` there records the layout, so `stop` and
    `status` find every node of a cluster started with `--brokers`.
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.uses_local_kafka:
            raise StackError(
                f"HEADWATER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} points at another cluster; "
                "headwater starts no local broker"
            )
        self.settings = settings
        self.home = settings.data_dir / "kafka"
        self.libs = settings.cache_dir / f"kafka-{settings.kafka_version}" / "libs"
        layout = self._layout()
        count = layout["brokers"] if layout else settings.kafka_brokers
        port = layout["port"] if layout else settings.kafka_port
        controller = layout["controller_port"] if layout else settings.kafka_controller_port
        self.nodes = [self._node(i, count, port, controller) for i in range(count)]

    def _node(self, i: int, count: int, port: int, controller_port: int) -> Node:
        home = self.home if count == 1 else self.home / f"node-{i + 1}"
        name = "Kafka broker" if count == 1 else f"Kafka node {i + 1}"
        daemon = Daemon(name, home / "broker.pid", home / "logs" / "stdout")
        return Node(i + 1, port + 2 * i, controller_port + 2 * i, home, daemon)

    def _layout(self) -> dict | None:
        try:
            return json.loads((self.home / "cluster.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def daemon(self) -> Daemon:
        """The first node's process (the only one of a single-node broker)."""
        return self.nodes[0].daemon

    @property
    def address(self) -> str:
        """Bootstrap servers: every node's client address."""
        return ",".join(node.address for node in self.nodes)

    def running(self) -> bool:
        return any(node.daemon.pid() is not None for node in self.nodes)

    def status(self) -> str | None:
        """The bootstrap address if every node runs and answers, else None."""
        for node in self.nodes:
            if node.daemon.pid() is None or not port_open("127.0.0.1", node.port):
                return None
        return self.address

    # -- setup -------------------------------------------------------------------------------
    def fetch(self) -> Path:
        """Download the broker's jars once (Maven); later calls return the cached folder."""
        if (self.libs / ".complete").exists():
            return self.libs
        java_check()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Maven (mvn) is required to fetch the Kafka jars; install it")
        tmp = self.libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pom = Path(str(files("stack") / "pom.xml"))
        cmd = [
            mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
            f"-Dkafka.version={self.settings.kafka_version}",
        ]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise StackError(
                f"Maven did not fetch the Kafka jars in {FETCH_TIMEOUT_S:.0f}s"
            ) from exc
        if out.returncode != 0:
            errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "ERROR" in ln]
            detail = (errors or (out.stdout + out.stderr).strip().splitlines() or ["?"])[0]
            raise StackError(f"Maven could not fetch the Kafka jars: {detail.strip()[:300]}")
        (tmp / ".complete").write_text(self.settings.kafka_version)
        shutil.rmtree(self.libs, ignore_errors=True)
        tmp.rename(self.libs)
        return self.libs

    def properties(self, node: Node) -> str:
        s = self.settings
        count = len(self.nodes)
        replicas = min(3, count)
        min_isr = 2 if count >= 3 else 1
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node.node_id}",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://127.0.0.1:{node.port},"
                f"CONTROLLER://127.0.0.1:{node.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={node.home / 'data'}",
                f"num.partitions={s.partitions}",
                f"default.replication.factor={replicas}",
                f"min.insync.replicas={min_isr}",
                f"offsets.topic.replication.factor={replicas}",
                "offsets.topic.num.partitions=10",
                f"transaction.state.log.replication.factor={replicas}",
                f"transaction.state.log.min.isr={min_isr}",
                f"share.coordinator.state.topic.replication.factor={replicas}",
                f"share.coordinator.state.topic.min.isr={min_isr}",
                "auto.create.topics.enable=false",
                "message.max.bytes=8388608",
                "replica.fetch.max.bytes=8388608",
                # Local nodes: rebalances need not wait for more members.
                "group.initial.rebalance.delay.ms=0",
                "group.min.session.timeout.ms=500",
                "log.cleaner.backoff.ms=5000",
                "",
            ]
        )

    def _format(self, java: str, node: Node, cluster_id: str) -> None:
        if (node.home / "data" / "meta.properties").exists():
            return
        cp = str(self.libs / "*")
        # Every node of a static quorum is formatted with the same cluster id.
        _run([java, "-cp", cp, "kafka.tools.StorageTool", "format", "-t", cluster_id,
              "-c", str(node.home / "server.properties")])  # fmt: skip

    def _cluster_id(self, java: str) -> str:
        layout = self._layout()
        if layout and layout.get("cluster_id"):
            return layout["cluster_id"]
        legacy = self.home / "data" / "meta.properties"  # a single node from before cluster.json
        if len(self.nodes) == 1 and legacy.exists():
            props = legacy.read_text()
            found = re.search(r"^cluster\.id=(\S+)", props, re.M)
            if found:
                return found.group(1)
        out = _run([java, "-cp", str(self.libs / "*"), "kafka.tools.StorageTool", "random-uuid"])
        return out.strip().splitlines()[-1]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        """Start every node (or find them running) and return the bootstrap address."""
        layout = self._layout()
        held = layout["brokers"] if layout else None
        if held is None and (self.home / "data" / "meta.properties").exists():
            held = 1
        if held is not None and held != self.settings.kafka_brokers:
            raise StackError(
                f"{self.home} holds a {held}-node Kafka; start it with --brokers {held}, or use "
                "another HEADWATER_DATA_DIR"
            )
        if self.status():
            return self.address
        java = java_check()
        for node in self.nodes:
            if node.daemon.pid() is not None:
                continue
            for port in (node.port, node.controller_port):
                if port_open("127.0.0.1", port):
                    raise StackError(
                        f"port {port} is in use by another process; set HEADWATER_KAFKA_PORT / "
                        "HEADWATER_KAFKA_CONTROLLER_PORT, or HEADWATER_KAFKA_BOOTSTRAP for "
                        "that broker"
                    )
        self.fetch()
        cluster_id = self._cluster_id(java)
        for node in self.nodes:
            (node.home / "logs").mkdir(parents=True, exist_ok=True)
            (node.home / "server.properties").write_text(self.properties(node))
            (node.home / "log4j2.properties").write_text(LOG4J2)
        with ThreadPoolExecutor(len(self.nodes)) as pool:  # one JVM each: format side by side
            list(pool.map(lambda node: self._format(java, node, cluster_id), self.nodes))
        self._save_layout(cluster_id)
        # All at once: a node of a quorum does not finish starting before a majority runs.
        started = [(node, self._spawn(java, node)) for node in self.nodes
                   if node.daemon.pid() is None]  # fmt: skip
        for node, (proc, ready) in started:
            node.daemon.wait_ready(proc, ready, timeout=START_TIMEOUT_S)
        return self.address

    def start_node(self, node: Node) -> None:
        """Start one node of a running cluster again (after it was stopped or killed)."""
        proc, ready = self._spawn(java_check(), node)
        node.daemon.wait_ready(proc, ready, timeout=START_TIMEOUT_S)

    def _spawn(self, java: str, node: Node) -> tuple[subprocess.Popen, Callable[[], bool]]:
        # A restarted node appends to its log: only a "started" line after this point counts.
        offset = node.log.stat().st_size if node.log.exists() else 0
        argv = [
            java, f"-Xmx{self.settings.kafka_heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={node.home / 'logs'}",
            f"-Dlog4j2.configurationFile={node.home / 'log4j2.properties'}",
            "-cp", str(self.libs / "*"), "kafka.Kafka", str(node.home / "server.properties"),
        ]  # fmt: skip
        return node.daemon.spawn(argv), lambda: _started(node, offset)

    def _save_layout(self, cluster_id: str) -> None:
        first = self.nodes[0]
        layout = {
            "brokers": len(self.nodes),
            "port": first.port,
            "controller_port": first.controller_port,
            "cluster_id": cluster_id,
        }
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "cluster.json").write_text(json.dumps(layout))

    def stop(self) -> bool:
        """Stop every node; True if any was running."""
        # All at once: a node stopped last, alone, would wait for a quorum that is gone.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return any(list(pool.map(lambda node: node.daemon.stop(timeout=30.0), self.nodes)))


def _started(node: Node, offset: int) -> bool:
    if not port_open("127.0.0.1", node.port):
        return False
    try:
        with node.log.open("rb") as log:
            log.seek(offset)
            return b"Kafka Server started" in log.read()
    except FileNotFoundError:
        return False


def java_check() -> str:
    """Path of a Java >= 17, or StackError with what is missing."""
    java = shutil.which("java", path=_java_path())
    if java is None:
        raise StackError(f"Java {JAVA_MIN}+ is required to run the local Kafka broker; install it")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise StackError("`java -version` did not answer within 30s") from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(m.group(1)) if m else 0
    if major == 1 and m and m.group(2):  # "1.8" style
        major = int(m.group(2))
    if major < JAVA_MIN:
        raise StackError(f"Java {JAVA_MIN}+ is required for Kafka 4; found Java {major or '?'}")
    return java


def _java_path() -> str:
    home = os.environ.get("JAVA_HOME")
    path = os.environ.get("PATH", "")
    return f"{home}/bin:{path}" if home else path


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        last = (out.stdout + out.stderr).strip().splitlines() or ["?"]
        raise StackError(f"{' '.join(argv[-3:])} failed: {last[-1][:300]}")
    return out.stdout


__all__ = ["LocalBroker", "Node", "StackError", "java_check"]
