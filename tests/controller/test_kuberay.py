"""The KubeRay backend's pure builders and readers: RayJob and RayService manifests, serveConfigV2, rolling."""

from __future__ import annotations

import difflib
import json
import shlex
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from recupdate_operator.api import PolicySpec, RunKind, SecretKeyRef
from recupdate_operator.backends import Backend, PolicyRef, serve_config
from recupdate_operator.backends.base import dump_serve_config, load_serve_config, quantity_bytes
from recupdate_operator.backends.kuberay import (
    KubeRayBackend,
    label_value,
    observed_job,
    owner_key,
    rayjob_manifest,
    rayservice_manifest,
    rayservice_name,
    roll_patch,
    serving_status_of,
)
from recupdate_operator.planner import LaunchRun, run_config

WHEN = datetime(2030, 1, 8, 3, 0, tzinfo=UTC)
DSN = "postgresql://recupdate:hunter2hunter2@db.example:5432/recsys"


def policy(**spec: Any) -> PolicyRef:
    base = {"store": {"secretRef": {"name": "store-dsn", "key": "dsn"}}}
    return PolicyRef("recs", "ml", "uid-1", PolicySpec.model_validate({**base, **spec}), generation=4)


def launch(p: PolicyRef, kind: RunKind = RunKind.FINETUNE) -> LaunchRun:
    run_id = f"recs-{'ft' if kind == RunKind.FINETUNE else 'rf'}-203001080300"
    config = run_config(p.name, p.namespace, p.spec, kind, run_id, WHEN, "recs-ft-203001010300")
    return LaunchRun(kind, run_id, run_id, config, 4, WHEN)


def test_rayjob_manifest() -> None:
    p = policy(
        fineTune={
            "resources": {"workers": 4, "cpusPerWorker": 8, "gpusPerWorker": 1, "memoryPerWorker": "48Gi"},
            "activeDeadlineSeconds": 7200,
        },
        runtime={
            "image": "reg/workloads:1.2",
            "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "RECUPDATE_STORE_DSN", "value": DSN}],
        },
    )
    a = launch(p)
    job = rayjob_manifest(p, a)
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"], meta["name"], meta["namespace"]) == ("ray.io/v1", "RayJob", a.run_id, "ml")
    assert meta["labels"]["recupdate.io/policy"] == "recs"
    assert meta["labels"]["recupdate.io/kind"] == "finetune"
    assert meta["labels"]["recupdate.io/run-id"] == a.run_id
    assert meta["labels"]["recupdate.io/generation"] == "4"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "recupdate.io/v1alpha1",
            "kind": "RecommenderUpdatePolicy",
            "name": "recs",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "recupdate_workloads.jobs.finetune", "--config"]
    assert json.loads(argv[4]) == json.loads(json.dumps(a.config))
    assert argv[5:] == ["--run-id", a.run_id]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert (
        env["HF_HOME"] == "/cache" and env["RECUPDATE_RUN_ID"] == a.run_id and env["RECUPDATE_STORE_SCHEMA"] == "recs"
    )
    assert "RECUPDATE_STORE_DSN" not in env
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert worker["image"] == head["image"] == "reg/workloads:1.2"
    assert worker["resources"]["requests"] == {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 1}
    assert worker["resources"]["limits"] == worker["resources"]["requests"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    secret_env = [{"name": "RECUPDATE_STORE_DSN", "valueFrom": {"secretKeyRef": {"name": "store-dsn", "key": "dsn"}}}]
    assert head["env"] == worker["env"] == secret_env
    assert DSN not in json.dumps(job) and "hunter2" not in json.dumps(job)  # never inlined
    assert "submitterPodTemplate" not in spec and "clusterSelector" not in spec


def test_refresh_job_on_an_existing_cluster() -> None:
    p = policy(runtime={"clusterSelector": {"ray.io/cluster": "shared"}, "serviceAccountName": "recsys"})
    job = rayjob_manifest(p, launch(p, RunKind.REFRESH))
    spec = job["spec"]
    assert "recupdate_workloads.jobs.refresh" in spec["entrypoint"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert "rayClusterSpec" not in spec and "shutdownAfterJobFinishes" not in spec
    assert "activeDeadlineSeconds" not in spec
    assert spec["submitterPodTemplate"]["spec"]["serviceAccountName"] == "recsys"


def test_default_store_secret_and_fractional_resources() -> None:
    p = PolicyRef(
        "recs",
        "ml",
        "u",
        PolicySpec.model_validate({"fineTune": {"resources": {"cpusPerWorker": 0.5, "gpusPerWorker": 0.5}}}),
    )
    job = rayjob_manifest(p, launch(p), default_secret=SecretKeyRef(name="fallback", key="url"))
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"] == {"cpu": "500m", "memory": "4Gi", "nvidia.com/gpu": 1}
    assert worker["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "fallback", "key": "url"}
    no_secret = rayjob_manifest(p, launch(p))
    assert "env" not in no_secret["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_long_names_fit_label_values() -> None:
    name = "a-very-long-policy-name-" * 6
    assert len(label_value(name)) <= 63 and label_value(name) != label_value(name + "x")
    p = PolicyRef(name.strip("-"), "ml", "u", PolicySpec())
    assert len(rayservice_name(p)) <= 47


USER_CONFIG = {"release_id": "r1", "adapter_uri": "s3://a/r1", "table_version": "7", "store_schema": "recs"}


def test_serve_config_is_the_one_source() -> None:
    p = policy(
        serving={"replicas": 3, "resources": {"cpus": 2, "gpus": 0.5, "memory": "3Gi"}},
        runtime={"env": [{"name": "TZ", "value": "UTC"}]},
    )
    config = serve_config(p.spec, USER_CONFIG)
    (app,) = config["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (
        "recommender",
        "recupdate_workloads.serving.deployment:app",
        "/",
    )
    assert app["runtime_env"] == {"env_vars": {"TZ": "UTC"}}
    (dep,) = app["deployments"]
    assert dep["name"] == "Recommender" and dep["num_replicas"] == 3
    assert dep["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5, "memory": quantity_bytes("3Gi")}
    assert dep["user_config"] == {**USER_CONFIG, "table_version": 7}
    with pytest.raises(ValueError, match="lacks"):
        serve_config(p.spec, {"release_id": "r1"})
    assert "grpc_options" not in config  # HTTP only unless spec.serving.grpcPort
    g = serve_config(policy(serving={"grpcPort": 9000}).spec, USER_CONFIG)
    assert g["grpc_options"] == {
        "port": 9000,
        "grpc_servicer_functions": ["recupdate_workloads.serving.grpc_api.add_RecommenderServicer_to_server"],
    }
    # the servicer function Serve imports exists under that path
    import importlib

    mod, _, fn = g["grpc_options"]["grpc_servicer_functions"][0].rpartition(".")
    assert callable(getattr(importlib.import_module(mod), fn))


def test_rayservice_manifest_and_roll() -> None:
    p = policy(serving={"replicas": 2, "image": "reg/serve:1"})
    svc = rayservice_manifest(p, USER_CONFIG)
    assert svc["kind"] == "RayService" and svc["metadata"]["name"] == "recs-serve"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg/serve:1"
    text = svc["spec"]["serveConfigV2"]
    assert load_serve_config(text) == serve_config(p.spec, USER_CONFIG)
    assert serving_status_of(svc, p.spec).release_id == "r1"

    svc["metadata"]["resourceVersion"] = "41"
    new_config = {**USER_CONFIG, "release_id": "r2", "adapter_uri": "s3://a/r2", "table_version": 9}
    patch = roll_patch(svc, p, new_config)
    assert patch is not None
    assert set(patch) == {"metadata", "spec"} and set(patch["spec"]) == {"serveConfigV2"}
    assert patch["metadata"] == {"resourceVersion": "41"}  # a precondition against concurrent edits
    new_text = patch["spec"]["serveConfigV2"]
    # Only user_config changed: put the old one back and the text is byte-identical.
    restored = load_serve_config(new_text)
    restored["applications"][0]["deployments"][0]["user_config"] = load_serve_config(text)["applications"][0][
        "deployments"
    ][0]["user_config"]
    assert dump_serve_config(restored) == text
    changed = [line for line in difflib.ndiff(text.splitlines(), new_text.splitlines()) if line[:1] in "+-"]
    assert changed and all(any(k in line for k in ("release_id", "adapter_uri", "table_version")) for line in changed)
    assert roll_patch({**svc, "spec": {"serveConfigV2": new_text}}, p, new_config) is None  # already serving it


def test_observed_job_reads_kuberay_status() -> None:
    p = policy()
    job = rayjob_manifest(p, launch(p))
    job["metadata"]["creationTimestamp"] = "2030-01-08T03:00:05Z"
    running = observed_job({**job, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}})
    assert running is not None and not running.terminal
    assert running.start_time == datetime(2030, 1, 8, 3, 0, 5, tzinfo=UTC)
    ok = observed_job(
        {
            **job,
            "status": {
                "jobDeploymentStatus": "Complete",
                "jobStatus": "SUCCEEDED",
                "startTime": "2030-01-08T03:01:00Z",
                "endTime": "2030-01-08T04:00:00Z",
            },
        }
    )
    assert ok is not None and ok.terminal and ok.succeeded and ok.kind == RunKind.FINETUNE and ok.generation == 4
    assert ok.end_time == datetime(2030, 1, 8, 4, tzinfo=UTC)
    # KubeRay reports Complete when the Ray job itself FAILED: a failure, not a success.
    failed = observed_job({**job, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}})
    assert failed is not None and failed.terminal and not failed.succeeded
    crashed = observed_job({**job, "status": {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}})
    assert crashed is not None and crashed.terminal and crashed.reason == "DeadlineExceeded"
    assert observed_job({"metadata": {"name": "x", "labels": {}}}) is None
    assert owner_key(job) == ("ml", "recs")
    assert owner_key({"metadata": {"ownerReferences": [{"kind": "Deployment", "name": "x"}]}}) is None


def test_backend_implements_the_protocol() -> None:
    from kubernetes import client

    assert isinstance(KubeRayBackend(client.ApiClient()), Backend)
