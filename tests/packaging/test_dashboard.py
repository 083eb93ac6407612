"""The Grafana dashboard in the chart (charts/recupdate/dashboards/recupdate.json): every query names metrics
and labels the operator really exports (read from metrics.py's registry), and the chart ships it as a
ConfigMap for Grafana's dashboard sidecar."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from fixtures.chart import CHART, NAMESPACE, RELEASE, helm
from recupdate_operator import metrics

DASHBOARD = CHART / "dashboards" / "recupdate.json"
# PromQL's aggregations and functions the dashboard may call, and its keywords; any other bare name is a metric.
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "delta", "topk", "bottomk",
             "histogram_quantile", "clamp_min", "clamp_max", "label_values", "vector", "time"}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported() -> dict[str, set[str]]:
    """Each series name the operator's registry exports, with its labels."""
    out: dict[str, set[str]] = {}
    families: set[str] = set()
    for collector in vars(metrics).values():
        if not hasattr(collector, "_labelnames") or not hasattr(collector, "describe"):
            continue
        for family in collector.describe():
            families.add(family.name)
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
            for suffix in suffixes:
                labels = set(collector._labelnames) | ({"le"} if suffix == "_bucket" else set())
                out[family.name + suffix] = labels
    # the registry is the source: every family it serves is one of the metrics read above, and only those
    assert families == {f.name for f in metrics.REGISTRY.collect()}
    return out


def parse(expr: str) -> tuple[list[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {name.strip() for m in GROUPING.finditer(e) for name in m.group(2).split(",") if name.strip()}
    labels |= {m.split("=")[0].strip(" !~") for sel in SELECTOR.findall(e) for m in sel.split(",") if m.strip()}
    e = GROUPING.sub(" ", SELECTOR.sub(" ", re.sub(r"\[[^\]]*\]", " ", e)))
    names = []
    for m in NAME.finditer(e):
        token = m.group()
        if e[m.end() :].lstrip().startswith("("):
            assert token in FUNCTIONS, f"{token}() in {expr!r}"
        elif token not in KEYWORDS:
            names.append(token)
    return names, labels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, q
            yield f"variable {var['name']}", f"sum by ({m.group(2)}) ({m.group(1)})"


def test_every_query_names_a_metric_the_operator_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported()
    used: set[str] = set()
    for where, expr in queries(dashboard):
        names, labels = parse(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            assert name in series, f"{where}: {name} is not exported by the operator (metrics.py)"
        known = set().union(*(series[n] for n in names))
        assert labels <= known, f"{where}: labels {sorted(labels - known)} are not on {names}"
        used.update(names)
    # what the dashboard is for: freshness, drift, cost per day, promotions, rejections and analysis verdicts
    assert {
        "recupdate_staleness_seconds",
        "recupdate_drift",
        "recupdate_run_cpu_seconds_total",
        "recupdate_run_gpu_seconds_total",
        "recupdate_promotions_total",
        "recupdate_rejections_total",
        "recupdate_analysis_verdicts_total",
    } <= used


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(recupdate_no_such_thing_total[5m]))", "recupdate_no_such_thing_total is not exported"),
        ("sum by (verdict) (recupdate_promotions_total)", "labels ['verdict']"),
        ('up{job="recupdate"}', "up is not exported"),
    ],
)
def test_the_check_catches_a_wrong_query(expr: str, problem: str) -> None:
    series = exported()
    names, labels = parse(expr)
    missing = [n for n in names if n not in series]
    known = set().union(*(series[n] for n in names if n in series))
    found = [f"{n} is not exported" for n in missing] + ([f"labels {sorted(labels - known)}"] if labels - known else [])
    assert any(problem in f for f in found), found


def test_the_chart_ships_it_for_the_sidecar() -> None:
    out = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--set", "metrics.grafanaDashboard.enabled=true", "--show-only", "templates/grafana-dashboard.yaml",
    )  # fmt: skip
    (cm,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["recupdate.json"]) == json.loads(DASHBOARD.read_text())
    off = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE)
    assert "grafana_dashboard" not in off.stdout  # a toggle, off by default
    lint = helm("lint", "--strict", str(CHART), "--set", "metrics.grafanaDashboard.enabled=true")
    assert "0 chart(s) failed" in lint.stdout
