"""The Ray Serve application of the recommender, and rollouts that drop no request.

``recupdate_workloads.serving.deployment:app`` is the import path KubeRay's ``serveConfigV2`` (and local mode) deploy.
The replica wraps ``serving.app.RecommenderService`` and serves ``serving.app.make_api`` as its FastAPI
ingress. ``reconfigure(user_config)`` loads the release beside the current one and swaps it in atomically;
if loading fails the current release keeps serving and ``GET /release`` reports the error.

Rollouts change only the deployment's ``user_config``, through Serve's declarative deploy path
(``ServeDeploySchema`` -> controller ``apply_config``, what ``serve deploy`` and KubeRay use). Serve treats
such a change as a lightweight update and calls ``reconfigure()`` on the live replicas, one at a time;
``serve.run`` would replace them instead, so it is never used for a rollout here.

The config dicts come from ``contract.serve`` (pure, import-light), shared with the operator's KubeRay
backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ray import serve

from recupdate_workloads.contract.serve import (
    APP_NAME,
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEPLOYMENT_NAME,
    deploy_config,
    serve_application,
    user_config,
    user_config_of,
    with_user_config,
)
from recupdate_workloads.serving.app import RecommenderService, batch_max_body_bytes, make_api, max_body_bytes
from recupdate_workloads.serving.grpc_api import serve_grpc

__all__ = [
    "APP_NAME",
    "DEPLOYMENT_NAME",
    "Recommender",
    "app",
    "build_app",
    "current_config",
    "deploy",
    "deploy_config",
    "deployed_user_config",
    "ensure_local_ray",
    "roll",
    "serve_application",
    "shutdown",
    "shutdown_local_ray",
    "user_config",
    "user_config_of",
    "wait_for_release",
    "wait_for_rollout",
    "with_user_config",
]

log = logging.getLogger("recupdate.serving")


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
    graceful_shutdown_timeout_s=10,
)
@serve.ingress()
class Recommender:
    """One replica: the service (current release + last reconfigure outcome) behind the FastAPI ingress."""

    def __init__(self, max_pending_model_calls: int = 4) -> None:
        logging.getLogger("recupdate").setLevel(logging.INFO)
        self.service = RecommenderService(max_pending_model_calls=max_pending_model_calls)
        # the gRPC methods' size limits: the HTTP endpoints' own, read once as make_api reads them
        self._grpc_limits = (max_body_bytes(), batch_max_body_bytes())

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config, at start and on every user_config change.
        It never raises: a failed load keeps the current release (see RecommenderService.reconfigure)."""
        await self.service.reconfigure(config)

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(self.service)

    # gRPC (serving.grpc_api): Serve's gRPC proxy calls the method named as the RPC, with the request's bytes.
    async def Recommend(self, request: bytes, grpc_context: Any = None) -> Any:  # the RPC's name
        """``recupdate.v1.Recommender/Recommend``: what POST /recommend answers, as a RecommendResponse."""
        return await serve_grpc(self.service, request, grpc_context, batch=False, limit=self._grpc_limits[0])

    async def RecommendBatch(self, request: bytes, grpc_context: Any = None) -> Any:
        """``recupdate.v1.Recommender/RecommendBatch``: what POST /recommend/batch answers."""
        return await serve_grpc(self.service, request, grpc_context, batch=True, limit=self._grpc_limits[1])

    async def release_info(self) -> dict[str, Any]:
        """What GET /release answers, for deployment handles."""
        return self.service.release_info()

    def __del__(self) -> None:
        self.service.shutdown()


app = Recommender.bind()  # type: ignore[attr-defined]  # serve.deployment made it a Deployment


def build_app(args: dict[str, Any]) -> Any:
    """An application builder (``import_path: recupdate_workloads.serving.deployment:build_app`` with ``args``):
    ``max_pending_model_calls``."""
    return Recommender.bind(**{k: v for k, v in args.items() if k in ("max_pending_model_calls",)})  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------
# Local mode: a local Ray + Serve, deploys and rollouts through the declarative path


def ensure_local_ray(num_cpus: int = 2, temp_dir: str | None = None, log_to_driver: bool = False) -> bool:
    """Connect to Ray unless connected: RAY_ADDRESS when set, else a fresh local one sized for small machines,
    in a temp dir private to this user (train_loop.ensure_ray). Returns True when this call started it."""
    from recupdate_workloads.model.train_loop import ensure_ray

    return ensure_ray(num_cpus, temp_dir, log_to_driver)


def shutdown_local_ray() -> None:
    """Stop Ray and, when this process started it, remove its session directory (its logs)."""
    from recupdate_workloads.model.train_loop import shutdown_ray

    shutdown_ray()


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deploy(config: Mapping[str, Any], *, wait: bool = True, timeout_s: float = 120.0) -> None:
    """Deploy a Serve config (``deploy_config(...)``: ``ServeDeploySchema`` shape, applications as KubeRay's
    ``serveConfigV2``) through the controller's ``apply_config``, starting Serve with the config's HTTP options
    if needed. A config that differs from the deployed one only in ``user_config`` is applied in place
    (``reconfigure()`` on live replicas). Applications deployed this way and missing from ``config`` are
    deleted, as with ``serve deploy``. With ``wait``, returns once every deployment runs the new config."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(dict(config))
    ensure_local_ray()
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:  # HTTP and gRPC options are fixed when Serve starts; later deploys keep them
        serve.start(
            http_options=dict(config.get("http_options") or {}),
            grpc_options=dict(config.get("grpc_options") or {}) or None,
            proxy_location=config.get("proxy_location") or "HeadOnly",
        )
        client = _client()
    client.deploy_apps(schema)
    if wait:
        wait_for_rollout(config, timeout_s=timeout_s)


def current_config() -> dict[str, Any] | None:
    """The Serve config deployed through the declarative path (all such applications), or None."""
    details = _client().get_serve_details()
    apps = [
        a["deployed_app_config"]
        for a in (details.get("applications") or {}).values()
        if a.get("deployed_app_config") is not None
    ]
    if not apps:
        return None
    http = details.get("http_options") or {}
    return {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {k: http[k] for k in ("host", "port") if k in http},
        "applications": apps,
    }


def roll(
    new_user_config: Mapping[str, Any],
    *,
    app_name: str = APP_NAME,
    config: Mapping[str, Any] | None = None,
    wait: bool = True,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Roll the recommender to a release: redeploy the current config (``config``, else what the controller
    holds) with only the deployment's user_config changed, so replicas reconfigure in place and no request
    fails. Returns the deployed config. A release that fails to load leaves the replicas on the previous one
    (check GET /release)."""
    base = dict(config) if config is not None else current_config()
    if base is None:
        raise RuntimeError("nothing deployed yet: deploy() a config first")
    new = with_user_config(base, new_user_config, app_name)
    t0 = time.perf_counter()
    deploy(new, wait=wait, timeout_s=timeout_s)
    uc = user_config_of(new, app_name) or {}
    if wait and uc.get("background_swap"):
        # Serve is done once reconfigure() returned; with background swaps the load may still be running.
        wait_for_release(str(uc["release_id"]), app_name=app_name, timeout_s=timeout_s)
    log.info("rolled %s to %s in %.2fs", app_name, new_user_config.get("release_id"), time.perf_counter() - t0)
    return new


def wait_for_release(
    release_id: str, *, app_name: str = APP_NAME, timeout_s: float = 120.0, poll_s: float = 0.05
) -> dict[str, Any]:
    """Block until the replicas have settled on ``release_id``: serving it, or having given up on it (its load
    failed; the previous release serves and reports the error). Asks replicas through a deployment handle
    until 3 answers per replica in a row agree (the router picks replicas; a single replica is certain).
    Returns the last answer."""
    details = _client().get_serve_details()
    dep = (((details.get("applications") or {}).get(app_name) or {}).get("deployments") or {}).get(DEPLOYMENT_NAME)
    replicas = int((dep or {}).get("target_num_replicas") or 1)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
    deadline = time.monotonic() + timeout_s
    agree = 0
    info: dict[str, Any] = {}
    while agree < 3 * replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not settled on {release_id} after {timeout_s}s: {info}")
        info = handle.release_info.remote().result(timeout_s=timeout_s)
        settled = info.get("loading") is None and (
            info.get("release_id") == release_id
            or (info.get("last_reconfigure_target") == release_id and info.get("last_reconfigure_failed"))
        )
        agree = agree + 1 if settled else 0
        if not settled:
            time.sleep(poll_s)
    return info


def wait_for_rollout(config: Mapping[str, Any], *, timeout_s: float = 120.0, poll_s: float = 0.1) -> None:
    """Block until every deployment of ``config`` runs it: the controller's deployment target carries the
    config's user_config (so the update has been picked up, not just submitted), the deployment is HEALTHY,
    and all its replicas are RUNNING (an in-place update moves each through UPDATING)."""
    deadline = time.monotonic() + timeout_s
    client = _client()
    last = ""
    while True:
        details = client.get_serve_details()
        apps = details.get("applications") or {}
        pending: list[str] = []
        for app_cfg in config.get("applications", []):
            a = apps.get(app_cfg["name"])
            if a is None:
                pending.append(f"{app_cfg['name']}: not listed")
                continue
            if a.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"application {app_cfg['name']} failed to deploy: {a.get('message')}")
            if a.get("status") != "RUNNING":
                pending.append(f"{app_cfg['name']}: {a.get('status')}")
            deps = a.get("deployments") or {}
            for dep_cfg in app_cfg.get("deployments", []):
                d = deps.get(dep_cfg["name"])
                if d is None:
                    pending.append(f"{dep_cfg['name']}: not listed")
                    continue
                target_uc = (d.get("deployment_config") or {}).get("user_config")
                replicas = d.get("replicas") or []
                if "user_config" in dep_cfg and target_uc != dep_cfg["user_config"]:
                    pending.append(f"{dep_cfg['name']}: update not picked up")
                elif d.get("status") != "HEALTHY":
                    pending.append(f"{dep_cfg['name']}: {d.get('status')}")
                elif len(replicas) != d.get("target_num_replicas") or any(
                    r.get("state") != "RUNNING" for r in replicas
                ):
                    pending.append(f"{dep_cfg['name']}: replicas {[r.get('state') for r in replicas]}")
        if not pending:
            return
        last = "; ".join(pending)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout not done after {timeout_s}s: {last}")
        time.sleep(poll_s)


def deployed_user_config(app_name: str = APP_NAME) -> dict[str, Any] | None:
    """The recommender's user_config as deployed (the controller's view), or None."""
    cfg = current_config()
    return user_config_of(cfg, app_name) if cfg else None


def shutdown() -> None:
    """Shut Serve down (the local Ray stays up)."""
    serve.shutdown()
