"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas and agree with each other
and with the service (config, probe paths, port, metric names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from recstream.embeddings.model import MFConfig
from recstream.stream.config import build_config, load_config
from recstream.stream.service import RecStreamService
from recstream.stream.web import ServiceHttp

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in .[dev])")

K8S = Path(__file__).parent.parent / "deploy" / "k8s"
# Kinds the Kubernetes schemas do not cover (CRDs); checked for consistency below instead.
CUSTOM_KINDS = {"ServiceMonitor"}


def _resources() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _resources() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(version):
    kinds = set()
    for doc in _resources():
        kinds.add(doc["kind"])
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises with the offending field
    assert kinds == {"ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget", "ServiceMonitor"}


@pytest.fixture(autouse=True)
def _pod_name(monkeypatch):
    """What the StatefulSet puts in the environment (the ConfigMap's group.instance.id reads it)."""
    monkeypatch.setenv("POD_NAME", "recstream-0")


def test_configmap_is_a_valid_recstream_config_with_the_model_defaults():
    config = build_config(tomllib.loads(_one("ConfigMap")["data"]["recstream.toml"]))
    assert config.kafka_consumer["group.instance.id"] == "recstream-0"  # static membership, per pod
    env = {e["name"]: e for e in _one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert config.http.host == "0.0.0.0" and config.http.port > 0
    assert config.model == MFConfig()
    # deploy/recstream.toml (docker-compose) too: neither may quietly change what the README documents.
    assert load_config(Path(__file__).parent.parent / "deploy" / "recstream.toml").model == MFConfig(dim=32)


def test_statefulset_probes_port_and_grace_match_the_service():
    config = build_config(tomllib.loads(_one("ConfigMap")["data"]["recstream.toml"]))
    sts = _one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": config.http.port}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Shutdown may wait for deliveries (delivery_timeout_s) and then write a checkpoint.
    assert pod["terminationGracePeriodSeconds"] >= 2 * config.output.delivery_timeout_s
    # The liveness probe must not kill a pod before /healthz itself says the loop is stuck.
    probe = container["livenessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= config.http.liveness_timeout_s / 2
    state_dir = container["args"][container["args"].index("--state-dir") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == state_dir
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["state"]
    assert pod["volumes"][0]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]


def test_selectors_find_the_pods_and_the_metrics_port():
    pod_labels = _one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    sts = _one("StatefulSet")
    assert _one("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    for doc in _resources():
        selector = doc.get("spec", {}).get("selector")
        if doc["kind"] in ("Service",):
            assert selector.items() <= pod_labels.items()
        elif doc["kind"] in ("PodDisruptionBudget", "StatefulSet"):
            assert selector["matchLabels"].items() <= pod_labels.items()
    monitor = _one("ServiceMonitor")
    services = [d for d in _resources() if d["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    assert len(services) == 1  # one scrape per pod, not one per Service
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_dashboard_queries_only_metrics_the_service_exports():
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    config = load_config(overrides={"kafka.bootstrap.servers": "unused:9092"})
    service = RecStreamService(config)  # no broker needed: the collector reads state only
    exposition = ServiceHttp(service).metrics.exposition().decode()
    exported = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}
    # Counters are exported as NAME_total, histograms as NAME_bucket/_sum/_count.
    names = set()
    for name in exported:
        names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\brecstream_[a-z_]+", target["expr"]))
    assert used and used <= names, sorted(used - names)
