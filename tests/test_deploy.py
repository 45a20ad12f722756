"""What operators deploy: the Kubernetes manifests (validated against the API schemas that
``kubernetes-validate`` ships, offline), the Grafana dashboard (every metric it queries is one
the gateway exports, every query is valid PromQL) and the Prometheus alerting rules
(``promtool check rules`` and ``promtool test rules``, promtool from Debian's ``prometheus``)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.config import parse_config
from gateway.infra.metrics import Metrics
from gateway.supervisor import Supervisor
from tests.debian import ensure_binary

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "modelbridge.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes we claim to run on, and the newest whose schemas the package ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Metrics named by the contract that the dashboard and the rules use before the gateway exports
# them, with where they come from. Remove an entry when its metric lands.
NOT_YET_EXPORTED: dict[str, str] = {}  # metric -> the contract section that will bring it
METRIC = re.compile(r"\bmodelbridge_[a-z0-9_]+\b")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    found = [doc for path in MANIFESTS for doc in load_all(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@cache
def gateway_series() -> frozenset[str]:
    """Every sample name the gateway's metric families produce (``_total`` of a counter,
    ``_bucket``/``_sum``/``_count`` of a histogram, a gauge's own name)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + s for s in suffixes[family.type])
    return frozenset(names)


@cache
def promtool() -> str:
    return ensure_binary(("promtool",), "prometheus", recommends=False)


def run_promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# Kubernetes


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    docs = load_all(path)
    assert docs
    for doc in docs:
        # strict: a misspelt or misplaced field fails instead of being silently dropped
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in MANIFESTS if p.name != "secret.example.yaml")


def test_config_in_the_configmap_loads_and_matches_the_container() -> None:
    text = one("ConfigMap")["data"]["config.yaml"]
    config = parse_config(yaml.safe_load(text), env={})
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert config.server.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [config.server.port]
    assert config.models and config.upstreams
    cpu = container["resources"]["requests"]["cpu"]
    assert int(cpu) == config.server.workers, "one CPU requested per worker process"


def test_probes_and_termination_follow_the_gateway() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # /readyz gives each store check 2 s; the probe must wait longer than that
    assert container["readinessProbe"]["timeoutSeconds"] > 2
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    config = parse_config(yaml.safe_load(one("ConfigMap")["data"]["config.yaml"]), env={})
    writer_drain = inspect.signature(Supervisor.stop_writer).parameters["timeout_s"].default
    needed = int(pre_stop[1]) + config.server.shutdown_timeout_s + writer_drain
    assert spec["terminationGracePeriodSeconds"] >= needed
    assert spec["terminationGracePeriodSeconds"] <= needed + 15, "no needless wait on SIGKILL"


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert one("Service")["spec"]["selector"] == labels
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "a PDB of maxUnavailable 1 needs two pods"
    service_port = one("Service")["spec"]["ports"][0]["targetPort"]
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert service_port in {p["name"] for p in ports}


def test_secret_example_names_every_secret_with_placeholders_only() -> None:
    secret = one("Secret")
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    config = parse_config(yaml.safe_load(one("ConfigMap")["data"]["config.yaml"]), env={})
    needed = {
        "MODELBRIDGE_ADMIN_TOKEN",
        "MODELBRIDGE_DATABASE_URL",
        "MODELBRIDGE_REDIS_URL",
        *(u.api_key_env for u in config.upstreams.values() if u.api_key_env),
    }
    assert set(secret["stringData"]) == needed
    for name, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{name} must be a placeholder"


# Grafana


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]


def test_dashboard_parses_and_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "modelbridge"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = dashboard_queries()
    used = {m for q in queries for m in METRIC.findall(q)}
    unknown = used - gateway_series() - set(NOT_YET_EXPORTED)
    assert not unknown, f"the dashboard queries metrics the gateway does not export: {unknown}"
    # what contract section 7 asks the dashboard to show
    assert {
        "modelbridge_requests_total",
        "modelbridge_limit_rejections_total",
        "modelbridge_spend_usd_total",
        "modelbridge_gateway_overhead_seconds_bucket",
        "modelbridge_upstream_ttfb_seconds_bucket",
        "modelbridge_usage_events_pending",
        "modelbridge_inflight_requests",
        "modelbridge_upstream_attempts_total",  # routing, contract section 9
        "modelbridge_fallbacks_total",
    } <= used
    assert any(q.startswith("histogram_quantile(") for q in queries)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, its Grafana variables filled in, as a recording rule: promtool parses it."""
    fill = {"$__rate_interval": "5m", "$job": "modelbridge", "$instance": ".*"}
    rules = []
    for i, query in enumerate(dashboard_queries()):
        for variable, value in fill.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


# Prometheus


def test_alerting_rules_check() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    out = run_promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert f"SUCCESS: {len(rules)} rules found" in out
    used = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    unknown = used - gateway_series() - set(NOT_YET_EXPORTED)
    assert not unknown, f"the rules query metrics the gateway does not export: {unknown}"


def test_every_alert_has_a_firing_case_and_the_cases_pass() -> None:
    alerts = {r["alert"] for r in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check["exp_alerts"]
    }
    assert fired == alerts
    out = run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert "SUCCESS" in out
