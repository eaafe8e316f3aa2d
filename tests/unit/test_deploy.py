"""containers/kubernetes and containers/monitoring, checked offline: the manifests against the Kubernetes
schemas (kubernetes-validate) and the KEDA and prometheus-operator CRDs (cloudcoil's models, generated from
them), every name they share with the worker against the code, the rules with promtool, and every metric
the rules and the dashboard read against sentiment/monitor.py."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PodMonitor

from sentiment.config import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "containers/kubernetes"
MONITORING = ROOT / "containers/monitoring"
# An old minor that managed clusters still run (extended support) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

PROMETHEUS_OWN = frozenset({"up"})  # written by Prometheus for every target


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every file under containers/kubernetes but the kustomization, by name."""
    return {p.name: documents(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def one(kind: str, file: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests()[file] if d["kind"] == kind]
    return doc


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def keda_queries() -> list[str]:
    return [
        t["metadata"]["query"]
        for docs in manifests().values()
        for d in docs
        if d["kind"] == "ScaledObject"
        for t in d["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


# A metric name in PromQL: ours all start with sentiment_, plus Prometheus's `up`. Names next to a colon
# are recording rules (defined in rules.yml), not metrics.
_METRIC = re.compile(r"(?<![\w:])(sentiment_\w+|up)(?![\w:(])")


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC.findall(e)}


def used_metrics() -> set[str]:
    exprs = [r["expr"] for r in rules()] + dashboard_exprs() + keda_queries()
    return metric_names(exprs)


def exported_metrics() -> set[str]:
    """Sample names sentiment/monitor.py exports, read from its source: Counter("x") is x_total, …"""
    suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}
    tree = ast.parse((ROOT / "sentiment/monitor.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in suffixes
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.update(node.args[0].value + s for s in suffixes[node.func.id])
    return names


def test_core_manifests_validate_against_the_kubernetes_schema() -> None:
    checked = set()
    for docs in manifests().values():
        for doc in docs:
            if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
                continue  # custom resources: next test
            # strict: an unknown field (a typo) is an error, not silently ignored by the API server
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
            checked.add(doc["kind"])
    assert checked == {"ConfigMap", "Secret", "Deployment"}


@pytest.mark.parametrize(
    ("kind", "model"),
    [("ScaledObject", ScaledObject), ("PodMonitor", PodMonitor)],
    ids=["keda", "podmonitor"],
)
def test_custom_resources_match_their_crds(kind: str, model: Any) -> None:
    found = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    assert found
    for doc in found:
        parsed = model.model_validate(doc)  # types and required fields (KEDA metadata values are strings)
        # The models ignore unknown fields; a round trip that loses one shows a typo.
        assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_kustomization_applies_the_default_set() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    # One ScaledObject per Deployment; the example Secret is never applied.
    assert [r for r in resources if r.startswith("keda-")] == ["keda-redis-streams.yaml"]
    assert "secret.example.yaml" not in resources


def test_settings_names_match_the_code() -> None:
    names = Settings.env_names()
    config = one("ConfigMap", "configmap.yaml")["data"]
    secret = one("Secret", "secret.example.yaml")["stringData"]
    assert set(config) <= names and set(secret) <= names
    Settings.from_env({**config, **secret}, dotenv=None)  # the values parse
    container = one("Deployment", "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e] == ["sentiment"]
    assert [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e] == ["sentiment"]
    for file, docs in manifests().items():
        for doc in docs:
            if doc["kind"] != "ScaledObject":
                continue
            for trigger in doc["spec"]["triggers"]:
                meta = trigger["metadata"]
                for key, value in meta.items():
                    if key.endswith("FromEnv"):  # KEDA reads these from the worker's environment
                        assert value in names and value in {*config, *secret}, (file, key)
                if trigger["type"].startswith("redis"):
                    assert meta["stream"] == config["REDIS_STREAM_NAME"], file
                    assert meta["consumerGroup"] == config["REDIS_CONSUMER_GROUP"], file


def test_ports_paths_and_the_pod_match_the_worker() -> None:
    config = one("ConfigMap", "configmap.yaml")["data"]
    pod = one("Deployment", "deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == int(config["METRICS_PORT"])
    monitor = (ROOT / "sentiment/monitor.py").read_text()
    probes = {
        name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {p["port"] for p in probes.values()} == {port["name"]}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    assert all(f'"{p["path"]}"' in monitor for p in probes.values())
    (endpoint,) = one("PodMonitor", "podmonitor.yaml")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # The kubelet's SIGKILL comes well after the worker's own grace, with room to close its pools.
    assert pod["terminationGracePeriodSeconds"] >= float(config["SHUTDOWN_GRACE_S"]) + 10
    # One inference thread per requested CPU (the worker would count the node's cores).
    assert int(config["INFERENCE_THREADS"]) == int(container["resources"]["requests"]["cpu"])
    # The measured peak with the longest texts (585 MB, README "Benchmarks") fits the request, with
    # room to grow under the limit; the image's user; /tmp writable, the rest not.
    resources = {k: int(v["memory"].removesuffix("Mi")) * 2**20 for k, v in container["resources"].items()}
    assert resources["requests"] >= 585e6 and resources["limits"] >= 1.2 * resources["requests"]
    dockerfile = (ROOT / "containers/Dockerfile").read_text()
    assert f"\nUSER {pod['securityContext']['runAsUser']}\n" in dockerfile
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])


def test_compose_prometheus_scrapes_the_worker_with_the_rules() -> None:
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]  # `up --scale worker=3` stays as it was
    assert "./monitoring:/etc/prometheus/sentiment:ro" in prometheus["volumes"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert all((MONITORING / f).is_file() for f in config["rule_files"])
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and "worker" in compose["services"]
    assert sd["port"] == int(compose["services"]["worker"]["environment"]["METRICS_PORT"])
    assert job["metrics_path"] == "/metrics"
    # The rules' WorkerDown matches this job and the PodMonitor's "<namespace>/sentiment".
    assert job["job_name"] == one("PodMonitor", "podmonitor.yaml")["metadata"]["name"] == "sentiment"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool comes with Debian's prometheus package (scripts/setup installs it)"
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules.test.yml"],
        ["check", "config", "prometheus.yml"],
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: list[str]) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load((MONITORING / "rules.test.yml").read_text())["tests"]
    evals = [e for t in tests for e in t.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        outcomes = {bool(e["exp_alerts"]) for e in evals if e["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert}: needs a test that fires it and one that does not"


def test_metrics_used_exist_in_the_worker() -> None:
    used, exported = used_metrics(), exported_metrics()
    # Every metric the rules, the dashboard and the KEDA Prometheus trigger read, the worker exports.
    assert used - exported - PROMETHEUS_OWN == set()


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job"}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '{job=~"$job"' in target["expr"], (panel["title"], target["expr"])
    (cache,) = [p for p in panels if "sentiment_cache_lookups_total" in json.dumps(p)]
    assert "Cache" in cache["title"]
