"""The local single-node Apache Kafka broker (KRaft, combined broker+controller) on 127.0.0.1.

Jars come from Maven Central through `stack/pom.xml` and are cached outside the repo, in
`<cache_dir>/kafka-<version>/libs`; the broker's data lives in `<data_dir>/kafka`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


class LocalBroker:
    """Fetch, format, start, stop and report the local broker described by `settings`."""

    def __init__(self, settings: Settings) -> None:
        if not settings.uses_local_kafka:
            raise StackError(
                f"HEADWATER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} points at another cluster; "
                "headwater starts no local broker"
            )
        self.settings = settings
        self.home = settings.data_dir / "kafka"
        self.libs = settings.cache_dir / f"kafka-{settings.kafka_version}" / "libs"
        self.daemon = Daemon(
            "Kafka broker", self.home / "broker.pid", self.home / "logs" / "stdout"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.kafka_port}"

    def running(self) -> bool:
        return self.daemon.pid() is not None

    def status(self) -> str | None:
        """The bootstrap address if the broker runs and answers, else None."""
        if self.running() and port_open("127.0.0.1", self.settings.kafka_port):
            return self.address
        return None

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

    def properties(self) -> str:
        s = self.settings
        data = self.home / "data"
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{s.kafka_controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{s.kafka_port},"
                f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{s.kafka_port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={data}",
                f"num.partitions={s.partitions}",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "auto.create.topics.enable=false",
                "message.max.bytes=8388608",
                "replica.fetch.max.bytes=8388608",
                # A single local node: rebalances need not wait for more members.
                "group.initial.rebalance.delay.ms=0",
                "group.min.session.timeout.ms=500",
                "log.cleaner.backoff.ms=5000",
                "",
            ]
        )

    def _format(self, java: str) -> None:
        if (self.home / "data" / "meta.properties").exists():
            return
        cp = str(self.libs / "*")
        tool = "kafka.tools.StorageTool"
        uuid = _run([java, "-cp", cp, tool, "random-uuid"]).strip().splitlines()[-1]
        _run(
            [
                java,
                "-cp",
                cp,
                tool,
                "format",
                "-t",
                uuid,
                "-c",
                str(self.home / "server.properties"),
            ]
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        """Start (or find running) and return the bootstrap address."""
        if self.status():
            return self.address
        java = java_check()
        for port in (self.settings.kafka_port, self.settings.kafka_controller_port):
            if port_open("127.0.0.1", port):
                raise StackError(
                    f"port {port} is in use by another process; set HEADWATER_KAFKA_PORT / "
                    "HEADWATER_KAFKA_CONTROLLER_PORT, or HEADWATER_KAFKA_BOOTSTRAP for that broker"
                )
        self.fetch()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self.properties())
        (self.home / "log4j2.properties").write_text(LOG4J2)
        self._format(java)
        argv = [
            java, f"-Xmx{self.settings.kafka_heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", str(self.libs / "*"), "kafka.Kafka", str(self.home / "server.properties"),
        ]  # fmt: skip
        self.daemon.start(argv, ready=self._answers, timeout=START_TIMEOUT_S)
        return self.address

    def _answers(self) -> bool:
        if not port_open("127.0.0.1", self.settings.kafka_port):
            return False
        log = self.home / "logs" / "server.log"
        return log.exists() and "Kafka Server started" in log.read_text(errors="replace")

    def stop(self) -> bool:
        return self.daemon.stop(timeout=30.0)


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


__all__ = ["LocalBroker", "StackError", "java_check"]
