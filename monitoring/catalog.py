"""The PromQL expressions of the shipped dashboard and alert rules, and the metric names they reference.

Used by the tests to check that the dashboard and alerts only query metrics the cluster exports.
"""

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

MONITORING_DIR = Path(__file__).parent
DASHBOARD = MONITORING_DIR / "grafana" / "maas-cluster.json"
ALERTS = MONITORING_DIR / "alerts.yml"

# Quoted strings (label values, regexes) are removed before looking for names.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'" + r"|`[^`]*`")
_METRIC = re.compile(r"\bray_[a-zA-Z0-9_]+")


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their panels when collapsed


def dashboard_exprs() -> list[str]:
    """Every ``expr`` of every panel target in the Grafana dashboard, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in _panels(dashboard.get("panels", [])) for t in p.get("targets", []) if "expr" in t]


def alert_exprs() -> list[str]:
    """Every ``expr`` of every rule in alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(exprs: Iterable[str]) -> set[str]:
    """Names of the ``ray_`` metrics the PromQL expressions select, ignoring anything in quotes."""
    return {name for expr in exprs for name in _METRIC.findall(_QUOTED.sub('""', expr))}


def referenced_metrics() -> set[str]:
    """Metric names referenced by the dashboard and the alert rules."""
    return metric_names(dashboard_exprs()) | metric_names(alert_exprs())
