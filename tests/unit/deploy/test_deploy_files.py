"""The Prometheus alerting rules and the Grafana dashboard in deploy/: valid, and about the
metrics Bastion really exports.

promtool (Debian's `prometheus` package) checks the rules file, runs its unit tests and
parses every dashboard query; these tests fail, not skip, without it. The rest reads the
files (PyYAML, JSON) and compares every metric and label they name with Bastion's registry.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from bastion.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "bastion-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "bastion-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "bastion-dashboard.json"

# Labels Prometheus adds to every scraped series, and metrics it makes itself.
TARGET_LABELS = {"instance", "job"}
PROMETHEUS_METRICS = {"up": set[str]()}
SEVERITIES = {"info", "warning", "critical"}
# Grafana's variables, as a query would read once Grafana has put their values in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$model": ".*"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


@cache
def exported() -> dict[str, set[str]]:
    """Every sample name Bastion's /metrics can show, with the labels it carries."""
    found: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        (family,) = metric.describe()
        labels = set(metric._labelnames)
        for suffix in _SUFFIXES[family.type]:
            found[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return found


def promtool() -> str:
    # `make prometheus-deps` puts it beside the virtualenv's python when not installed.
    beside = Path(sys.executable).parent / "promtool"
    path = str(beside) if beside.is_file() else shutil.which("promtool")
    if path is None:
        pytest.fail(
            "these tests need promtool on PATH: install Debian's prometheus package "
            "(`make prometheus-deps` as root); do not skip them"
        )
    return path


def rule_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard (variables' selectors too), with the values of
    Grafana's variables put in."""
    board = dashboard()
    queries = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(f"group by ({match[2]}) ({match[1]})")
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def rule_queries() -> list[str]:
    return [rule["expr"] for group in rule_file()["groups"] for rule in group["rules"]]


def metrics_in(query: str) -> set[str]:
    """The metric names a PromQL query selects (functions, keywords, labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match[0]
        rest = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def selectors_in(query: str) -> list[tuple[str, set[str]]]:
    """(metric, label names its matchers use) for each `metric{...}` of the query."""
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", query):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match[2]))
        found.append((match[1], labels))
    return found


def groupings_in(query: str) -> set[str]:
    """The labels of every by/without/on/ignoring clause of the query."""
    found: set[str] = set()
    for match in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
        found.update(label.strip() for label in match[1].split(",") if label.strip())
    return found


# ---------------------------------------------------------------- promtool


def test_promtool_checks_the_rules_file() -> None:
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_rules_fire_as_their_unit_tests_expect() -> None:
    proc = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # promtool checks PromQL only in rule files: each query becomes a recording rule.
    records = [
        {"record": f"dashboard:query_{i}", "expr": query}
        for i, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(records)} rules found" in proc.stdout


# ---------------------------------------------------------------- the files themselves


def test_the_rules_file_is_alerting_rules_with_severities_and_summaries() -> None:
    groups = rule_file()["groups"]
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    assert len(names) == len(set(names)) >= 10
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_the_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        # Every query goes to the data source the viewer picked, none to a fixed one.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["refId"] and target["expr"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


# ---------------------------------------------------------------- against the registry


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_named_is_one_bastion_exports(source: str) -> None:
    queries = rule_queries() if source == "rules" else dashboard_queries()
    known = exported() | PROMETHEUS_METRICS
    named = set().union(*(metrics_in(q) for q in queries))
    assert any(name.startswith("bastion_") for name in named)
    assert named <= set(known), f"not exported: {sorted(named - set(known))}"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_label_used_is_one_its_metrics_carry(source: str) -> None:
    queries = rule_queries() if source == "rules" else dashboard_queries()
    known = exported() | PROMETHEUS_METRICS
    for query in queries:
        for metric, labels in selectors_in(query):
            assert labels <= known[metric] | TARGET_LABELS, (query, metric)
        carried = set().union(*(known[m] for m in metrics_in(query))) | TARGET_LABELS
        assert groupings_in(query) <= carried, query


def test_the_metric_reader_finds_metrics_not_functions_or_labels() -> None:
    query = (
        'sum by (model, le) (rate(bastion_x_bucket{model=~"a|b", route!="/v1"}[5m])) '
        "/ on (model) group_left bastion_y and up offset 5m > bool 0"
    )
    assert metrics_in(query) == {"bastion_x_bucket", "bastion_y", "up"}
    assert selectors_in(query) == [("bastion_x_bucket", {"model", "route"})]
    assert groupings_in(query) == {"model", "le"}
    assert "bastion_alerts_fired_total" in exported()
    assert exported()["bastion_request_duration_seconds_bucket"] == {"route", "le"}
