"""docker-compose.yml cannot run here (no Docker engine): check it agrees with the settings, the
CLI and the local stack, reading every service's environment the way the container will:
`Settings()` from environment variables (tests/test_compose_procs.py runs it as processes).
"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from headwater.errors import InsecureService
from headwater.settings import Settings
from service.gateway import guard_api
from service.running import guard_metrics
from tests.composefile import (
    ROOT,
    MissingVariable,
    environment,
    headwater_services,
    read_env_file,
    services,
    variables,
)

KAFKA = ("kafka-1", "kafka-2", "kafka-3")


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What `Settings()` makes of a container's environment (through the env source)."""
    for key in [k for k in os.environ if k.startswith("HEADWATER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_stack_has_every_service():
    s = services()
    assert {*KAFKA, "etcd", "minio", "milvus", "init"} <= set(s)
    hw = headwater_services()
    assert {"indexer", "answerer", "standing", "trainer", "api", "init"} <= set(hw)
    assert hw["indexer"]["deploy"]["replicas"] == 3
    assert hw["answerer"]["deploy"]["replicas"] == 2
    assert s["milvus"]["command"][-1] == "standalone"
    assert {"etcd", "minio"} <= set(s["milvus"]["depends_on"])


def test_every_service_environment_loads_through_settings(monkeypatch):
    """The containers' values, as environment variables: `HEADWATER_TENANTS=default` etc."""
    fields = {f"HEADWATER_{name.upper()}" for name in Settings.model_fields}
    for name, svc in headwater_services().items():
        env = environment(svc)
        unknown = {k for k in env if k.startswith("HEADWATER_")} - fields
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        s = settings_of(env, monkeypatch)
        assert s.tenants == ["default"], name
        assert s.replication_factor == 3 and s.min_insync_replicas == 2, name
        assert s.bootstrap.split(",") == [f"{k}:19092" for k in KAFKA], name
        assert s.milvus_uri == "http://milvus:19530"
        assert s.milvus_token.get_secret_value().startswith("root:")
        assert s.metrics_port == 9400 and s.metrics_token is not None
    api = settings_of(environment(headwater_services()["api"]), monkeypatch)
    assert api.api_tokens == {"change-me-token-for-default": "default"}


@pytest.mark.parametrize(
    ("tenants", "tokens", "expected"),
    [
        ("default", "", (["default"], {})),
        ("acme, globex", '{"t1": "acme"}', (["acme", "globex"], {"t1": "acme"})),
        ('["acme","globex"]', "{}", (["acme", "globex"], {})),
        ("*", '{"a": "x", "b": "y"}', (["*"], {"a": "x", "b": "y"})),
    ],
)
def test_lists_and_dicts_from_the_environment(monkeypatch, tenants, tokens, expected):
    got = settings_of({"HEADWATER_TENANTS": tenants, "HEADWATER_API_TOKENS": tokens}, monkeypatch)
    assert (got.tenants, got.api_tokens) == expected


def test_kafka_is_three_replicated_nodes_of_the_local_jars_version():
    s = services()
    local = Settings.model_fields["kafka_version"].default
    assert f"<kafka.version>{local}</kafka.version>" in (ROOT / "stack" / "pom.xml").read_text()
    voters = {f"{i}@{name}:9093" for i, name in enumerate(KAFKA, 1)}
    external = []
    for i, name in enumerate(KAFKA, 1):
        node = s[name]
        env = environment(node)
        assert node["image"] == f"apache/kafka:{local}"  # one Kafka version everywhere
        assert env["KAFKA_NODE_ID"] == str(i)
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["CLUSTER_ID"] == read_env_file()["KAFKA_CLUSTER_ID"]
        # The data lives on the volume, not in the image's /tmp default.
        (volume,) = node["volumes"]
        assert volume == f"{name}:{env['KAFKA_LOG_DIRS']}"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        listeners = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
        assert listeners["INTERNAL"] == f"{name}:19092"
        (published,) = node["ports"]
        host_ip, host_port, container = published.split(":")
        assert host_ip == "127.0.0.1" and container == "9092"
        assert listeners["EXTERNAL"] == f"localhost:{host_port}"
        external.append(int(host_port))
    # The same client ports as `headwater kafka start --brokers 3` (node i: 9092 + 2i).
    assert external == Settings(kafka_brokers=3).local_kafka_ports


def test_only_the_api_and_the_kafka_client_listeners_are_published():
    for name, svc in services().items():
        ports = svc.get("ports") or []
        if name in KAFKA:
            assert all(p.startswith("127.0.0.1:") for p in ports), name
        elif name == "api":
            assert ports == ["8700:8700"]
        else:
            assert not ports, f"{name} publishes {ports}"


def test_credentials_come_from_the_env_file_not_literals():
    text = (ROOT / "docker-compose.yml").read_text()
    needed = {name for name, op in variables(text).items() if op in (":?", "?")}
    assert needed >= {"KAFKA_CLUSTER_ID", "MINIO_ROOT_PASSWORD", "MILVUS_ROOT_PASSWORD",
                      "HEADWATER_API_TOKENS", "HEADWATER_METRICS_TOKEN"}  # fmt: skip
    assert needed <= set(read_env_file()), ".env.example must name every required variable"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    uninterpolated = yaml.safe_load(text)["services"]
    for name, svc in uninterpolated.items():
        for key, value in environment(svc).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER", key):
                assert "${" in value, f"{name}: {key} is a literal"
    with pytest.raises(MissingVariable, match="MILVUS_ROOT_PASSWORD"):
        services({k: v for k, v in read_env_file().items() if k != "MILVUS_ROOT_PASSWORD"})


def test_services_beyond_loopback_are_authenticated(monkeypatch):
    api = settings_of(environment(headwater_services()["api"]), monkeypatch)
    assert api.api_host == "0.0.0.0"
    guard_api(api, insecure=False)  # tokens are set: allowed
    guard_metrics(api, insecure=False)
    open_api = api.model_copy(update={"api_tokens": {}})
    with pytest.raises(InsecureService, match="HEADWATER_API_TOKENS"):
        guard_api(open_api, insecure=False)
    with pytest.raises(InsecureService, match="HEADWATER_METRICS_TOKEN"):
        guard_metrics(api.model_copy(update={"metrics_token": None}), insecure=False)


def test_every_service_is_probed_has_its_own_disk_and_waits_for_the_topics():
    from service.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    volumes = []
    for name, svc in headwater_services().items():
        cmd = svc["command"]
        assert cmd[0] == "headwater" and cmd[1] in commands, cmd
        volumes += [v.split(":")[0] for v in svc.get("volumes") or []]
        if name == "init":
            assert svc["restart"] == "no" and svc["depends_on"].keys() == set(KAFKA)
            continue
        assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
        port = environment(svc)["HEADWATER_METRICS_PORT"]
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, name
        assert svc["expose"] == [port]
    assert volumes == ["trainer"], "no disk is shared between headwater services"
