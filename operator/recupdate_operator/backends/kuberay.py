"""The KubeRay backend: one RayJob per run, one RayService per policy (docs/architecture.md).

Pure builder functions make the manifests (like dask-kubernetes' make_pod_spec): easy to test and to read.
``KubeRayBackend`` sends them with the synchronous ``kubernetes`` client; handlers.py calls it from worker
threads, never from the event loop.

Secrets: the store DSN is never written into a manifest. Ray pods get RECUPDATE_STORE_DSN through
``valueFrom.secretKeyRef`` on their containers (the Secret of spec.store.secretRef, else the operator's
default), and the data sources' credentials the same way (data_env); with spec.runtime.clusterSelector the
existing RayCluster must carry them already.

Every API call is marked ``# rbac: <group> <resource> <verb>``; rbac.py lists them all (a test checks it).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from recupdate_workloads.contract import entrypoints
from recupdate_workloads.contract.env import S3_CREDENTIAL_ENV, SOURCE_DSN_ENV
from recupdate_workloads.contract.serve import user_config_of, with_user_config
from recupdate_workloads.contract.timefmt import iso, parse_time

from ..api import (
    API_VERSION,
    KIND,
    LABEL_GENERATION,
    LABEL_KIND,
    LABEL_POLICY,
    LABEL_RUN_ID,
    RunKind,
    SecretKeyRef,
)
from ..planner import LaunchRun, ObservedJob
from .base import (
    DSN_ENV,
    BackendError,
    PolicyRef,
    ServingStatus,
    cpu_quantity,
    dump_serve_config,
    gpu_count,
    load_serve_config,
    serve_config,
)

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
RAYJOBS = "rayjobs"
RAYSERVICES = "rayservices"
MANAGED_BY = {"app.kubernetes.io/managed-by": "recupdate"}
ANNOTATION_SCHEDULED_AT = "recupdate.io/scheduled-at"
ANNOTATION_ATTEMPT = "recupdate.io/attempt"
#: KubeRay deletes a finished job's RayCluster this long after the end (the RayJob itself stays until the
#: history limits prune it): time enough to read the logs.
TTL_SECONDS_AFTER_FINISHED = 600
#: The head runs the driver only (num-cpus 0 keeps Train workers off it).
HEAD_CPU = "1"
HEAD_MEMORY = "2Gi"
REQUEST_TIMEOUT = (5, 30)  # (connect, read) seconds for every API call
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


# ---------------------------------------------------------------------------------------------------------
# Builders (pure)


def label_value(text: str) -> str:
    """`text` as a label value (at most 63 characters): cut, with a hash to stay unique, when too long."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    cut = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:54].strip("-_.")
    return f"{cut}-{digest}" if cut else digest


def owner_reference(policy: PolicyRef) -> dict[str, Any]:
    """The policy as controller owner: Kubernetes garbage-collects the children when it is deleted."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": policy.name,
        "uid": policy.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_key(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, policy name) of the policy that controls `obj`, from its owner references."""
    meta = obj.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        same_group = str(ref.get("apiVersion", "")).split("/")[0] == API_VERSION.split("/")[0]
        if ref.get("kind") == KIND and same_group and ref.get("controller", False):
            return str(meta.get("namespace") or ""), str(ref.get("name"))
    return None


def labels(policy: PolicyRef, **extra: str) -> dict[str, str]:
    return {
        **MANAGED_BY,
        LABEL_POLICY: label_value(policy.name),
        LABEL_GENERATION: str(policy.generation),
        **{k: label_value(v) for k, v in extra.items()},
    }


def entrypoint(launch: LaunchRun) -> str:
    """The run's command line (contract.entrypoints), config inline as compact JSON, shell-quoted."""
    config = json.dumps(dict(launch.config), sort_keys=True, separators=(",", ":"))
    return shlex.join(entrypoints.command(launch.kind.value, config, launch.run_id))


def store_secret(policy: PolicyRef, default: SecretKeyRef | None = None) -> SecretKeyRef | None:
    """The Secret holding the DSN jobs and Serve replicas use: spec.store.secretRef, else the default."""
    return policy.spec.store.secret_ref or default


def store_env(secret: SecretKeyRef | None) -> list[dict[str, Any]]:
    """Container env with the DSN taken from a Secret by reference: the value never enters the manifest."""
    if secret is None:
        return []
    return [{"name": DSN_ENV, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}]


def data_env(policy: PolicyRef) -> list[dict[str, Any]]:
    """Container env for the data sources' credentials, each from its Secret by reference: the user's
    PostgreSQL DSN (spec.data.sql.dsnSecretRef) and the object-storage keys (spec.data.objectStorage.
    credentialsSecret; the session token is optional)."""
    data = policy.spec.data
    env: list[dict[str, Any]] = []
    if data.sql is not None:
        ref = data.sql.dsn_secret_ref
        env.append({"name": SOURCE_DSN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if data.object_storage.credentials_secret:
        for name in S3_CREDENTIAL_ENV:
            key_ref: dict[str, Any] = {"name": data.object_storage.credentials_secret, "key": name}
            if name == "AWS_SESSION_TOKEN":
                key_ref["optional"] = True
            env.append({"name": name, "valueFrom": {"secretKeyRef": key_ref}})
    return env


#: Variables a user may not set through spec.runtime.env: they come from Secrets (store_env, data_env).
_SECRET_ENV = frozenset({DSN_ENV, SOURCE_DSN_ENV, *S3_CREDENTIAL_ENV})


def user_env(policy: PolicyRef) -> dict[str, str]:
    """spec.runtime.env, minus any attempt to inline the DSN or a data source's credentials."""
    return {e.name: e.value for e in policy.spec.runtime.env if e.name not in _SECRET_ENV}


def runtime_env_yaml(policy: PolicyRef, launch: LaunchRun) -> str:
    env = {
        "RECUPDATE_POLICY": policy.name,
        "RECUPDATE_NAMESPACE": policy.namespace,
        "RECUPDATE_RUN_ID": launch.run_id,
        "RECUPDATE_STORE_SCHEMA": policy.schema,
        **user_env(policy),
    }
    return yaml.safe_dump({"env_vars": env}, sort_keys=True)


def resources(cpus: float, gpus: float, memory: str) -> dict[str, Any]:
    """Requests = limits (Guaranteed for memory and GPUs); GPUs as nvidia.com/gpu, rounded up."""
    req: dict[str, Any] = {"cpu": cpu_quantity(cpus), "memory": memory}
    if gpu_count(gpus):
        req["nvidia.com/gpu"] = gpu_count(gpus)
    return {"requests": dict(req), "limits": dict(req)}


def _container(
    name: str, image: str, secret: SecretKeyRef | None, res: dict[str, Any], extra_env: list[dict[str, Any]] | None
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "resources": res}
    env = store_env(secret) + list(extra_env or [])
    if env:
        container["env"] = env
    return container


def _pod_template(policy: PolicyRef, container: dict[str, Any], pod_labels: dict[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if policy.spec.runtime.service_account_name:
        spec["serviceAccountName"] = policy.spec.runtime.service_account_name
    return {"metadata": {"labels": dict(pod_labels)}, "spec": spec}


def ray_cluster_spec(
    policy: PolicyRef,
    *,
    image: str,
    workers: int,
    cpus: float,
    gpus: float,
    memory: str,
    secret: SecretKeyRef | None,
    group_name: str,
    pod_labels: dict[str, str],
    head_cpus: str = "0",
    extra_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A RayCluster spec: a head (the driver) and one fixed-size worker group."""
    head = _container("ray-head", image, secret, resources(float(HEAD_CPU), 0.0, HEAD_MEMORY), extra_env)
    worker = _container("ray-worker", image, secret, resources(cpus, gpus, memory), extra_env)
    return {
        "rayVersion": policy.spec.runtime.ray_version,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": head_cpus},
            "template": _pod_template(policy, head, pod_labels),
        },
        "workerGroupSpecs": [
            {
                "groupName": group_name,
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": _pod_template(policy, worker, pod_labels),
            }
        ],
    }


def rayjob_manifest(
    policy: PolicyRef, launch: LaunchRun, *, default_secret: SecretKeyRef | None = None
) -> dict[str, Any]:
    """The RayJob running `launch`, owned by the policy.

    Fine-tunes get spec.fineTune.resources; refreshes (bulk inference) one worker of the same shape. With
    spec.runtime.clusterSelector the job runs on that existing RayCluster instead of a cluster of its own.
    Retries are the planner's (a new RayJob named -r<n>), so KubeRay's own backoffLimit is 0.
    """
    spec = policy.spec
    job_labels = labels(policy, **{LABEL_KIND: launch.kind.value, LABEL_RUN_ID: launch.run_id})
    job_labels[LABEL_GENERATION] = str(launch.generation)
    job: dict[str, Any] = {
        "entrypoint": entrypoint(launch),
        "runtimeEnvYAML": runtime_env_yaml(policy, launch),
        "metadata": {"policy": policy.name, "runId": launch.run_id, "kind": launch.kind.value},
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
    }
    if launch.kind == RunKind.FINETUNE and spec.fine_tune.active_deadline_seconds:
        job["activeDeadlineSeconds"] = spec.fine_tune.active_deadline_seconds
    secret = store_secret(policy, default_secret)
    if spec.runtime.cluster_selector:
        job["clusterSelector"] = dict(spec.runtime.cluster_selector)
    else:
        res = spec.fine_tune.resources
        job["shutdownAfterJobFinishes"] = True
        job["rayClusterSpec"] = ray_cluster_spec(
            policy,
            image=spec.runtime.image,
            workers=res.workers if launch.kind == RunKind.FINETUNE else 1,
            cpus=res.cpus_per_worker,
            gpus=res.gpus_per_worker,
            memory=res.memory_per_worker,
            secret=secret,
            group_name="train" if launch.kind == RunKind.FINETUNE else "infer",
            pod_labels=job_labels,
            extra_env=data_env(policy),  # the sync step runs in the driver, on the head
        )
    if spec.runtime.service_account_name:
        # The submitter pod runs `ray job submit` only; it needs the service account, not the DSN.
        job["submitterPodTemplate"] = {
            "metadata": {"labels": dict(job_labels)},
            "spec": {
                "serviceAccountName": spec.runtime.service_account_name,
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "ray-job-submitter",
                        "image": spec.runtime.image,
                        "resources": resources(0.2, 0.0, "256Mi"),
                    }
                ],
            },
        }
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": launch.job_name,
            "namespace": policy.namespace,
            "labels": job_labels,
            "annotations": {
                ANNOTATION_SCHEDULED_AT: iso(launch.scheduled_at),
                ANNOTATION_ATTEMPT: str(launch.attempt),
            },
            "ownerReferences": [owner_reference(policy)],
        },
        "spec": job,
    }


def rayservice_name(policy: PolicyRef) -> str:
    """`<policy>-serve`, short enough for KubeRay's derived RayCluster and Service names."""
    base = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", policy.name.lower())).strip("-") or "policy"
    if len(base) > 40:
        base = base[:33].rstrip("-") + "-" + hashlib.sha256(policy.name.encode()).hexdigest()[:6]
    return f"{base}-serve"


def rayservice_manifest(
    policy: PolicyRef, user_config: Mapping[str, Any], *, default_secret: SecretKeyRef | None = None
) -> dict[str, Any]:
    """The policy's RayService: serveConfigV2 from serve_config(), a cluster shaped by spec.serving."""
    spec = policy.spec
    serving = spec.serving
    svc_labels = labels(policy)
    cluster = ray_cluster_spec(
        policy,
        image=serving.image or spec.runtime.image,
        workers=serving.replicas,
        cpus=serving.resources.cpus,
        gpus=serving.resources.gpus,
        memory=serving.resources.memory,
        secret=store_secret(policy, default_secret),
        group_name="serve",
        pod_labels=svc_labels,
    )
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": {
            "name": rayservice_name(policy),
            "namespace": policy.namespace,
            "labels": svc_labels,
            "ownerReferences": [owner_reference(policy)],
        },
        "spec": {
            "serveConfigV2": dump_serve_config(serve_config(spec, user_config)),
            "rayClusterConfig": cluster,
        },
    }


def roll_patch(service: Mapping[str, Any], policy: PolicyRef, user_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch that makes an existing RayService serve `user_config`, changing nothing but the
    user_config inside serveConfigV2 (KubeRay then reconfigures in place). None when it already does.
    KeyError/ValueError when serveConfigV2 has no such deployment (a full ensure_serving is needed)."""
    text = (service.get("spec") or {}).get("serveConfigV2") or ""
    config = load_serve_config(text)
    serving = policy.spec.serving
    new_text = dump_serve_config(
        with_user_config(config, user_config, serving.application_name, serving.deployment_name)
    )
    if new_text == text:
        return None
    rv = (service.get("metadata") or {}).get("resourceVersion")
    patch: dict[str, Any] = {"spec": {"serveConfigV2": new_text}}
    if rv:
        patch["metadata"] = {"resourceVersion": rv}  # a precondition: someone else's edit gives a 409
    return patch


# ---------------------------------------------------------------------------------------------------------
# Reading (pure)


def observed_job(obj: Mapping[str, Any]) -> ObservedJob | None:
    """A RayJob as the planner reads it, or None when it is not a recupdate run (labels missing).

    Terminal iff status.jobDeploymentStatus is Complete or Failed (or ValidationFailed); Complete with a
    jobStatus other than SUCCEEDED is a failure (ObservedJob.succeeded checks both, docs/architecture.md).
    """
    meta = obj.get("metadata") or {}
    lab = meta.get("labels") or {}
    try:
        kind = RunKind(lab.get(LABEL_KIND, ""))
    except ValueError:
        return None
    status = obj.get("status") or {}
    gen = lab.get(LABEL_GENERATION)
    return ObservedJob(
        name=str(meta.get("name")),
        kind=kind,
        run_id=str(meta.get("name")),  # the run id is the job name; the label may be cut to 63 chars
        generation=int(gen) if gen and str(gen).isdigit() else None,
        job_deployment_status=str(status.get("jobDeploymentStatus") or ""),
        job_status=str(status.get("jobStatus") or ""),
        start_time=parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")),
        end_time=parse_time(status.get("endTime")),
        message=str(status.get("message") or "")[:1000],
        reason=str(status.get("reason") or ""),
    )


def serving_status_of(obj: Mapping[str, Any], policy_spec: Any = None) -> ServingStatus:
    """A RayService's state: the release in its serveConfigV2 and whether KubeRay reports it running."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    try:
        config = load_serve_config((obj.get("spec") or {}).get("serveConfigV2") or "")
    except (ValueError, yaml.YAMLError):
        config = {}
    uc: dict[str, Any] | None = None
    if policy_spec is not None:
        uc = user_config_of(config, policy_spec.serving.application_name, policy_spec.serving.deployment_name)
    else:  # the first deployment carrying a user_config
        for app in config.get("applications") or []:
            for dep in (app or {}).get("deployments") or []:
                if isinstance(dep, dict) and isinstance(dep.get("user_config"), dict):
                    uc = dict(dep["user_config"])
                    break
            if uc is not None:
                break
    gen = (meta.get("labels") or {}).get(LABEL_GENERATION)
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or [] if isinstance(c, dict)}
    service_status = str(status.get("serviceStatus") or "")
    return ServingStatus(
        name=str(meta.get("name")),
        release_id=str(uc["release_id"]) if uc and uc.get("release_id") is not None else None,
        user_config=uc,
        generation=int(gen) if gen and str(gen).isdigit() else None,
        status=service_status,
        ready=service_status == "Running" or conditions.get("Ready") == "True",
    )


# ---------------------------------------------------------------------------------------------------------
# The backend


def _as_dict(obj: Any) -> dict[str, Any]:
    """The kubernetes client's answer for custom objects (a JSON dict, typed as object)."""
    return dict(obj) if isinstance(obj, Mapping) else {}


class KubeRayBackend:
    """Backend on KubeRay, through the synchronous kubernetes client (call it from threads)."""

    def __init__(self, api_client: Any, *, default_secret: SecretKeyRef | None = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.default_secret = default_secret

    # -- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _error(exc: Exception, what: str) -> BackendError:
        status = getattr(exc, "status", None)
        reason = getattr(exc, "reason", "") or type(exc).__name__
        message = ""
        body = getattr(exc, "body", None)
        if body:
            try:
                message = str(json.loads(body).get("message") or "")
            except (ValueError, AttributeError):
                message = ""
        detail = f"{status} {reason}" if status else reason
        # 4xx other than conflicts and throttling will not heal by retrying the same request.
        transient = status is None or status >= 500 or status in (409, 429)
        return BackendError(f"{what}: {detail}{': ' + message[:300] if message else ''}", transient=transient)

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            # rbac: ray.io rayjobs get
            # rbac: ray.io rayservices get
            obj = self.api.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error(exc, f"get {plural} {namespace}/{name}") from None
        except Exception as exc:  # connection errors
            raise self._error(exc, f"get {plural} {namespace}/{name}") from None
        return _as_dict(obj)

    def _create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when an object of that name exists already."""
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        try:
            # rbac: ray.io rayjobs create
            # rbac: ray.io rayservices create
            obj = self.api.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, plural, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise self._error(exc, f"create {plural} {namespace}/{name}") from None
        except Exception as exc:
            raise self._error(exc, f"create {plural} {namespace}/{name}") from None
        return _as_dict(obj) if obj is not None else {}

    def _delete(self, plural: str, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            # rbac: ray.io rayjobs delete
            # rbac: ray.io rayservices delete
            self.api.delete_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION,
                namespace,
                plural,
                name,
                propagation_policy="Background",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise self._error(exc, f"delete {plural} {namespace}/{name}") from None
        except Exception as exc:
            raise self._error(exc, f"delete {plural} {namespace}/{name}") from None

    def _patch(self, plural: str, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            # rbac: ray.io rayservices patch
            obj = self.api.patch_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION,
                namespace,
                plural,
                name,
                patch,
                _request_timeout=REQUEST_TIMEOUT,
                # The client sends every patch as a merge patch unless told otherwise.
                _content_type=JSON_PATCH if isinstance(patch, list) else MERGE_PATCH,
            )
        except ApiException as exc:
            raise self._error(exc, f"patch {plural} {namespace}/{name}") from None
        except Exception as exc:
            raise self._error(exc, f"patch {plural} {namespace}/{name}") from None
        return _as_dict(obj)

    @staticmethod
    def _owned_by(obj: Mapping[str, Any], policy: PolicyRef) -> bool:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(r.get("uid") == policy.uid for r in refs)

    # -- Backend -------------------------------------------------------------------------------------------

    def launch_run(self, policy: PolicyRef, launch: LaunchRun) -> str:
        manifest = rayjob_manifest(policy, launch, default_secret=self.default_secret)
        if self._create(RAYJOBS, policy.namespace, manifest) is None:
            existing = self._get(RAYJOBS, policy.namespace, launch.job_name)
            if existing is not None and not self._owned_by(existing, policy):
                raise BackendError(
                    f"RayJob {policy.namespace}/{launch.job_name} exists and is not owned by this policy",
                    transient=False,
                )
        return launch.job_name

    def delete_job(self, policy: PolicyRef, name: str) -> None:
        self._delete(RAYJOBS, policy.namespace, name)

    def observe_jobs(self, policy: PolicyRef) -> list[ObservedJob]:

        selector = f"{LABEL_POLICY}={label_value(policy.name)}"
        try:
            # rbac: ray.io rayjobs list
            listing = self.api.list_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION,
                policy.namespace,
                RAYJOBS,
                label_selector=selector,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except Exception as exc:
            raise self._error(exc, f"list rayjobs in {policy.namespace}") from None
        jobs = []
        for item in _as_dict(listing).get("items") or []:
            if self._owned_by(item, policy):
                job = observed_job(item)
                if job is not None:
                    jobs.append(job)
        return jobs

    def ensure_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        desired = rayservice_manifest(policy, user_config, default_secret=self.default_secret)
        name = desired["metadata"]["name"]
        if self._create(RAYSERVICES, policy.namespace, desired) is not None:
            return
        existing = self._get(RAYSERVICES, policy.namespace, name)
        if existing is None:  # deleted in between: the next reconcile creates it
            raise BackendError(f"RayService {policy.namespace}/{name} vanished while being updated")
        if not self._owned_by(existing, policy):
            raise BackendError(
                f"RayService {policy.namespace}/{name} exists and is not owned by this policy", transient=False
            )
        if (
            existing.get("spec") == desired["spec"]
            and (existing.get("metadata") or {}).get("labels") == desired["metadata"]["labels"]
        ):
            return
        # A JSON patch replaces spec whole (a merge patch could not drop fields the spec no longer sets).
        rv = existing["metadata"].get("resourceVersion")
        ops: list[dict[str, Any]] = []
        if rv:
            ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": rv})
        ops.append({"op": "replace", "path": "/spec", "value": desired["spec"]})
        ops.append(
            {
                "op": "replace" if "labels" in existing["metadata"] else "add",
                "path": "/metadata/labels",
                "value": desired["metadata"]["labels"],
            }
        )
        self._patch(RAYSERVICES, policy.namespace, name, ops)

    def roll_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        name = rayservice_name(policy)
        existing = self._get(RAYSERVICES, policy.namespace, name)
        if existing is None:
            self.ensure_serving(policy, user_config)
            return
        try:
            patch = roll_patch(existing, policy, user_config)
        except (KeyError, ValueError, yaml.YAMLError):
            self.ensure_serving(policy, user_config)  # not our layout any more: rebuild it
            return
        if patch is not None:
            self._patch(RAYSERVICES, policy.namespace, name, patch)

    def stop_serving(self, policy: PolicyRef) -> None:
        self._delete(RAYSERVICES, policy.namespace, rayservice_name(policy))

    def serving_status(self, policy: PolicyRef) -> ServingStatus | None:
        obj = self._get(RAYSERVICES, policy.namespace, rayservice_name(policy))
        return serving_status_of(obj, policy.spec) if obj is not None else None
