"""The Serve config of the recommender application, as plain dicts: one source for local mode and KubeRay.

Pure and import-light (standard library only), so the operator, which never imports Ray or torch, can build
``serveConfigV2`` from the same function that local mode deploys (DESIGN.md section 4). The shape is Ray
Serve's declarative config (``ServeDeploySchema``), which is also what KubeRay's ``serveConfigV2`` holds:

    applications: [{name, import_path, route_prefix, runtime_env,
                    deployments: [{name, num_replicas, max_ongoing_requests, ray_actor_options, user_config}]}]

Only ``user_config`` changes between releases, so a rollout is an in-place ``reconfigure()`` on live
replicas: Serve (and KubeRay) treat a config that differs only in ``user_config`` as a lightweight update.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

APP_NAME = "recommender"
DEPLOYMENT_NAME = "Recommender"
IMPORT_PATH = "recupdate_workloads.serving:app"
ROUTE_PREFIX = "/"
DSN_ENV = "RECUPDATE_STORE_DSN"
#: The contract keys of a release's user_config (DESIGN.md section 4); the rest are optional tuning knobs.
USER_CONFIG_KEYS = ("release_id", "adapter_uri", "table_version", "store_schema")
OPTIONAL_USER_CONFIG_KEYS = ("dsn_env", "online_timeout_ms", "evidence_timeout_ms", "background_swap")
#: Requests one replica takes at once. The handler is async and a table hit takes microseconds, so the
#: default of Ray Serve (5) would queue requests in the proxy for nothing.
DEFAULT_MAX_ONGOING_REQUESTS = 64


def user_config(
    release_id: str,
    adapter_uri: str | None,
    table_version: int,
    store_schema: str,
    **extra: Any,
) -> dict[str, Any]:
    """A release's user_config: the contract keys plus optional ones (``dsn_env``, ``online_timeout_ms``,
    ``evidence_timeout_ms``, ``background_swap``)."""
    unknown = set(extra) - set(OPTIONAL_USER_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
    out: dict[str, Any] = {
        "release_id": str(release_id),
        "adapter_uri": adapter_uri,
        "table_version": int(table_version),
        "store_schema": store_schema,
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def serve_application(
    user_config: Mapping[str, Any],
    replicas: int = 1,
    *,
    name: str = APP_NAME,
    route_prefix: str = ROUTE_PREFIX,
    import_path: str = IMPORT_PATH,
    runtime_env: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    env_vars: Mapping[str, str] | None = None,
    background_swap: bool | None = None,
    access_log: bool = True,
) -> dict[str, Any]:
    """One entry of ``applications`` in a Serve config / KubeRay ``serveConfigV2``.

    ``background_swap`` (default: on for a single replica) makes replicas load a new release in the background
    and return from ``reconfigure()`` at once: Serve routes no request to a replica while its reconfigure()
    runs, so with one replica an awaited load would queue all traffic for its whole duration. With several
    replicas Serve updates them one at a time and the others keep serving, so the awaited load (and Serve's
    status reflecting it) is kept. ``access_log=False`` turns off Serve's per-request access log lines.

    ``env_vars`` are merged into ``runtime_env.env_vars``. Ray logs a runtime_env, so never pass the DSN
    itself there: on Kubernetes it comes from a Secret on the Ray pods (pass nothing); locally pass
    ``RECUPDATE_STORE_DSN_FILE``, the path of a private file holding it (contract.secret_file). ``num_cpus`` is per replica: local mode gives replicas a fraction of a CPU so Ray Train and
    refresh jobs still fit on a small machine."""
    missing = [k for k in USER_CONFIG_KEYS if k not in user_config]
    if missing:
        raise ValueError(f"user_config lacks {missing}")
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    uc = dict(user_config)
    if "background_swap" not in uc:
        uc["background_swap"] = replicas == 1 if background_swap is None else bool(background_swap)
    env = copy.deepcopy(dict(runtime_env or {}))
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **{k: str(v) for k, v in env_vars.items()}}
    app: dict[str, Any] = {
        "name": name,
        "import_path": import_path,
        "route_prefix": route_prefix,
        "runtime_env": env,
        "deployments": [
            {
                "name": DEPLOYMENT_NAME,
                "num_replicas": int(replicas),
                "max_ongoing_requests": int(max_ongoing_requests),
                "ray_actor_options": {"num_cpus": float(num_cpus)},
                "user_config": uc,
            }
        ],
    }
    if not access_log:
        app["logging_config"] = {"enable_access_log": False}
    return app


def serve_config(
    applications: list[dict[str, Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_location: str = "HeadOnly",
) -> dict[str, Any]:
    """A whole Serve deploy config (``ServeDeploySchema``) for local mode. KubeRay sets the HTTP options
    itself, so its ``serveConfigV2`` holds only ``applications``."""
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": int(port)},
        "applications": applications,
    }


def with_user_config(
    config: Mapping[str, Any], new_user_config: Mapping[str, Any], app_name: str = APP_NAME
) -> dict[str, Any]:
    """A copy of a Serve config whose recommender deployment carries ``new_user_config``; nothing else
    changes, so deploying it is an in-place reconfigure, never a replica replacement. ``background_swap``, a
    property of the deployment's shape rather than of a release, is kept unless ``new_user_config`` sets it."""
    out = copy.deepcopy(dict(config))
    for app in out.get("applications", []):
        if app.get("name") != app_name:
            continue
        for dep in app.get("deployments", []):
            if dep.get("name") == DEPLOYMENT_NAME:
                uc = dict(new_user_config)
                old = dep.get("user_config") or {}
                if "background_swap" not in uc and "background_swap" in old:
                    uc["background_swap"] = old["background_swap"]
                dep["user_config"] = uc
                return out
    raise KeyError(f"no deployment {DEPLOYMENT_NAME!r} in application {app_name!r}")


def recommender_user_config(config: Mapping[str, Any], app_name: str = APP_NAME) -> dict[str, Any] | None:
    """The user_config of the recommender deployment in a Serve config, or None."""
    for app in config.get("applications", []):
        if app.get("name") == app_name:
            for dep in app.get("deployments", []):
                if dep.get("name") == DEPLOYMENT_NAME:
                    uc = dep.get("user_config")
                    return dict(uc) if uc is not None else None
    return None
