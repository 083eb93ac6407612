"""Packaging: the Helm chart, the generated manifests, the kustomize base, the example policies,
the Argo CD health check and the Dockerfiles, checked with the real helm v4 and kubectl v1.35.

Cluster-facing checks (kubectl apply against the emulated API) are in test_packaging_cluster.py.
"""

from __future__ import annotations

import copy
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from fixtures.chart import CHART, EXAMPLES, NAMESPACE, RELEASE, REPO, VARIANTS, helm, render, tool, values_args
from k8s import schema as crdschema
from k8s.kubectl import find_tool
from recupdate_operator import api
from recupdate_operator.generate import crd, manifests

K8S_VERSION = "1.35.0"  # kubernetes-validate's schemas; the same minor as the kubectl binary


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def container(docs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    (c,) = workload(docs)["spec"]["template"]["spec"]["containers"]
    return c


def crd_schemas(docs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD version among docs."""
    out = {}
    for d in docs:
        if d["kind"] == "CustomResourceDefinition":
            spec = d["spec"]
            for version in spec["versions"]:
                out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"][
                    "openAPIV3Schema"
                ]
    return out


def validate_cr(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """What the apiserver would do: default, then validate against the structural schema."""
    obj = crdschema.apply_defaults(copy.deepcopy(obj), schema)
    return [str(e) for e in crdschema.validate(obj, schema)]


def validate_all(docs: Iterable[dict[str, Any]]) -> None:
    """Built-in kinds by kubernetes-validate (strict), custom resources by their CRD's schema."""
    docs = list(docs)
    schemas = crd_schemas(docs) | crd_schemas(yaml.safe_load_all((CHART / "crds" / crd.FILENAME).read_text()))
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']}/{doc['metadata'].get('name')}"
        if key in schemas:
            assert validate_cr(doc, schemas[key]) == [], where
        elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            check_service_monitor(doc, docs)
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc}") from exc


def check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """No schema for prometheus-operator here: check that it points at the metrics Service's port."""
    services = [
        s
        for s in of_kind(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ]
    assert len(services) == 1
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [services[0]["metadata"]["namespace"]]


def arg_values(args: list[str], flag: str) -> list[str]:
    """Values of `--flag=value` / `--flag value` in an argv."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def load_yaml(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def required() -> set[manifests.Permission]:
    """Every permission the operator's code uses, from operator/recupdate_operator/generate/rbac.py."""
    try:
        return manifests.load_permissions()
    except SystemExit as exc:
        pytest.fail(f"{exc}: the RBAC tests derive the chart's and manifests' rules from it")


# ---------------------------------------------------------------------------------------------------------
# helm lint and template


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict(variant: str) -> None:
    out = helm("lint", "--strict", str(CHART), *values_args(variant))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_template_validates(variant: str) -> None:
    docs = render(variant)
    validate_all(docs)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "ServiceAccount", "Service"} <= kinds
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    for doc in docs:
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert doc["metadata"].get("namespace"), doc["metadata"]["name"]


def test_helm_template_default_operator() -> None:
    docs = render("default")
    deploy = workload(docs)
    assert deploy["kind"] == "Deployment"
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    c = container(docs)
    assert c["command"] == ["recupdate", "operator"]
    args = c["args"]
    assert "--all-namespaces" in args and "--standalone" in args
    assert not arg_values(args, "--namespace") and not arg_values(args, "--peering")
    assert arg_values(args, "--metrics-port") == ["8080"]
    assert arg_values(args, "--liveness") == ["http://0.0.0.0:8081/healthz"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "httpGet" in c["readinessProbe"]
    # Non-root, read-only root filesystem, no privilege escalation, resources.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # The service account the pod runs as is the one the RBAC binds.
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert [sa["metadata"]["name"] for sa in of_kind(docs, "ServiceAccount")] == [pod["serviceAccountName"]]
    # The metrics Service selects the operator's pods and targets the metrics port.
    (service,) = of_kind(docs, "Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not of_kind(docs, "ServiceMonitor") and not of_kind(docs, "ClusterKopfPeering")
    assert not of_kind(docs, "Role") and not of_kind(docs, "PodDisruptionBudget")


def test_helm_template_namespaced() -> None:
    docs = render("namespaced")
    args = container(docs)["args"]
    assert "--all-namespaces" not in args
    assert arg_values(args, "--namespace") == ["team-a", "team-b"]
    roles = of_kind(docs, "Role")
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    sa = workload(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        assert b["roleRef"]["kind"] == "Role"
    # Namespaced resources only in Roles; a ClusterRole only for cluster-scoped resources (if any).
    for role in of_kind(docs, "ClusterRole"):
        assert all(p.cluster_scoped for p in manifests.permissions_in(role["rules"])), role["rules"]


def test_helm_template_namespaced_without_cluster_rules() -> None:
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        *values_args("namespaced"),
        "--set",
        "rbac.clusterScopedRules=false",
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    assert len(of_kind(docs, "Role")) == 2


def test_helm_template_operator_options() -> None:
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "metrics.enabled=false",
        "--set",
        "operator.defaultStoreSecret.name=jobs-dsn",
        "--set",
        "operator.extraArgs={--verbose}",
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    args = container(docs)["args"]
    assert arg_values(args, "--metrics-port") == ["0"]  # the operator's default is 8080: switch it off
    assert arg_values(args, "--default-store-secret") == ["jobs-dsn:dsn"]
    assert args[-1] == "--verbose"
    assert not of_kind(docs, "Service")
    assert [p["name"] for p in container(docs)["ports"]] == ["health"]


def test_chart_args_parse_with_the_operator_cli() -> None:
    """Every variant's flags are accepted by `recupdate operator` (run.py's parser)."""
    import argparse

    from recupdate_operator import run

    parser = argparse.ArgumentParser()
    run.configure(parser)
    for variant in VARIANTS:
        args = [a.replace("$(POD_INDEX)", "2") for a in container(render(variant))["args"]]
        parsed = parser.parse_args(args)
        assert parsed.liveness == "http://0.0.0.0:8081/healthz"
        if variant.startswith("ha"):
            assert parsed.peering and parsed.priority == 2
        else:
            assert parsed.standalone and parsed.peering is None


def test_helm_template_namespaced_defaults_to_release_namespace() -> None:
    out = helm("template", RELEASE, str(CHART), "--namespace", "ops", "--set", "rbac.scope=namespace")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert arg_values(container(docs)["args"], "--namespace") == ["ops"]
    assert [r["metadata"]["namespace"] for r in of_kind(docs, "Role")] == ["ops"]


@pytest.mark.parametrize("variant", ["ha", "ha-namespaced"])
def test_helm_template_high_availability(variant: str) -> None:
    docs = render(variant)
    sts = workload(docs)
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] > 1
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    c = container(docs)
    args = c["args"]
    assert "--standalone" not in args
    (peering_name,) = arg_values(args, "--peering")
    # Same-priority kopf peers all pause: every pod gets its ordinal as priority.
    assert arg_values(args, "--priority") == ["$(POD_INDEX)"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    if variant == "ha":
        (peering,) = of_kind(docs, "ClusterKopfPeering")
        assert peering["metadata"]["name"] == peering_name == f"{RELEASE}-recupdate"
        assert len(of_kind(docs, "ServiceMonitor")) == 1
        assert env["RECUPDATE_STORE_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "recupdate-store", "key": "dsn"}
    else:
        peerings = of_kind(docs, "KopfPeering")
        assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings] == [(NAMESPACE, peering_name)]
        assert peering_name == "recupdate-peering"
    crds = {d["metadata"]["name"] for d in of_kind(docs, "CustomResourceDefinition")}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev", api.CRD_NAME} <= crds


def test_replicas_above_one_require_peering() -> None:
    out = helm("template", RELEASE, str(CHART), "--set", "replicaCount=2", check=False)
    assert out.returncode != 0 and "peering" in out.stderr, out.stderr
    # The template refuses it too, when schema validation is skipped.
    out = helm("template", RELEASE, str(CHART), "--set", "replicaCount=2", "--skip-schema-validation", check=False)
    assert out.returncode != 0 and "replicaCount > 1 requires peering.enabled=true" in out.stderr, out.stderr
    out = helm("template", RELEASE, str(CHART), "--set", "replicaCount=2", "--set", "peering.enabled=true")
    assert "kind: StatefulSet" in out.stdout


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("rbac.scpe=cluster", "additional properties 'scpe' not allowed"),
        ("rbac.scope=everywhere", "/rbac/scope"),
        ("replicaCount=two", "/replicaCount"),
        ("metrics.serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
        ("unknownTopLevel=1", "additional properties 'unknownTopLevel' not allowed"),
        ("rbac.watchNamespaces[0]=Not_A_Namespace", "/rbac/watchNamespaces/0"),
    ],
)
def test_values_schema_is_strict(setting: str, message: str) -> None:
    out = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert out.returncode != 0, out.stdout[:500]
    assert message in out.stderr, out.stderr


def test_notes_render() -> None:
    out = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *values_args("ha"))
    assert "kubectl get rup -w" in out.stdout
    assert "3 replicas with kopf peering" in out.stdout
    assert "kubectl apply --server-side -f manifests/crd/" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# generated files: the CRD copy and the RBAC


def test_chart_crd_equals_generated() -> None:
    generated = (REPO / "manifests" / "crd" / crd.FILENAME).read_text()
    assert generated == crd.render(), "manifests/crd is stale: run `make manifests`"
    assert (CHART / "crds" / crd.FILENAME).read_text() == generated, "the chart's CRD differs: run `make manifests`"
    # Helm installs every file in crds/: only the policy CRD and kopf's peering CRDs are there.
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted([crd.FILENAME, "kopf-peering-crds.yaml"])


def test_generated_manifests_are_up_to_date(required: set[manifests.Permission]) -> None:
    stale = manifests.stale(REPO, manifests.render_all(required))
    assert stale == [], f"stale generated files (run `make manifests`): {stale}"


def test_manifests_cli_check(tmp_path: pathlib.Path, required: set[manifests.Permission]) -> None:
    assert manifests.main(["--root", str(REPO), "--check"]) == 0
    assert manifests.main(["--root", str(tmp_path), "--check"]) == 1
    assert manifests.main(["--root", str(tmp_path)]) == 0
    assert manifests.main(["--root", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "charts/recupdate/crds" / crd.FILENAME).read_text() == crd.render()


def test_rbac_py_lists_what_the_design_needs(required: set[manifests.Permission]) -> None:
    """A floor, from docs/architecture.md: watch policies, write their status, own RayJobs and a RayService."""
    need = {
        ("recupdate.io", "recommenderupdatepolicies", "list"),
        ("recupdate.io", "recommenderupdatepolicies", "watch"),
        ("recupdate.io", "recommenderupdatepolicies/status", "patch"),
        ("ray.io", "rayjobs", "create"),
        ("ray.io", "rayjobs", "delete"),
        ("ray.io", "rayjobs", "watch"),
        ("ray.io", "rayservices", "create"),
        ("ray.io", "rayservices", "patch"),
        ("kopf.dev", "clusterkopfpeerings", "patch"),
        ("kopf.dev", "kopfpeerings", "patch"),
    }
    have = {(p.group, p.resource, p.verb) for p in required}
    assert need <= have, sorted(need - have)
    assert any(p.resource == "events" and p.verb == "create" for p in required), "kopf posts events"
    # The operator never writes a policy's spec (GitOps): no update/delete/create on the main resource. The one
    # patch is kopf's, on metadata only: its finalizer on policies in peering mode (rbac.py says so).
    writes = {p.verb for p in required if p.resource == api.PLURAL} & {"update", "patch", "delete", "create"}
    assert writes <= {"patch"}, writes


def test_rbac_scopes_agree_with_rbac_py() -> None:
    """rbac.py says where each rule goes (scope); the generator's split by resource scope agrees."""
    from recupdate_operator.generate import rbac

    for rule in getattr(rbac, "RULES", ()):
        scope = getattr(rule, "scope", None)
        if scope is not None:
            assert manifests._scope_of(rule.group, rule.resource) == scope, rule


def _bound_rules(docs: list[dict[str, Any]], service_account: str, namespace: str | None) -> set[manifests.Permission]:
    """The permissions a ServiceAccount gets in `namespace` (None: cluster-wide) from these RBAC objects."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    granted: set[manifests.Permission] = set()
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
        if ("ServiceAccount", service_account, NAMESPACE) not in subjects:
            continue
        ref = binding["roleRef"]
        role_ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref}"
        granted |= manifests.permissions_in(role["rules"])
    return granted


def _split(required: set[manifests.Permission]) -> tuple[set[manifests.Permission], ...]:
    plain = {p for p in required if not p.peering}
    namespaced = {p for p in plain if not p.cluster_scoped}
    cluster = plain - namespaced
    peer_cluster = {p for p in required if p.peering and p.cluster_scoped}
    peer_ns = {p for p in required if p.peering and not p.cluster_scoped}
    return namespaced, cluster, peer_cluster, peer_ns


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chart_rbac_covers_operator_permissions(variant: str, required: set[manifests.Permission]) -> None:
    """Every (group, resource, verb) in rbac.py is granted, and nothing more (least privilege)."""
    docs = list(render(variant))
    sa = workload(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    namespaced, cluster, peer_cluster, peer_ns = _split(required)
    ha = variant.startswith("ha")
    if "namespaced" not in variant:
        want = namespaced | cluster | (peer_cluster if ha else set())
        granted = _bound_rules(docs, sa, None)
        assert want - granted == set(), f"missing RBAC: {sorted(want - granted)}"
        assert granted - want == set(), f"RBAC beyond what the code uses: {sorted(granted - want)}"
        return
    watched = arg_values(container(docs)["args"], "--namespace")
    assert watched
    cluster_wide = {(b["kind"], b["roleRef"]["kind"]) for b in of_kind(docs, "ClusterRoleBinding")}
    assert cluster_wide <= {("ClusterRoleBinding", "ClusterRole")}
    cluster_granted = _bound_rules([d for d in docs if d["kind"] != "RoleBinding"], sa, None)
    assert cluster - cluster_granted == set(), f"missing cluster-scoped RBAC: {sorted(cluster - cluster_granted)}"
    assert cluster_granted - cluster == set(), f"cluster-wide RBAC in a namespaced install: {cluster_granted - cluster}"
    for ns in watched:
        granted = _bound_rules(docs, sa, ns) - cluster_granted
        want = namespaced | (peer_ns if ha else set())
        assert want - granted == set(), f"missing RBAC in {ns}: {sorted(want - granted)}"
        assert granted - want == set(), f"RBAC beyond what the code uses in {ns}: {sorted(granted - want)}"


def test_manifests_rbac_covers_operator_permissions(required: set[manifests.Permission]) -> None:
    docs = load_yaml(REPO / "manifests" / "rbac" / "operator-rbac.yaml")
    namespaced, cluster, _, _ = _split(required)
    granted = _bound_rules(docs, manifests.SERVICE_ACCOUNT, None)
    assert (namespaced | cluster) - granted == set()
    assert granted - (namespaced | cluster) == set()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_rbac_rules_pass_through_the_generator() -> None:
    """A permission added to rbac.py shows up in every rule set; a missing one fails the coverage tests."""
    perms = manifests.permissions_of(
        [
            ("ray.io", "rayclusters", ["get", "list"]),
            {"api_group": "", "resources": ["namespaces"], "verbs": ["list", "watch"]},
            ("kopf.dev", "kopfpeerings", "patch"),
        ]
    )
    sets = manifests.rule_sets(perms)
    assert sets["namespaced"] == [{"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "list"]}]
    assert sets["cluster"] == [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]
    assert sets["peeringNamespaced"] == [{"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["patch"]}]
    assert manifests.permissions_in(sets["namespaced"] + sets["cluster"] + sets["peeringNamespaced"]) == perms
    with pytest.raises(ValueError, match="unknown verb"):
        manifests.permissions_of([("", "pods", "exec")])


# ---------------------------------------------------------------------------------------------------------
# kustomize base


def test_kustomize_base_renders() -> None:
    kubectl = tool("kubectl")
    out = subprocess.run(
        [str(kubectl), "kustomize", str(REPO / "manifests")], capture_output=True, text=True, timeout=60, check=True
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    base = ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    assert kinds == sorted([*base, "Deployment", "Service"])
    (crd_doc,) = of_kind(docs, "CustomResourceDefinition")
    generated = yaml.safe_load(crd.render())
    crd_doc["metadata"]["labels"].pop("app.kubernetes.io/part-of")
    generated["metadata"]["labels"].pop("app.kubernetes.io/part-of")
    assert crd_doc == generated
    (ns,) = of_kind(docs, "Namespace")
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "Deployment", "Service"):
            assert doc["metadata"]["namespace"] == ns["metadata"]["name"] == manifests.NAMESPACE
    (deploy,) = of_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == manifests.SERVICE_ACCOUNT
    (c,) = pod["containers"]
    assert c["image"] == "recupdate-operator:0.1.0"
    assert c["command"] == ["recupdate", "operator"]
    assert "--all-namespaces" in c["args"] and "--standalone" in c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The same operator flags as the chart's default install.
    chart_args = container(render("default"))["args"]
    assert c["args"] == chart_args


# ---------------------------------------------------------------------------------------------------------
# example policies


def _policy_schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", ["demo-policy.yaml", "gpu-policy.yaml"])
def test_example_policy_is_valid(name: str) -> None:
    (doc,) = load_yaml(EXAMPLES / name)
    assert (doc["apiVersion"], doc["kind"]) == (api.API_VERSION, api.KIND)
    assert validate_cr(doc, _policy_schema()) == []
    policy = api.RecommenderUpdatePolicy.model_validate(doc)
    # Nothing in the example is pruned by the schema (a typo would be).
    pruned = crdschema.prune(copy.deepcopy(doc), _policy_schema())
    assert pruned == []
    assert policy.spec.fine_tune.schedule == doc["spec"]["fineTune"]["schedule"]


def test_gpu_example_is_production_like() -> None:
    (doc,) = load_yaml(EXAMPLES / "gpu-policy.yaml")
    spec = api.RecommenderUpdatePolicy.model_validate(doc).spec
    assert spec.fine_tune.resources.gpus_per_worker >= 1
    assert spec.retrieval.refresh_interval == "6h"
    assert spec.fine_tune.schedule == "0 3 1 * *"  # monthly
    assert spec.gates.promotion == api.Promotion.MANUAL
    assert spec.store.secret_ref is not None


def test_demo_example_is_small_and_cpu_only() -> None:
    (doc,) = load_yaml(EXAMPLES / "demo-policy.yaml")
    spec = api.RecommenderUpdatePolicy.model_validate(doc).spec
    assert spec.fine_tune.resources.gpus_per_worker == 0 and spec.serving.resources.gpus == 0
    assert spec.fine_tune.resources.workers == 1


def test_invalid_example_is_rejected() -> None:
    (doc,) = load_yaml(EXAMPLES / "invalid-policy.yaml")
    errors = validate_cr(doc, _policy_schema())
    assert any(e.startswith('spec.fineTune.schedule: Invalid value: "every monday"') for e in errors), errors
    assert any(e.startswith('spec.fineTune.window: Invalid value: "-30d"') for e in errors), errors
    with pytest.raises(ValidationError) as info:
        api.RecommenderUpdatePolicy.model_validate(doc)
    locations = {".".join(map(str, e["loc"])) for e in info.value.errors()}
    assert {"spec.fineTune.schedule", "spec.fineTune.window"} <= locations


# ---------------------------------------------------------------------------------------------------------
# Argo CD health check


LUA = REPO / "manifests" / "argocd" / "health-recommenderupdatepolicy.lua"
HEALTH_KEY = "resource.customizations.health.recupdate.io_RecommenderUpdatePolicy"


def test_argocd_configmap_carries_the_lua() -> None:
    (cm,) = load_yaml(REPO / "manifests" / "argocd" / "argocd-cm-health.yaml")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][HEALTH_KEY] == LUA.read_text()
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)


def _cond(type_: str, status: str, message: str = "", reason: str = "Reason") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("obj", "status", "message"),
    [
        ({"metadata": {"generation": 1}, "spec": {}}, "Progressing", "Waiting for the operator"),
        ({"metadata": {"generation": 1}, "status": {"conditions": []}}, "Progressing", "Waiting for the operator"),
        (
            {
                "metadata": {"generation": 1},
                "status": {"observedGeneration": 1, "conditions": [_cond("Ready", "True", reason="ReleaseServed")]},
            },
            "Healthy",
            "ReleaseServed",
        ),
        (
            {
                "metadata": {"generation": 3},
                "status": {
                    "observedGeneration": 3,
                    "activeRelease": "rel-7",
                    "conditions": [_cond("Ready", "True"), _cond("Refreshing", "True")],
                },
            },
            "Healthy",
            "Serving release rel-7",
        ),
        (
            {
                "metadata": {"generation": 2},
                "status": {"observedGeneration": 2, "conditions": [_cond("SpecValid", "False", "bad cron")]},
            },
            "Degraded",
            "Invalid spec: bad cron",
        ),
        (
            {
                "metadata": {"generation": 2},
                "status": {
                    "observedGeneration": 2,
                    "conditions": [_cond("Ready", "True"), _cond("Degraded", "True", "3 fine-tunes failed")],
                },
            },
            "Degraded",
            "3 fine-tunes failed",
        ),
        (
            {
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "conditions": [_cond("Ready", "False"), _cond("FineTuning", "True", "demo-ft-202601010300")],
                },
            },
            "Progressing",
            "Fine-tuning: demo-ft-202601010300",
        ),
        (
            {
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "conditions": [_cond("Ready", "False"), _cond("Refreshing", "True")],
                },
            },
            "Progressing",
            "Refreshing",
        ),
        (
            {
                "metadata": {"generation": 5},
                "status": {"observedGeneration": 4, "conditions": [_cond("Ready", "True")]},
            },
            "Progressing",
            "observe generation 5",
        ),
        (
            {
                "metadata": {"generation": 1},
                "spec": {"suspend": True},
                "status": {"observedGeneration": 1, "conditions": [_cond("Ready", "False")]},
            },
            "Suspended",
            "Suspended",
        ),
    ],
)
def test_argocd_health_check(obj: dict[str, Any], status: str, message: str) -> None:
    lupa = pytest.importorskip("lupa", reason="lupa (a Lua runtime for Python) is not installed")
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.eval("function(obj) " + LUA.read_text() + " end")

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    result = check(to_lua(obj))
    assert result["status"] == status
    assert message in result["message"]


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles (no Docker engine here: static checks, and hadolint when `make docker-lint` fetched it)


def _instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_operator_dockerfile() -> None:
    steps = _instructions(REPO / "docker" / "operator.Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    assert installs and all("workloads]" not in r and "torch==" not in r for r in installs)
    # The build asserts it: torch is not importable in the operator image.
    assert any("find_spec('torch') is None" in r for r in installs)
    assert [rest for word, rest in steps if word == "USER"][-1] == "65532:65532"
    assert [rest for word, rest in steps if word == "ENTRYPOINT"] == ['["recupdate", "operator"]']


def test_workloads_dockerfile() -> None:
    steps = _instructions(REPO / "docker" / "workloads.Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert args["RAY_IMAGE"] == "rayproject/ray:2.60.0-py311"
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_VARIANT"] == "cpu"
    runs = [rest for word, rest in steps if word == "RUN"]
    assert any('"torch==${TORCH_VERSION}"' in r for r in runs)
    assert any('".[workloads]"' in r for r in runs)
    users = [rest for word, rest in steps if word == "USER"]
    assert "root" not in " ".join(users) and users[-1] == "1000:100"


_WITHOUT_WORKLOADS_EXTRA = """
import importlib, importlib.abc, sys
HEAVY = {"torch", "ray", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "sentence_transformers"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the operator image)", name=name)
sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
from recupdate_operator import cli
args = cli.build_parser().parse_args(["operator", "--all-namespaces", "--standalone", "--metrics-port=0"])
assert args.command == "operator" and not getattr(args, "_missing", False), args
"""


def test_operator_runs_without_the_workloads_extra() -> None:
    """The operator image has no torch/Ray/transformers: `recupdate operator` and what it imports must not need them."""
    modules = ["recupdate_operator.run", "recupdate_operator.controller", "recupdate_operator.metrics"]
    modules += [
        "recupdate_operator.registry",
        "recupdate_operator.backends.kuberay",
        "recupdate_operator.generate.manifests",
    ]
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_WORKLOADS_EXTRA, *modules], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines and {"!pyproject.toml", "!operator/", "!workloads/"} <= set(lines)


def test_hadolint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not in .tools/bin nor on $PATH: run `make docker-lint`")
    out = subprocess.run(
        [str(hadolint), "docker/operator.Dockerfile", "docker/workloads.Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------------
# docs


@pytest.mark.parametrize("doc", ["docs/gitops.md", "docs/install.md"])
def test_docs_yaml_blocks_parse(doc: str) -> None:
    text = (REPO / doc).read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        for obj in yaml.safe_load_all(block):
            assert obj is None or isinstance(obj, dict)


def test_gitops_doc_examples() -> None:
    text = (REPO / "docs" / "gitops.md").read_text()
    objs = [o for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) for o in yaml.safe_load_all(b) if o]
    kinds = {o.get("kind") for o in objs}
    assert {"HelmRelease", "Kustomization", "Application"} <= kinds
    (release,) = [o for o in objs if o.get("kind") == "HelmRelease"]
    assert release["spec"]["install"]["crds"] == "Create" and release["spec"]["upgrade"]["crds"] == "CreateReplace"
    (app,) = [o for o in objs if o.get("kind") == "Application" and "ignoreDifferences" in o["spec"]]
    ignored = app["spec"]["ignoreDifferences"]
    assert any(i.get("kind") == api.KIND and "/status" in i.get("jsonPointers", []) for i in ignored)
