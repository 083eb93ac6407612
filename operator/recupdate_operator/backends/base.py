"""Where work runs: the interface every backend implements, and the Serve config both backends deploy.

A backend turns the planner's job and serving actions into real objects: KubeRay RayJobs and a RayService
(kuberay.py), or local Ray jobs and a local Serve deployment (local mode). Like the backends of Kubeflow's
SDK, each one is a small class behind one Protocol, so handlers.py never knows which one it drives.

``serve_config`` maps a policy's spec onto the Serve application config of the contract
(``recupdate_workloads.contract.serve``): KubeRay puts it (as YAML) into the RayService's ``serveConfigV2``,
local mode deploys the same dict through Serve's deploy path. Only the deployment's ``user_config`` changes
between releases, so a roll is an in-place ``reconfigure()`` on live replicas (docs/architecture.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import yaml

from recupdate_workloads.contract.env import DSN_ENV
from recupdate_workloads.contract.serve import grpc_options, serve_application

from ..api import PolicySpec, schema_name
from ..planner import LaunchRun, ObservedJob


class BackendError(Exception):
    """A backend call failed. The message is safe to show (no secrets). transient: retrying may help."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class PolicyRef:
    """The policy a backend acts for: identity (owner references), validated spec, generation."""

    name: str
    namespace: str
    uid: str
    spec: PolicySpec
    generation: int = 1

    @property
    def schema(self) -> str:
        return schema_name(self.name, self.spec)


@dataclass(frozen=True)
class ServingStatus:
    """What the backend's serving object says: which release it serves and whether it is up."""

    name: str
    release_id: str | None = None
    user_config: Mapping[str, Any] | None = None
    generation: int | None = None  # the policy generation the serving object was last built from
    status: str = ""  # KubeRay's serviceStatus (e.g. Running), or the local equivalent
    ready: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Runs jobs and serves releases for policies. Every method is idempotent and synchronous (handlers call
    them from worker threads); failures raise BackendError with a message that carries no secret."""

    def launch_run(self, policy: PolicyRef, launch: LaunchRun) -> str:
        """Start the job of `launch` under its deterministic name (launch.job_name); return that name. A job of
        that name that already exists for this policy counts as launched (a restart never launches twice)."""
        ...

    def delete_job(self, policy: PolicyRef, name: str) -> None:
        """Stop and delete a job; a job that is already gone is fine."""
        ...

    def observe_jobs(self, policy: PolicyRef) -> list[ObservedJob]:
        """The policy's jobs, as the planner reads them."""
        ...

    def ensure_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        """Create the serving object, or bring all of it in line with the spec, serving `user_config`."""
        ...

    def roll_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        """Switch serving to another release: change only user_config (a reconfigure, not a redeploy).
        Creates the serving object when there is none."""
        ...

    def stop_serving(self, policy: PolicyRef) -> None:
        """Delete the serving object; one that is already gone is fine."""
        ...

    def serving_status(self, policy: PolicyRef) -> ServingStatus | None:
        """The serving object's state, or None when there is none."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Quantities


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "4Gi", "1G") in bytes."""
    m = _QUANTITY.match(quantity.strip())
    if not m:
        raise ValueError(f"invalid quantity {quantity!r}")
    return int(float(m.group(1)) * _FACTORS[m.group(2)])


def cpu_quantity(cpus: float) -> str:
    """CPUs as a Kubernetes quantity: 2.0 -> "2", 0.5 -> "500m"."""
    if cpus == int(cpus):
        return str(int(cpus))
    return f"{math.ceil(cpus * 1000)}m"


def gpu_count(gpus: float) -> int:
    """GPUs a pod must request: Kubernetes extended resources are integers, so fractions round up."""
    return math.ceil(gpus) if gpus > 0 else 0


# ---------------------------------------------------------------------------------------------------------
# Serve config: one source for KubeRay's serveConfigV2 and local mode's deploy


def serve_config(spec: PolicySpec, user_config: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve config of a policy serving `user_config` ({release_id, adapter_uri, table_version,
    store_schema}): ``{"applications": [...]}``, the shape of Ray Serve's ServeDeploySchema and of KubeRay's
    serveConfigV2. HTTP options are left to the platform (KubeRay sets them; local mode adds its own); with
    ``spec.serving.grpcPort``, ``grpc_options`` start Serve's gRPC proxy with the recommender's service."""
    serving = spec.serving
    res = serving.resources
    env_vars = {e.name: e.value for e in spec.runtime.env if e.name != DSN_ENV}
    app = serve_application(
        user_config,
        int(serving.replicas),
        name=serving.application_name,
        deployment=serving.deployment_name,
        env_vars=env_vars,
        num_cpus=float(res.cpus),
        num_gpus=float(res.gpus),
        memory_bytes=quantity_bytes(res.memory),
        background_swap=None,
    )
    config: dict[str, Any] = {"applications": [app]}
    if serving.grpc_port is not None:
        config["grpc_options"] = grpc_options(serving.grpc_port)
    return config


def dump_serve_config(config: Mapping[str, Any]) -> str:
    """serveConfigV2 text: deterministic YAML, so that parse + dump of our own output is byte-identical."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, width=1_000_000)


def load_serve_config(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text or "") or {}
    if not isinstance(doc, dict):
        raise ValueError("serveConfigV2 is not a YAML mapping")
    return doc
