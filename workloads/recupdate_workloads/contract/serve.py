"""The Serve side of the contract: the typed ``user_config`` of a release, and the Serve application config.

The application config has the shape of Ray Serve's declarative config (``ServeDeploySchema``), which is
also what KubeRay's ``serveConfigV2`` holds:

    applications: [{name, import_path, route_prefix, runtime_env,
                    deployments: [{name, num_replicas, max_ongoing_requests, ray_actor_options, user_config}]}]

The operator puts it into a RayService (as YAML); local mode deploys the same dict through Serve's deploy
path. Only ``user_config`` changes between releases, so a rollout is an in-place ``reconfigure()`` on live
replicas: Serve (and KubeRay) treat a config that differs only in ``user_config`` as a lightweight update.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from recupdate_workloads.contract.env import DSN_ENV

APP_NAME = "recommender"
DEPLOYMENT_NAME = "Recommender"
#: The Ray Serve application every release is served by.
IMPORT_PATH = "recupdate_workloads.serving.deployment:app"
ROUTE_PREFIX = "/"
#: Requests one replica takes at once. The handler is async and a table hit takes microseconds, so the
#: default of Ray Serve (5) would queue requests in the proxy for nothing.
DEFAULT_MAX_ONGOING_REQUESTS = 64
#: What Serve's ``grpc_options.grpc_servicer_functions`` lists for the gRPC API (serving.grpc_api).
GRPC_SERVICER_FUNCTION = "recupdate_workloads.serving.grpc_api.add_RecommenderServicer_to_server"
#: The port of Serve's gRPC proxy when it is on (Serve's documented example port).
DEFAULT_GRPC_PORT = 9000


class CanaryConfig(BaseModel):
    """A candidate that answers a share of users beside the served release, during a canary analysis
    (docs/analysis.md): users whose contract.analysis.canary_bucket is below ``percent`` of the buckets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release_id: str = Field(min_length=1, description="The candidate release.")
    adapter_uri: str | None = Field(None, description="Its adapter directory; None: no online generation.")
    table_version: int = Field(ge=0, description="Its transition table version.")
    percent: float = Field(gt=0, le=100, description="The share of users (by the hash of user_id) it answers.")


class UserConfig(BaseModel):
    """A release's Serve ``user_config``: which release to serve, plus optional tuning knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release_id: str = Field(min_length=1, description="The release to serve.")
    adapter_uri: str | None = Field(
        None, description="LoRA adapter directory (or a full model directory); None: no online generation."
    )
    table_version: int = Field(ge=0, description="The transition table version to serve.")
    store_schema: str = Field(min_length=1, description="The policy's schema in the store.")
    dsn_env: str = Field(DSN_ENV, min_length=1, description="Environment variable holding the store DSN.")
    online_timeout_ms: float = Field(200.0, ge=0, le=60_000, description="Time limit of online generation.")
    evidence_timeout_ms: float = Field(200.0, ge=0, le=60_000, description="Time limit of a fresh evidence lookup.")
    background_swap: bool = Field(
        False, description="Load in the background and return from reconfigure() at once (for single replicas)."
    )
    canary: CanaryConfig | None = Field(
        None, description="A candidate also loaded by every replica, answering a canary share of users."
    )

    def same_release(self, other: UserConfig) -> bool:
        keys = ("release_id", "adapter_uri", "table_version", "store_schema", "dsn_env")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


#: The keys every user_config carries; the other fields of UserConfig are optional knobs.
USER_CONFIG_KEYS = tuple(k for k, f in UserConfig.model_fields.items() if f.is_required() or k == "adapter_uri")
OPTIONAL_USER_CONFIG_KEYS = tuple(k for k in UserConfig.model_fields if k not in USER_CONFIG_KEYS)


def user_config(
    release_id: str,
    adapter_uri: str | None,
    table_version: int,
    store_schema: str,
    **extra: Any,
) -> dict[str, Any]:
    """A release's user_config as Serve receives it: the contract keys first, then the optional knobs that
    are set (``dsn_env``, ``online_timeout_ms``, ``evidence_timeout_ms``, ``background_swap``, ``canary``)."""
    unknown = set(extra) - set(OPTIONAL_USER_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
    knobs = {k: v for k, v in extra.items() if v is not None}
    uc = UserConfig(
        release_id=str(release_id),
        adapter_uri=adapter_uri,
        table_version=int(table_version),
        store_schema=store_schema,
        **knobs,
    )
    return uc.model_dump(include=set(USER_CONFIG_KEYS) | set(knobs))


def release_keys(release_id: str, adapter_uri: str | None, table_version: Any, store_schema: str) -> dict[str, Any]:
    """The contract keys of a release's user_config, as the controller's view of the registry holds them. Not
    validated here: the planner never raises, and ``normalize_user_config`` checks them on the way to Serve."""
    return {
        "release_id": release_id,
        "adapter_uri": adapter_uri,
        "table_version": table_version,
        "store_schema": store_schema,
    }


def canary_keys(release_id: str, adapter_uri: str | None, table_version: Any, percent: float) -> dict[str, Any]:
    """The ``canary`` entry of a user_config (CanaryConfig) as the controller builds it; not validated here,
    as release_keys."""
    return {"release_id": release_id, "adapter_uri": adapter_uri, "table_version": table_version, "percent": percent}


def normalize_user_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A user_config checked against UserConfig (ValueError when a contract key is missing or a key unknown),
    in the contract's key order, ``table_version`` as an integer."""
    missing = [k for k in USER_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"user_config lacks {missing}")
    base = {k: config[k] for k in USER_CONFIG_KEYS}
    return user_config(**base, **{k: v for k, v in config.items() if k not in USER_CONFIG_KEYS})


def serve_application(
    user_config: Mapping[str, Any],
    replicas: int = 1,
    *,
    name: str = APP_NAME,
    deployment: str = DEPLOYMENT_NAME,
    route_prefix: str = ROUTE_PREFIX,
    import_path: str = IMPORT_PATH,
    runtime_env: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory_bytes: int | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    background_swap: bool | Literal["auto"] | None = "auto",
    access_log: bool = True,
) -> dict[str, Any]:
    """One entry of ``applications`` in a Serve config / KubeRay ``serveConfigV2``.

    ``background_swap`` ("auto": on for a single replica) makes replicas load a new release in the background
    and return from ``reconfigure()`` at once: Serve routes no request to a replica while its reconfigure()
    runs, so with one replica an awaited load would queue all traffic for its whole duration. With several
    replicas Serve updates them one at a time and the others keep serving, so the awaited load (and Serve's
    status reflecting it) is kept. None leaves the key out (the replica's default). ``access_log=False``
    turns off Serve's per-request access log lines.

    ``env_vars`` are merged into ``runtime_env.env_vars``. Ray logs a runtime_env, so never pass the DSN
    itself there: on Kubernetes it comes from a Secret on the Ray pods (pass nothing); locally pass
    ``RECUPDATE_STORE_DSN_FILE``, the path of a private file holding it (contract.secret_file). ``num_cpus``
    is per replica: local mode gives replicas a fraction of a CPU so Ray Train and refresh jobs still fit on a
    small machine."""
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    uc = normalize_user_config(user_config)
    if "background_swap" not in user_config and background_swap is not None:
        uc["background_swap"] = replicas == 1 if background_swap == "auto" else bool(background_swap)
    env = copy.deepcopy(dict(runtime_env or {}))
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **{k: str(v) for k, v in env_vars.items()}}
    actor: dict[str, Any] = {"num_cpus": float(num_cpus)}
    if num_gpus > 0:
        actor["num_gpus"] = float(num_gpus)
    if memory_bytes is not None:
        actor["memory"] = int(memory_bytes)
    app: dict[str, Any] = {
        "name": name,
        "import_path": import_path,
        "route_prefix": route_prefix,
        "runtime_env": env,
        "deployments": [
            {
                "name": deployment,
                "num_replicas": int(replicas),
                "max_ongoing_requests": int(max_ongoing_requests),
                "ray_actor_options": actor,
                "user_config": uc,
            }
        ],
    }
    if not access_log:
        app["logging_config"] = {"enable_access_log": False}
    return app


def grpc_options(port: int = DEFAULT_GRPC_PORT) -> dict[str, Any]:
    """Serve's ``grpc_options`` that serve ``recupdate.v1.Recommender`` (serving.grpc_api) on ``port``."""
    return {"port": int(port), "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]}


def deploy_config(
    applications: list[dict[str, Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_location: str = "HeadOnly",
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """A whole Serve deploy config (``ServeDeploySchema``) for local mode; ``grpc_port`` also starts Serve's
    gRPC proxy there (grpc_options). KubeRay sets the HTTP options itself, so its ``serveConfigV2`` holds only
    ``applications``."""
    config: dict[str, Any] = {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": int(port)},
        "applications": applications,
    }
    if grpc_port is not None:
        config["grpc_options"] = grpc_options(grpc_port)
    return config


def _deployment(config: Mapping[str, Any], app: str, deployment: str) -> dict[str, Any] | None:
    for a in config.get("applications") or []:
        if isinstance(a, dict) and a.get("name") == app:
            for d in a.get("deployments") or []:
                if isinstance(d, dict) and d.get("name") == deployment:
                    return d
    return None


def user_config_of(
    config: Mapping[str, Any], app: str = APP_NAME, deployment: str = DEPLOYMENT_NAME
) -> dict[str, Any] | None:
    """The user_config of the recommender deployment in a Serve config, or None."""
    d = _deployment(config, app, deployment)
    uc = d.get("user_config") if d is not None else None
    return dict(uc) if isinstance(uc, Mapping) else None


def with_user_config(
    config: Mapping[str, Any],
    new_user_config: Mapping[str, Any],
    app: str = APP_NAME,
    deployment: str = DEPLOYMENT_NAME,
) -> dict[str, Any]:
    """A copy of a Serve config whose recommender deployment carries ``new_user_config``; nothing else
    changes, so deploying it is an in-place reconfigure, never a replica replacement. ``background_swap``, a
    property of the deployment's shape rather than of a release, is kept unless ``new_user_config`` sets it.
    KeyError when the application or deployment is missing."""
    out = copy.deepcopy(dict(config))
    d = _deployment(out, app, deployment)
    if d is None:
        raise KeyError(f"no deployment {deployment!r} in application {app!r}")
    uc = normalize_user_config(new_user_config)
    old = d.get("user_config") or {}
    if "background_swap" not in uc and "background_swap" in old:
        uc["background_swap"] = old["background_swap"]
    d["user_config"] = uc
    return out
