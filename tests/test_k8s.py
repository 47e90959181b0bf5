"""deploy/k8s cannot be applied here (no cluster): parse it and check it agrees with the settings,
the CLI, the probes and the compose file, as tests/test_compose.py does for compose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from headwater.settings import Settings
from service.cli import build_parser
from service.gateway import guard_api
from service.running import guard_metrics
from tests.composefile import headwater_services

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def config() -> dict[str, str]:
    return by_kind("ConfigMap")["headwater-config"]["data"]


def secret_example() -> dict[str, str]:
    return yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def test_every_file_parses_and_every_workload_runs_a_real_command():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    workloads = [d for d in manifests() if d["kind"] in WORKLOADS]
    names = {d["metadata"]["name"] for d in workloads}
    assert names == {"headwater-topics", "headwater-indexer", "headwater-answerer",
                     "headwater-standing", "headwater-trainer", "headwater-api"}  # fmt: skip
    compose = {tuple(s["command"]) for s in headwater_services().values()}
    for w in workloads:
        (container,) = pod(w)["containers"]
        assert container["command"][0] == "headwater" and container["command"][1] in commands
        assert tuple(container["command"]) in compose  # the same services as compose
        refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
        assert refs == ["headwater-config", "headwater-secrets"]
    replicas = {
        d["metadata"]["name"]: d["spec"]["replicas"] for d in workloads if "replicas" in d["spec"]
    }
    assert replicas["headwater-indexer"] == 3 and replicas["headwater-answerer"] == 2


def _settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`Settings()` from the ConfigMap and the example Secret, as environment variables."""
    for key in [k for k in os.environ if k.startswith("HEADWATER_")]:
        monkeypatch.delenv(key)
    for key, value in (config() | secret_example()).items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_config_and_secret_load_through_settings(monkeypatch):
    fields = {f"HEADWATER_{name.upper()}" for name in Settings.model_fields}
    data = config()
    assert {k for k in data if k.startswith("HEADWATER_")} <= fields
    assert not [k for k in data if "TOKEN" in k or "PASSWORD" in k], "secrets in the ConfigMap"
    assert set(secret_example()) <= fields
    s = _settings(monkeypatch)
    assert s.replication_factor == 3 and s.min_insync_replicas == 2
    assert s.tenants == ["default"] and s.api_tokens == {"change-me": "default"}
    assert not s.uses_local_kafka and not s.uses_local_milvus
    guard_api(s, insecure=False)  # 0.0.0.0 is allowed: the Secret holds API tokens
    guard_metrics(s, insecure=False)


def test_probes_and_ports_match_the_settings(monkeypatch):
    s = _settings(monkeypatch)
    for name, w in {**by_kind("Deployment"), **by_kind("StatefulSet")}.items():
        (c,) = pod(w)["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == s.metrics_port, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert pod(w)["securityContext"]["runAsNonRoot"] is True
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["data"] == str(s.data_dir)
        if w["kind"] == "Deployment":  # a data dir of its own, never a shared disk
            assert {"name": "data", "emptyDir": {}} in pod(w)["volumes"]
        else:
            assert w["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    (api,) = pod(by_kind("Deployment")["headwater-api"])["containers"]
    assert {"name": "http", "containerPort": s.api_port} in api["ports"]
    service = by_kind("Service")["headwater-api"]["spec"]
    assert service["ports"][0]["targetPort"] == "http"
    assert service["selector"]["app.kubernetes.io/component"] == "api"
    monitor = next(d for d in manifests() if d["kind"] == "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"]["key"] == "HEADWATER_METRICS_TOKEN"


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_selectors_match_their_pods(kind):
    for name, w in by_kind(kind).items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
