"""Tests of the emulated Kubernetes API (tests/k8s): the realism the operator's tests rely on."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import kopf
import pytest

from k8s.emulator import EmulatedCluster, ThreadedCluster, minimal_crd
from k8s.kopf_runner import run_kopf
from k8s.kubectl import REPO_ROOT, Helm, Kubectl

pytestmark = pytest.mark.timeout(30)

RAYJOBS = "/apis/ray.io/v1/namespaces/default/rayjobs"

# A small CRD with a required field, a pattern, a default and a status subresource.
WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.io
spec:
  group: example.io
  scope: Namespaced
  names: {kind: Widget, listKind: WidgetList, plural: widgets, singular: widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Schedule, type: string, jsonPath: .spec.fineTune.schedule}
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          metadata: {type: object}  # generated CRDs declare it; it must not prune metadata
          spec:
            type: object
            required: [fineTune]
            properties:
              size: {type: integer, minimum: 1, default: 3}
              fineTune:
                type: object
                required: [schedule]
                properties:
                  schedule: {type: string, pattern: '^(\\S+ ){4}\\S+$'}
          status:
            type: object
            properties:
              phase: {type: string}
              seen: {type: boolean}
              ticks: {type: integer}
"""

GOOD_WIDGET = """
apiVersion: example.io/v1
kind: Widget
metadata: {name: good}
spec:
  fineTune: {schedule: "0 3 * * *"}
"""

BAD_WIDGET = """
apiVersion: example.io/v1
kind: Widget
metadata: {name: bad}
spec:
  fineTune: {schedule: "every night"}
"""

MISSING_WIDGET = """
apiVersion: example.io/v1
kind: Widget
metadata: {name: missing}
spec:
  fineTune: {}
"""


def rayjob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": spec or {"entrypoint": "x"},
    }


async def request(
    cluster: EmulatedCluster, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            cluster.url + path,
            data=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type},
        ) as response,
    ):
        return response.status, await response.json()


# --------------------------------------------------------------------------------------------- REST


async def test_create_answers_201_with_server_metadata(k8s_cluster: EmulatedCluster) -> None:
    status, obj = await request(k8s_cluster, "POST", RAYJOBS, rayjob("j1"))
    assert status == 201
    meta = obj["metadata"]
    assert meta["namespace"] == "default"
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0

    status, err = await request(k8s_cluster, "POST", RAYJOBS, rayjob("j1"))
    assert (status, err["reason"]) == (409, "AlreadyExists")
    assert err["message"] == 'rayjobs.ray.io "j1" already exists'

    status, generated = await request(
        k8s_cluster, "POST", RAYJOBS, {**rayjob(""), "metadata": {"generateName": "run-"}}
    )
    assert status == 201 and generated["metadata"]["name"].startswith("run-")

    status, err = await request(k8s_cluster, "POST", RAYJOBS, rayjob("Bad_Name"))
    assert status == 422 and "metadata.name: Invalid value" in err["message"]


async def test_generation_and_resource_version_follow_kubernetes(k8s_cluster: EmulatedCluster) -> None:
    created = await k8s_cluster.create(rayjob("j1", entrypoint="a"))
    rv0 = int(created["metadata"]["resourceVersion"])

    spec_changed = await k8s_cluster.patch("ray.io/v1", "RayJob", "j1", {"spec": {"entrypoint": "b"}})
    assert spec_changed["metadata"]["generation"] == 2
    rv1 = int(spec_changed["metadata"]["resourceVersion"])
    assert rv1 > rv0

    labelled = await k8s_cluster.patch("ray.io/v1", "RayJob", "j1", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 2  # metadata changes do not bump the generation
    rv2 = int(labelled["metadata"]["resourceVersion"])
    assert rv2 > rv1

    status_changed = await k8s_cluster.patch_status("ray.io/v1", "RayJob", "j1", {"jobStatus": "RUNNING"})
    assert status_changed["metadata"]["generation"] == 2
    rv3 = int(status_changed["metadata"]["resourceVersion"])
    assert rv3 > rv2

    noop = await k8s_cluster.patch("ray.io/v1", "RayJob", "j1", {"spec": {"entrypoint": "b"}})
    assert int(noop["metadata"]["resourceVersion"]) == rv3  # no-op writes change nothing
    assert len(k8s_cluster.history("ray.io", "v1", "rayjobs", "default", "j1")) == 4


async def test_status_subresource_is_separate_from_the_main_resource(k8s_cluster: EmulatedCluster) -> None:
    status, created = await request(k8s_cluster, "POST", RAYJOBS, {**rayjob("j1"), "status": {"jobStatus": "FAKE"}})
    assert status == 201 and "status" not in created  # create drops status

    status, obj = await request(
        k8s_cluster,
        "PATCH",
        f"{RAYJOBS}/j1",
        {"spec": {"entrypoint": "new"}, "status": {"jobStatus": "IGNORED"}},
        "application/merge-patch+json",
    )
    assert status == 200 and obj["spec"]["entrypoint"] == "new" and "status" not in obj

    status, obj = await request(
        k8s_cluster,
        "PATCH",
        f"{RAYJOBS}/j1/status",
        {"spec": {"entrypoint": "IGNORED"}, "status": {"jobStatus": "RUNNING"}},
        "application/merge-patch+json",
    )
    assert status == 200
    assert obj["status"] == {"jobStatus": "RUNNING"} and obj["spec"]["entrypoint"] == "new"
    stored = k8s_cluster.get("ray.io", "v1", "rayjobs", "default", "j1")
    assert stored is not None and stored["status"] == {"jobStatus": "RUNNING"}


async def test_failed_json_patch_test_answers_422(k8s_cluster: EmulatedCluster) -> None:
    created = await k8s_cluster.create(rayjob("j1"))
    rv = created["metadata"]["resourceVersion"]
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "999999"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    status, err = await request(k8s_cluster, "PATCH", f"{RAYJOBS}/j1", stale, "application/json-patch+json")
    assert (status, err["kind"], err["reason"]) == (422, "Status", "Invalid")

    fresh = [{**stale[0], "value": rv}, stale[1]]
    status, obj = await request(k8s_cluster, "PATCH", f"{RAYJOBS}/j1", fresh, "application/json-patch+json")
    assert status == 200 and obj["metadata"]["finalizers"] == ["x/y"]


async def test_put_uses_optimistic_concurrency(k8s_cluster: EmulatedCluster) -> None:
    created = await k8s_cluster.create(rayjob("j1"))
    body = {**created, "spec": {"entrypoint": "replaced"}}
    status, replaced = await request(k8s_cluster, "PUT", f"{RAYJOBS}/j1", body)
    assert status == 200 and replaced["spec"] == {"entrypoint": "replaced"}

    status, err = await request(k8s_cluster, "PUT", f"{RAYJOBS}/j1", body)  # the old resourceVersion
    assert (status, err["reason"]) == (409, "Conflict")


async def test_list_has_kind_and_filters_by_labels(k8s_cluster: EmulatedCluster) -> None:
    await k8s_cluster.create({**rayjob("a"), "metadata": {"name": "a", "labels": {"app": "x"}}})
    await k8s_cluster.create({**rayjob("b"), "metadata": {"name": "b", "labels": {"app": "y"}}})
    status, listing = await request(k8s_cluster, "GET", RAYJOBS + "?labelSelector=app%3Dx")
    assert status == 200
    assert (listing["apiVersion"], listing["kind"]) == ("ray.io/v1", "RayJobList")
    assert [o["metadata"]["name"] for o in listing["items"]] == ["a"]
    assert [
        o["metadata"]["name"] for o in k8s_cluster.objects("ray.io", "v1", "rayjobs", label_selector="app in (x,y)")
    ] == [
        "a",
        "b",
    ]


async def test_finalizers_and_owner_reference_garbage_collection(k8s_cluster: EmulatedCluster) -> None:
    owner = await k8s_cluster.create({**rayjob("owner"), "metadata": {"name": "owner", "finalizers": ["x.io/hold"]}})
    ref = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "owner", "uid": owner["metadata"]["uid"]}
    await k8s_cluster.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [ref]}}
    )
    orphan_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "0000"}
    await k8s_cluster.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other", "ownerReferences": [orphan_ref]}}
    )

    deleting = await k8s_cluster.delete("ray.io/v1", "RayJob", "owner")
    assert deleting["metadata"]["deletionTimestamp"]  # held by the finalizer
    assert k8s_cluster.get("", "v1", "configmaps", "default", "child") is not None

    await k8s_cluster.patch("ray.io/v1", "RayJob", "owner", {"metadata": {"finalizers": None}})
    assert k8s_cluster.get("ray.io", "v1", "rayjobs", "default", "owner") is None
    assert k8s_cluster.get("", "v1", "configmaps", "default", "child") is None  # collected
    assert k8s_cluster.get("", "v1", "configmaps", "default", "other") is not None


async def test_watch_replays_changes_since_a_resource_version(k8s_cluster: EmulatedCluster) -> None:
    created = await k8s_cluster.create(rayjob("j1"))
    since = created["metadata"]["resourceVersion"]
    await k8s_cluster.patch_status("ray.io/v1", "RayJob", "j1", {"jobStatus": "RUNNING"})
    await k8s_cluster.delete("ray.io/v1", "RayJob", "j1")
    url = f"{k8s_cluster.url}{RAYJOBS}?watch=true&resourceVersion={since}"
    events = []
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for line in response.content:
            events.append(json.loads(line))
            if len(events) == 2:
                break
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["status"] == {"jobStatus": "RUNNING"}


async def test_user_reactions_take_priority(k8s_cluster: EmulatedCluster) -> None:
    await k8s_cluster.create(rayjob("j1"))
    k8s_cluster.api[f"get {RAYJOBS}/j1"][:1] << 503 << {"kind": "Status", "code": 503}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{k8s_cluster.url}{RAYJOBS}/j1") as response:
            assert response.status == 503
        async with session.get(f"{k8s_cluster.url}{RAYJOBS}/j1") as response:
            assert response.status == 200  # the one-shot fault is used up


# ------------------------------------------------------------------------------- CRDs via kubectl


async def test_kubectl_registers_a_crd_and_the_schema_validates(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    result = await kubectl("apply", "-f", "-", input=WIDGET_CRD)
    assert result.returncode == 0, result.stderr
    assert "widgets.example.io created" in result.stdout

    result = await kubectl("apply", "-f", "-", input=GOOD_WIDGET)
    assert result.returncode == 0, result.stderr
    good = k8s_cluster.get("example.io", "v1", "widgets", "default", "good")
    assert good is not None and good["spec"]["size"] == 3  # defaulted from the schema

    result = await kubectl("apply", "-f", "-", input=BAD_WIDGET)
    assert result.returncode != 0
    assert 'The Widget "bad" is invalid: spec.fineTune.schedule: Invalid value: "every night"' in result.stderr
    assert "spec.fineTune.schedule in body should match" in result.stderr

    result = await kubectl("apply", "-f", "-", input=MISSING_WIDGET)
    assert result.returncode != 0
    assert "spec.fineTune.schedule: Required value" in result.stderr
    assert k8s_cluster.objects("example.io", "v1", "widgets") == [good]

    # The same through the API directly: the apiserver's message names kind, group and field.
    status, err = await request(
        k8s_cluster,
        "POST",
        "/apis/example.io/v1/namespaces/default/widgets",
        {
            "apiVersion": "example.io/v1",
            "kind": "Widget",
            "metadata": {"name": "x"},
            "spec": {"fineTune": {"schedule": "@"}},
        },
    )
    assert status == 422
    assert err["message"].startswith('Widget.example.io "x" is invalid: spec.fineTune.schedule: Invalid value: "@"')
    assert err["details"]["causes"][0]["field"] == "spec.fineTune.schedule"


async def test_kubectl_gets_custom_resources(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    await k8s_cluster.apply_yaml(WIDGET_CRD)
    await k8s_cluster.apply_yaml(GOOD_WIDGET)
    await k8s_cluster.patch_status("example.io/v1", "Widget", "good", {"phase": "Ready"})

    table = await kubectl("get", "wd", check=True)
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "SCHEDULE", "SIZE", "PHASE", "AGE"]
    assert row.split()[:7] == ["good", "0", "3", "*", "*", "*", "3"]
    assert "Ready" in row

    listing = json.loads((await kubectl("get", "widgets", "-o", "json", check=True)).stdout)
    assert [item["metadata"]["name"] for item in listing["items"]] == ["good"]

    await kubectl("delete", "widget", "good", check=True)
    assert k8s_cluster.objects("example.io", "v1", "widgets") == []


async def test_helm_installs_upgrades_and_uninstalls(k8s_cluster: EmulatedCluster, helm: Helm, tmp_path: Any) -> None:
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("entrypoint: python a.py\n")
    (chart / "templates" / "job.yaml").write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: '{{ .Release.Name }}-job'}\n"
        "spec: {entrypoint: '{{ .Values.entrypoint }}'}\n"
    )
    result = await helm("install", "r1", str(chart))
    assert result.returncode == 0, result.stderr
    job = k8s_cluster.get("ray.io", "v1", "rayjobs", "default", "r1-job")
    assert job is not None and job["spec"] == {"entrypoint": "python a.py"}

    result = await helm("upgrade", "r1", str(chart), "--set", "entrypoint=python b.py")
    assert result.returncode == 0, result.stderr
    job = k8s_cluster.get("ray.io", "v1", "rayjobs", "default", "r1-job")
    assert job is not None and job["spec"] == {"entrypoint": "python b.py"} and job["metadata"]["generation"] == 2
    releases = k8s_cluster.objects("", "v1", "secrets", label_selector="owner=helm,name=r1")
    assert [r["metadata"]["labels"]["status"] for r in releases] == ["superseded", "deployed"]

    result = await helm("uninstall", "r1")
    assert result.returncode == 0, result.stderr
    assert k8s_cluster.objects("ray.io", "v1", "rayjobs") == []


async def test_the_projects_crd_is_served(k8s_cluster: EmulatedCluster, kubectl: Kubectl) -> None:
    crd = REPO_ROOT / "manifests" / "crd" / "recommenderupdatepolicies.recupdate.io.yaml"
    if not crd.exists():
        pytest.skip(f"{crd} is not generated yet")
    result = await kubectl("apply", "-f", str(crd))
    assert result.returncode == 0, result.stderr
    result = await kubectl("get", "rup")
    assert result.returncode == 0, result.stderr
    result = await kubectl("explain", "rup.spec")
    assert result.returncode == 0 and "RecommenderUpdatePolicy" in result.stdout, result.stderr


def test_threaded_cluster_serves_subprocesses(k8s_cluster_thread: ThreadedCluster, kubectl_sync: Kubectl) -> None:
    k8s_cluster_thread.create(rayjob("j1"))
    k8s_cluster_thread.patch_status(
        "ray.io/v1", "RayJob", "j1", {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
    )
    out = kubectl_sync.run("get", "rayjobs", "-o", "jsonpath={.items[0].status.jobStatus}", check=True).stdout
    assert out == "SUCCEEDED"
    result = kubectl_sync.run("delete", "rayjob", "j1")
    assert result.returncode == 0, result.stderr
    assert k8s_cluster_thread.objects("ray.io", "v1", "rayjobs") == []


async def test_kubernetes_client_gets_objects_back(k8s_cluster: EmulatedCluster) -> None:
    import kubernetes

    def use_client() -> tuple[Any, Any]:
        with k8s_cluster.kubernetes_client() as client:
            api = kubernetes.client.CustomObjectsApi(client)
            created = api.create_namespaced_custom_object("ray.io", "v1", "default", "rayjobs", rayjob("j1"))
            patched = api.patch_namespaced_custom_object_status(
                "ray.io", "v1", "default", "rayjobs", "j1", {"status": {"jobStatus": "RUNNING"}}
            )
            return created, patched

    created, patched = await asyncio.to_thread(use_client)
    assert created["metadata"]["uid"]  # 201, not None
    assert patched["status"] == {"jobStatus": "RUNNING"}


# ------------------------------------------------------------------------------------------ kopf


async def test_kopf_sees_an_object_and_patches_its_status(k8s_cluster: EmulatedCluster) -> None:
    await k8s_cluster.apply_yaml(WIDGET_CRD)
    registry = kopf.OperatorRegistry()

    @kopf.on.create("example.io", "v1", "widgets", registry=registry)
    def created(spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, **_: Any) -> dict[str, Any]:
        patch.status["phase"] = f"seen-{spec['size']}"
        kopf.info(body, reason="Seen", message="a widget")
        return {"result": 1}  # kopf stores it in status.<handler id>, which the schema does not declare

    async with run_kopf(k8s_cluster, registry=registry):
        await k8s_cluster.apply_yaml(GOOD_WIDGET)
        obj = await k8s_cluster.wait_for(
            lambda: (
                (w := k8s_cluster.get("example.io", "v1", "widgets", "default", "good"))
                and (w.get("status") or {}).get("phase")
                and w
            )
        )
        events = await k8s_cluster.wait_for(k8s_cluster.events)
    assert obj["status"] == {"phase": "seen-3"}
    assert (events[0]["reason"], events[0]["involvedObject"]["name"]) == ("Seen", "good")
    # Undeclared status fields are pruned, silently, as a real apiserver does (kopf logs a warning).
    assert [path for *_, path in k8s_cluster.pruned] == [f"status.{created.__qualname__}"]


@pytest.mark.looptime
async def test_looptime_fast_forwards_a_kopf_timer(k8s_cluster: EmulatedCluster) -> None:
    await k8s_cluster.apply_yaml(WIDGET_CRD)
    await k8s_cluster.apply_yaml(GOOD_WIDGET)
    registry = kopf.OperatorRegistry()
    ticks: list[float] = []

    @kopf.timer("example.io", "v1", "widgets", interval=60, registry=registry)
    async def tick(patch: kopf.Patch, **_: Any) -> None:
        ticks.append(asyncio.get_running_loop().time())
        patch.status["ticks"] = len(ticks)

    started = time.monotonic()
    async with run_kopf(k8s_cluster, registry=registry):
        await k8s_cluster.wait_for(lambda: len(ticks) >= 3, timeout=600)
    assert time.monotonic() - started < 10
    assert ticks[2] - ticks[0] >= 120  # two 60 s intervals of loop time
    await k8s_cluster.wait_for(
        lambda: (
            ((k8s_cluster.get("example.io", "v1", "widgets", "default", "good") or {}).get("status") or {}).get(
                "ticks", 0
            )
            >= 3
        ),
        timeout=60,
    )


async def test_kopf_peering_and_minimal_crds() -> None:
    async with EmulatedCluster(ray=False, kopf_peering=True) as cluster:
        assert cluster.objects("apiextensions.k8s.io", "v1", "customresourcedefinitions")[0]["metadata"]["name"] == (
            "clusterkopfpeerings.kopf.dev"
        )
        crd = await cluster.apply(minimal_crd("example.io", "Gadget", "gadgets", short_names=["gd"]))
        assert crd["status"]["conditions"][1] == {
            **crd["status"]["conditions"][1],
            "type": "Established",
            "status": "True",
        }
        await cluster.create(
            {"apiVersion": "example.io/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"any": 1}}
        )
        await cluster.delete(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", "gadgets.example.io", namespace=None
        )
        assert "example.io/v1/gadgets" not in cluster.api.resources
