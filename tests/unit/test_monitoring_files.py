"""The Prometheus config, alert rules and Grafana dashboard in monitoring/ are valid and query real metrics."""

import json
import re
import subprocess

import yaml

from monitoring import catalog
from tests.serving import prometheus_tool

ROOT = catalog.MONITORING_DIR.parent
ALERTS_TEST = catalog.MONITORING_DIR / "alerts_test.yml"


def promtool() -> str:
    return prometheus_tool("promtool")


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def dashboard() -> dict:
    return json.loads(catalog.DASHBOARD.read_text())


def panels(items: list[dict]):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def alert_names() -> list[str]:
    groups = yaml.safe_load(catalog.ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def alert_cases() -> list[dict]:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return [case for test in tests for case in test.get("alert_rule_test", [])]


def test_dashboard_identity_and_datasource():
    board = dashboard()
    assert board["uid"] == "maas-cluster"
    assert board["title"] == "maas-cluster"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_dashboard_panel_has_a_query():
    board = dashboard()
    graphs = [p for p in panels(board["panels"]) if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has a target without a query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_referenced_metrics_are_ray_serve_or_maas_metrics():
    names = catalog.referenced_metrics()
    assert {"ray_maas_model_drift_score", "ray_serve_num_http_requests_total", "ray_maas_http_errors_total"} <= names
    assert all(name.startswith(("ray_maas_", "ray_serve_")) for name in names), sorted(names)


def test_maas_metrics_are_declared_in_metrics_module():
    source = (catalog.MONITORING_DIR / "metrics.py").read_text()
    declared = set()
    for kind, name in re.findall(r'(?:metrics\.|Held)(Counter|Gauge|Histogram)\(\s*PREFIX \+ "(\w+)"', source):
        series = [f"{name}_bucket", f"{name}_count", f"{name}_sum"] if kind == "Histogram" else [name]
        declared.update("ray_maas_" + s for s in series)
    assert declared
    # The HTTP proxy's counters are declared where it counts them (it runs no deployment code).
    proxy_source = (ROOT / "deployments" / "proxy.py").read_text()
    declared.update("ray_" + name for name in re.findall(r'_METRIC = "(maas_\w+_total)"', proxy_source))
    undeclared = {n for n in catalog.referenced_metrics() if n.startswith("ray_maas_")} - declared
    assert not undeclared, f"not declared in monitoring/metrics.py: {sorted(undeclared)}"


def test_metric_names_ignore_quoted_label_values():
    expr = 'sum(rate(ray_maas_http_requests_total{route="/ray_x", status=~"ray_y"}[5m])) > on() ray_serve_z'
    assert catalog.metric_names([expr]) == {"ray_maas_http_requests_total", "ray_serve_z"}


def test_every_alert_has_a_firing_and_a_quiet_case():
    names = alert_names()
    assert len(names) == len(set(names))
    cases = alert_cases()
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(names) <= firing, f"no case where these fire: {sorted(set(names) - firing)}"
    assert set(names) <= quiet, f"no case where these stay quiet: {sorted(set(names) - quiet)}"


def test_prometheus_config_is_valid():
    run_promtool("check", "config", "monitoring/prometheus.yml")


def test_alert_rules_are_valid():
    run_promtool("check", "rules", "monitoring/alerts.yml")


def test_alert_rule_unit_tests_pass():
    run_promtool("test", "rules", "monitoring/alerts_test.yml")


def test_dashboard_queries_are_valid_promql(tmp_path):
    # Grafana's variables are substituted the way Grafana would before checking the PromQL.
    exprs = [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in catalog.dashboard_exprs()]
    assert not [e for e in exprs if "$" in e], "unhandled dashboard variable"
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))
