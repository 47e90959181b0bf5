"""The local stack on the real broker: produce/consume, persistence across restart, clear errors."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from kafka.admin import NewTopic

from headwater.errors import StackError
from headwater.runtime.clients import admin, consumer, producer
from headwater.settings import Settings
from service.cli import main
from stack.broker import LocalBroker, java_check
from stack.daemon import free_port


def _roundtrip(settings: Settings, topic: str, n: int) -> list[bytes]:
    c = consumer(settings, topic, group_id=None, consumer_timeout_ms=5000)
    got = [m.value for m in c]
    c.close()
    assert len(got) == n
    return got


def test_broker_persists_topics_and_messages_across_restart(tmp_path):
    s = Settings(
        data_dir=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port(), partitions=1
    )
    broker = LocalBroker(s)
    assert broker.start() == f"127.0.0.1:{s.kafka_port}"
    try:
        topic = "persist-" + uuid.uuid4().hex[:6]
        a = admin(s)
        a.create_topics([NewTopic(topic, 1, 1)])
        a.close()
        p = producer(s)
        for i in range(5):
            p.send(topic, key=b"k", value=f"m{i}".encode()).get(30)
        p.close()
        assert _roundtrip(s, topic, 5) == [f"m{i}".encode() for i in range(5)]
        assert broker.stop()
        assert broker.status() is None
        broker.start()
        assert _roundtrip(s, topic, 5) == [f"m{i}".encode() for i in range(5)]
    finally:
        broker.stop()


def test_cli_status_prints_bootstrap_last(stack_settings, monkeypatch, capsys):
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(stack_settings.data_dir))
    monkeypatch.setenv("HEADWATER_KAFKA_PORT", str(stack_settings.kafka_port))
    monkeypatch.setenv("HEADWATER_MILVUS_PORT", str(stack_settings.milvus_port))
    assert main(["kafka", "status"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == stack_settings.bootstrap
    assert main(["milvus", "status"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == stack_settings.milvus_address


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        s = Settings(data_dir=tmp_path, kafka_port=port, kafka_controller_port=free_port())
        with pytest.raises(StackError, match=f"port {port} is in use"):
            LocalBroker(s).start()


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StackError, match="Java 17"):
        java_check()


def test_external_bootstrap_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEADWATER_KAFKA_BOOTSTRAP", "kafka.example:9092")
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(tmp_path))
    assert main(["kafka", "start"]) == 0
    assert capsys.readouterr().out.strip() == "kafka.example:9092"
    assert not (tmp_path / "kafka").exists()
    with pytest.raises(StackError, match="points at another cluster"):
        LocalBroker(Settings(kafka_bootstrap="kafka.example:9092"))


def test_broker_that_dies_at_start_is_reported(tmp_path):
    s = Settings(
        data_dir=tmp_path,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        kafka_heap="1k",
    )  # the JVM refuses such a heap and exits at once
    with pytest.raises(StackError, match="exited with code") as err:
        LocalBroker(s).start()
    assert "\n" not in str(err.value)  # one line, with the log's last line and path


def test_cli_errors_are_one_line_and_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HEADWATER_KAFKA_PORT", str(free_port()))
    monkeypatch.setenv("HEADWATER_KAFKA_CONTROLLER_PORT", str(free_port()))
    monkeypatch.setenv("HEADWATER_KAFKA_HEAP", "1k")
    assert main(["kafka", "start"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwater: Kafka broker exited with code") and "\n" not in err
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["kafka", "start"]) == 2
    assert capsys.readouterr().err.strip() == (
        "headwater: Java 17+ is required to run the local Kafka broker; install it"
    )


def test_a_cluster_is_a_static_quorum_replicated_three_ways(tmp_path):
    """`kafka start --brokers 3` (the compose file's Kafka, locally): ports, quorum, defaults."""
    s = Settings(data_dir=tmp_path, kafka_brokers=3, kafka_port=30000, kafka_controller_port=30001)
    assert s.bootstrap == "127.0.0.1:30000,127.0.0.1:30002,127.0.0.1:30004"
    cluster = LocalBroker(s)
    assert [n.node_id for n in cluster.nodes] == [1, 2, 3]
    assert cluster.address == s.bootstrap
    props = dict(
        line.split("=", 1) for line in cluster.properties(cluster.nodes[1]).splitlines() if line
    )
    assert props["node.id"] == "2" and props["listeners"].startswith("PLAINTEXT://127.0.0.1:30002")
    voters = "1@127.0.0.1:30001,2@127.0.0.1:30003,3@127.0.0.1:30005"
    assert props["controller.quorum.voters"] == voters
    assert props["log.dirs"] == str(tmp_path / "kafka" / "node-2" / "data")
    assert props["default.replication.factor"] == "3" and props["min.insync.replicas"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    single = LocalBroker(Settings(data_dir=tmp_path / "one", kafka_port=30000))
    assert single.properties(single.nodes[0]).count("min.insync.replicas=1") == 1


def test_a_cluster_directory_is_started_with_its_own_node_count(tmp_path, monkeypatch, capsys):
    (tmp_path / "kafka").mkdir()
    layout = {"brokers": 3, "port": 30000, "controller_port": 30001, "cluster_id": "x"}
    (tmp_path / "kafka" / "cluster.json").write_text(json.dumps(layout))
    with pytest.raises(StackError, match="holds a 3-node Kafka; start it with --brokers 3"):
        LocalBroker(Settings(data_dir=tmp_path, kafka_port=free_port())).start()
    # stop and status find the cluster's nodes from its layout, whatever the settings say
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(tmp_path))
    assert len(LocalBroker(Settings(data_dir=tmp_path)).nodes) == 3
    assert main(["kafka", "status"]) == 1 and "not running" in capsys.readouterr().out
