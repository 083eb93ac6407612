"""Packaging against the emulated Kubernetes API (tests/k8s): the real kubectl applies the rendered chart,
the kustomize base and the example policies; the real helm installs and upgrades the chart; the invalid
example is rejected with the schema's message."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import yaml

from fixtures.chart import CHART, EXAMPLES, NAMESPACE, REPO, VARIANTS, helm, render, values_args
from k8s.emulator import EmulatedCluster, minimal_crd
from k8s.kubectl import Helm, Kubectl
from recupdate_operator import api

pytestmark = pytest.mark.timeout(120)


def _dump(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


async def _register_prometheus_operator(cluster: EmulatedCluster) -> None:
    """The chart's optional ServiceMonitor needs prometheus-operator's CRD (an open schema here)."""
    await cluster.apply(minimal_crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors", status=False))


async def _apply(kubectl: Kubectl, docs: list[dict[str, Any]], *extra: str) -> str:
    out = await kubectl("apply", *extra, "-f", "-", input=_dump(docs))
    assert out.returncode == 0, out.stderr
    return out.stdout


async def _create_namespaces(kubectl: Kubectl, *names: str) -> None:
    for name in names:
        out = await kubectl("create", "namespace", name)
        assert out.returncode == 0 or "AlreadyExists" in out.stderr, out.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_kubectl_apply_rendered_chart(variant: str, k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    docs = list(render(variant))
    await _register_prometheus_operator(k8s_cluster)
    await _create_namespaces(kubectl, NAMESPACE, "team-a", "team-b")
    # CRDs first (a CR in the same apply as its CRD cannot be mapped yet), then everything else.
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    await _apply(kubectl, crds)
    out = await _apply(kubectl, rest)
    for doc in rest:
        assert f"{doc['metadata']['name']} created" in out, (doc["kind"], out)

    def versions() -> dict[tuple[str, str], str]:
        out = {}
        for doc in docs:
            res = k8s_cluster.api.find_resource(doc["apiVersion"], doc["kind"])
            ns = doc["metadata"].get("namespace", "default") if k8s_cluster.api.resources[res].namespaced else None
            live = k8s_cluster.get(res.group, res.version, res.plural, ns, doc["metadata"]["name"])
            assert live is not None, (doc["kind"], doc["metadata"]["name"])
            out[(doc["kind"], doc["metadata"]["name"])] = live["metadata"]["resourceVersion"]
        return out

    before = versions()
    # Nothing the chart renders is pruned by a schema (a misplaced field would be).
    assert k8s_cluster.pruned == []
    # Applying the same output again changes nothing. (kubectl says "configured" for a
    # PodDisruptionBudget anyway: its selector's patch strategy is replace, so it is always sent.)
    again = await _apply(kubectl, rest)
    assert "created" not in again, again
    assert versions() == before
    # The example policies are accepted, with the CRD's defaults filled in.
    out = await kubectl("apply", "-f", str(EXAMPLES / "demo-policy.yaml"))
    assert out.returncode == 0, out.stderr
    demo = k8s_cluster.get(api.GROUP, api.VERSION, api.PLURAL, "default", "demo")
    assert demo is not None
    assert demo["spec"]["gates"]["minExactMatch"] == 0.9
    assert demo["spec"]["fineTune"]["concurrencyPolicy"] == "Forbid"


async def test_example_policies_apply(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    await _apply(kubectl, [d for d in render("default") if d["kind"] == "CustomResourceDefinition"])
    await _create_namespaces(kubectl, "recommenders")
    for name in ("demo-policy.yaml", "gpu-policy.yaml"):
        out = await kubectl("apply", "-f", str(EXAMPLES / name))
        assert out.returncode == 0, out.stderr
        assert "recommenderupdatepolicy.recupdate.io/" in out.stdout and "created" in out.stdout
    gpu = k8s_cluster.get(api.GROUP, api.VERSION, api.PLURAL, "recommenders", "movies")
    assert gpu is not None and gpu["spec"]["gates"]["promotion"] == "Manual"
    # What the apiserver stored parses as the operator's model.
    api.RecommenderUpdatePolicy.model_validate({k: v for k, v in gpu.items() if k != "status"})
    out = await kubectl("get", "rup", "-A", "-o", "name")
    assert sorted(out.stdout.split()) == [
        "recommenderupdatepolicy.recupdate.io/demo",
        "recommenderupdatepolicy.recupdate.io/movies",
    ]
    assert k8s_cluster.pruned == []


async def test_invalid_example_is_rejected(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    await _apply(kubectl, [d for d in render("default") if d["kind"] == "CustomResourceDefinition"])
    out = await kubectl("apply", "-f", str(EXAMPLES / "invalid-policy.yaml"))
    assert out.returncode != 0
    assert 'RecommenderUpdatePolicy "invalid" is invalid' in out.stderr, out.stderr
    assert 'spec.fineTune.schedule: Invalid value: "every monday"' in out.stderr, out.stderr
    assert "spec.fineTune.schedule in body should match" in out.stderr
    assert 'spec.fineTune.window: Invalid value: "-30d"' in out.stderr, out.stderr
    assert k8s_cluster.get(api.GROUP, api.VERSION, api.PLURAL, "default", "invalid") is None


async def test_kubectl_apply_kustomize_base(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    out = await kubectl("apply", "-k", str(REPO / "manifests"))
    assert out.returncode == 0, out.stderr
    assert "customresourcedefinition.apiextensions.k8s.io/recommenderupdatepolicies.recupdate.io created" in out.stdout
    assert "deployment.apps/recupdate-operator created" in out.stdout
    assert "clusterrolebinding.rbac.authorization.k8s.io/recupdate-operator created" in out.stdout
    deploy = k8s_cluster.get("apps", "v1", "deployments", "recupdate-system", "recupdate-operator")
    assert deploy is not None
    assert k8s_cluster.pruned == []
    out = await kubectl("apply", "-f", str(EXAMPLES / "demo-policy.yaml"))
    assert out.returncode == 0, out.stderr


async def test_helm_install_upgrade_uninstall(k8s_cluster: EmulatedCluster, helm: Helm, kubectl: Kubectl) -> None:
    """The real helm against the emulated API: install (crds/ first), upgrade to HA, uninstall."""
    await _register_prometheus_operator(k8s_cluster)
    out = await helm("install", "rec", str(CHART), "--namespace", NAMESPACE, "--create-namespace", timeout=90)
    assert out.returncode == 0, out.stderr
    assert "kubectl get rup -w" in out.stdout
    assert k8s_cluster.get("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, api.CRD_NAME)
    assert k8s_cluster.get("apps", "v1", "deployments", NAMESPACE, "rec-recupdate") is not None
    out = await helm("upgrade", "rec", str(CHART), "--namespace", NAMESPACE, *values_args("ha"), timeout=90)
    assert out.returncode == 0, out.stderr
    assert k8s_cluster.get("apps", "v1", "statefulsets", NAMESPACE, "rec-recupdate") is not None
    assert k8s_cluster.get("apps", "v1", "deployments", NAMESPACE, "rec-recupdate") is None
    assert k8s_cluster.get("kopf.dev", "v1", "clusterkopfpeerings", None, "rec-recupdate") is not None
    out = await helm("list", "--namespace", NAMESPACE, "-o", "json")
    (release,) = json.loads(out.stdout)
    assert release["revision"] == "2" and release["status"] == "deployed"
    out = await helm("uninstall", "rec", "--namespace", NAMESPACE, timeout=90)
    assert out.returncode == 0, out.stderr
    assert k8s_cluster.get("apps", "v1", "statefulsets", NAMESPACE, "rec-recupdate") is None
    # Helm never deletes what it installed from crds/: the CRD, and with it the policies, stay.
    assert k8s_cluster.get("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, api.CRD_NAME)


def test_rendered_chart_matches_between_helm_calls(tmp_path: pathlib.Path) -> None:
    """helm template is deterministic (no random names or timestamps): GitOps diffs stay quiet."""
    first = helm("template", "r1", str(CHART), "--namespace", NAMESPACE, *values_args("ha")).stdout
    second = helm("template", "r1", str(CHART), "--namespace", NAMESPACE, *values_args("ha")).stdout
    assert first == second
