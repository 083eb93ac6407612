"""`recupdate operator` (CLI wiring), RBAC bookkeeping, metrics endpoint, layering, and kubectl against the CRD."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s.kubectl import Kubectl
from recupdate_operator import metrics, rbac
from recupdate_operator.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "manifests" / "crd" / "recommenderupdatepolicies.recupdate.io.yaml"


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recupdate_operator.cli", "operator", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--namespace", "--all-namespaces", "--metrics-port", "--liveness", "--peering", "--standalone",
                 "--verbose"):  # fmt: skip
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"clusterwide": True, "namespaces": [], "standalone": True, "peering_name": None}),
        (["-n", "ml", "--namespace", "ml-*", "--peering", "recupdate", "--priority", "5",
          "--liveness", "http://0.0.0.0:8081/healthz"],
         {"clusterwide": False, "namespaces": ["ml", "ml-*"], "standalone": False, "peering_name": "recupdate",
          "priority": 5, "liveness_endpoint": "http://0.0.0.0:8081/healthz"}),
        (["--all-namespaces", "--standalone"], {"clusterwide": True, "standalone": True}),
    ],
)  # fmt: skip
def test_operator_flags_reach_kopf(monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: dict[str, Any]) -> None:
    import kopf

    seen: dict[str, Any] = {}
    monkeypatch.setattr(kopf, "run", lambda **kw: seen.update(kw))
    monkeypatch.setattr(kopf, "configure", lambda **kw: None)
    monkeypatch.setenv("RECUPDATE_STORE_DSN", "postgresql://op:pw12345@db/recsys")
    args = build_parser().parse_args(["operator", "--metrics-port", "0", "--default-store-secret", "dsn:url", *argv])
    from recupdate_operator import run

    assert run.run(args) == 0
    assert {k: seen[k] for k in expected} == expected
    registry = seen["registry"]
    ids = {h.id for h in registry._spawning.get_all_handlers()} | {h.id for h in registry._watching.get_all_handlers()}
    assert {"recupdate_policy", "recupdate_rayjob", "recupdate_rayservice"} <= ids
    daemons = [h.id for h in registry._spawning.get_all_handlers()]
    # Standalone: no daemon or timer, so kopf puts no finalizer on policies; peering needs one (see handlers.py).
    assert daemons == (["recupdate_lease"] if seen["peering_name"] else [])


def test_every_api_call_has_its_permission() -> None:
    assert rbac.marked_in_source() == rbac.OWN_PERMISSIONS
    scopes = rbac.rules_by_scope()
    assert set(scopes) == set(rbac.SCOPES)
    assert {
        "apiGroups": ["ray.io"],
        "resources": ["rayjobs"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    } in (scopes["namespaced"])
    assert yaml.safe_load(yaml.safe_dump(scopes)) == scopes
    assert ("", "secrets", "get") in rbac.PERMISSIONS and ("", "secrets", "list") not in rbac.PERMISSIONS
    policies = [r for r in scopes["namespaced"] if r["resources"] == ["recommenderupdatepolicies"]]
    assert policies == [
        {
            "apiGroups": ["recupdate.io"],
            "resources": ["recommenderupdatepolicies"],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]


def test_operator_never_imports_the_workloads() -> None:
    code = (
        "import sys, recupdate_operator.run, recupdate_operator.handlers, recupdate_operator.registry, "
        "recupdate_operator.backends.kuberay, recupdate_operator.metrics, recupdate_operator.rbac\n"
        # the workloads' contract package (standard library only, e.g. the shared redaction) is the exception
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers', 'recupdate_workloads')\n"
        "       and m not in ('recupdate_workloads', 'recupdate_workloads.contract')\n"
        "       and not m.startswith('recupdate_workloads.contract.')]\n"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_metrics_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = metrics.serve(port, "127.0.0.1")
    try:
        metrics.RUNS.labels("refresh", "Succeeded").inc(0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        thread.join(5)
    for name in ("recupdate_runs_total", "recupdate_run_duration_seconds", "recupdate_staleness_seconds",
                 "recupdate_active_release", "recupdate_reconcile_errors_total"):  # fmt: skip
        assert f"# HELP {name}" in body


async def test_kubectl_rejects_a_schema_invalid_policy(kubectl: Kubectl) -> None:
    result = await kubectl("apply", "-f", str(CRD))
    assert result.returncode == 0, result.stderr

    def policy(name: str, spec: str) -> str:
        return f"apiVersion: recupdate.io/v1alpha1\nkind: RecommenderUpdatePolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"

    bad = await kubectl("apply", "-f", "-", input=policy("bad", "{retrieval: {refreshInterval: 6 hours}}"))
    assert bad.returncode != 0
    assert "spec.retrieval.refreshInterval" in bad.stderr
    workers = await kubectl("apply", "-f", "-", input=policy("zero", "{fineTune: {resources: {workers: 0}}}"))
    assert workers.returncode != 0 and "spec.fineTune.resources.workers" in workers.stderr
    good = await kubectl("apply", "-f", "-", input=policy("good", "{fineTune: {schedule: '0 3 * * 1'}}"))
    assert good.returncode == 0, good.stderr
    got = await kubectl("get", "rup", "good", "-o", "jsonpath={.spec.retrieval.refreshInterval}")
    assert got.stdout == "6h"  # defaulted by the schema
