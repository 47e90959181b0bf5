"""docker-compose.yml cannot run here (no Docker engine): check it agrees with the settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from headwater.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_stack_has_kafka_milvus_and_headwater_services():
    s = services()
    assert {"kafka", "etcd", "minio", "milvus", "indexer", "answerer", "trainer", "api"} <= set(s)
    assert s["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert s["milvus"]["command"][-1] == "standalone"
    assert s["indexer"]["deploy"]["replicas"] >= 2


def test_headwater_environment_names_real_settings():
    fields = {f"HEADWATER_{name.upper()}" for name in Settings.model_fields}
    for name in ("indexer", "answerer", "trainer", "api"):
        env = services()[name]["environment"]
        unknown = {k for k in env if k.startswith("HEADWATER_")} - fields
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        # Every service must parse into Settings (types right).
        values = {
            k.removeprefix("HEADWATER_").lower(): v
            for k, v in env.items()
            if k.startswith("HEADWATER_") and "${" not in str(v)
        }
        Settings(**values)


def test_addresses_and_ports_agree():
    s = services()
    env = s["indexer"]["environment"]
    host, port = env["HEADWATER_KAFKA_BOOTSTRAP"].split(":")
    assert f"PLAINTEXT://{host}:{port}" in s["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert env["HEADWATER_MILVUS_URI"].endswith(":19530")
    assert "19530:19530" in s["milvus"]["ports"]
    api = s["api"]["environment"]
    assert f"{api['HEADWATER_API_PORT']}:{api['HEADWATER_API_PORT']}" in s["api"]["ports"]
    assert api["HEADWATER_API_HOST"] == "0.0.0.0"


def test_service_commands_exist_in_the_cli():
    from service.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for name in ("indexer", "answerer", "trainer", "api"):
        cmd = services()[name]["command"]
        assert cmd[0] == "headwater" and cmd[1] in commands, cmd
