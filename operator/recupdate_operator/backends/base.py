"""Where work runs: the interface every backend implements, and the Serve config both backends deploy.

A backend turns the planner's job and serving actions into real objects: KubeRay RayJobs and a RayService
(kuberay.py), or local Ray jobs and a local Serve deployment (local mode). Like the backends of Kubeflow's
SDK, each one is a small class behind one Protocol, so handlers.py never knows which one it drives.

``serve_config`` is the single source of the Serve application config: KubeRay puts it (as YAML) into the
RayService's ``serveConfigV2``, local mode deploys the same dict through Serve's deploy path. Only the
deployment's ``user_config`` changes between releases (DESIGN.md section 4), so a roll is an in-place
``reconfigure()`` on live replicas.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import yaml

from ..api import PolicySpec, schema_name
from ..planner import LaunchRun, ObservedJob

#: The Ray Serve application every release is served by (workloads/recupdate_workloads/serving.py).
SERVE_IMPORT_PATH = "recupdate_workloads.serving:app"
SERVE_ROUTE_PREFIX = "/"
#: Requests one replica takes at once: the handler is async and a table lookup takes microseconds.
SERVE_MAX_ONGOING_REQUESTS = 64
#: The environment variable jobs and Serve replicas read the store DSN from (DESIGN.md section 4).
DSN_ENV = "RECUPDATE_STORE_DSN"
#: The contract keys of Serve's user_config (DESIGN.md section 4).
USER_CONFIG_KEYS = ("release_id", "adapter_uri", "table_version", "store_schema")


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


def normalize_user_config(user_config: Mapping[str, Any]) -> dict[str, Any]:
    """The user_config as Serve receives it: the contract keys first, table_version as an integer."""
    missing = [k for k in USER_CONFIG_KEYS if k not in user_config]
    if missing:
        raise ValueError(f"user_config lacks {missing}")
    out = {k: user_config[k] for k in USER_CONFIG_KEYS}
    tv = out["table_version"]
    if isinstance(tv, str) and tv.isdigit():
        out["table_version"] = int(tv)
    out.update({k: v for k, v in user_config.items() if k not in USER_CONFIG_KEYS})
    return out


def serve_config(spec: PolicySpec, user_config: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve config of a policy serving `user_config` ({release_id, adapter_uri, table_version,
    store_schema}): ``{"applications": [...]}``, the shape of Ray Serve's ServeDeploySchema and of KubeRay's
    serveConfigV2. HTTP options are left to the platform (KubeRay sets them; local mode adds its own)."""
    serving = spec.serving
    res = serving.resources
    actor: dict[str, Any] = {"num_cpus": float(res.cpus)}
    if res.gpus > 0:
        actor["num_gpus"] = float(res.gpus)
    actor["memory"] = quantity_bytes(res.memory)
    env_vars = {e.name: e.value for e in spec.runtime.env if e.name != DSN_ENV}
    return {
        "applications": [
            {
                "name": serving.application_name,
                "import_path": SERVE_IMPORT_PATH,
                "route_prefix": SERVE_ROUTE_PREFIX,
                "runtime_env": {"env_vars": env_vars} if env_vars else {},
                "deployments": [
                    {
                        "name": serving.deployment_name,
                        "num_replicas": int(serving.replicas),
                        "max_ongoing_requests": SERVE_MAX_ONGOING_REQUESTS,
                        "ray_actor_options": actor,
                        "user_config": normalize_user_config(user_config),
                    }
                ],
            }
        ]
    }


def dump_serve_config(config: Mapping[str, Any]) -> str:
    """serveConfigV2 text: deterministic YAML, so that parse + dump of our own output is byte-identical."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, width=1_000_000)


def load_serve_config(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text or "") or {}
    if not isinstance(doc, dict):
        raise ValueError("serveConfigV2 is not a YAML mapping")
    return doc


def _deployment(config: Mapping[str, Any], app: str, deployment: str) -> dict[str, Any] | None:
    for a in config.get("applications") or []:
        if isinstance(a, dict) and a.get("name") == app:
            for d in a.get("deployments") or []:
                if isinstance(d, dict) and d.get("name") == deployment:
                    return d
    return None


def user_config_of(config: Mapping[str, Any], app: str, deployment: str) -> dict[str, Any] | None:
    """The user_config of `deployment` in application `app`, or None."""
    d = _deployment(config, app, deployment)
    uc = d.get("user_config") if d is not None else None
    return dict(uc) if isinstance(uc, Mapping) else None


def with_user_config(
    config: Mapping[str, Any], user_config: Mapping[str, Any], app: str, deployment: str
) -> dict[str, Any]:
    """A copy of `config` whose deployment serves `user_config`; nothing else changes. KeyError when the
    application or deployment is missing."""
    out = copy.deepcopy(dict(config))
    d = _deployment(out, app, deployment)
    if d is None:
        raise KeyError(f"no deployment {deployment!r} in application {app!r}")
    d["user_config"] = normalize_user_config(user_config)
    return out
