"""The controller's settings and constants, and how it reaches the Kubernetes API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ..api import (
    GROUP,
    SecretKeyRef,
)

log = logging.getLogger("recupdate.operator")


#: kopf's own annotations (progress, diff base, finalizer name). Not "recupdate.io": kopf ignores every
#: annotation under its storage prefix when it diffs an object, which would hide recupdate.io/approve and
#: recupdate.io/rollback-to.
KOPF_PREFIX = f"kopf.{GROUP}"
JOBS_INDEX = "recupdate_rayjobs"
SERVICES_INDEX = "recupdate_rayservices"
MIN_DELAY = 1.0  # never reconcile one policy in a tight loop, whatever wake_at says
AGE_MESSAGE_REFRESH_SECONDS = 3600.0  # how often a status write just to update an age in a message is worth it
REQUEST_TIMEOUT = (5, 30)

Key = tuple[str, str]  # (namespace, name)


@dataclass
class ControllerConfig:
    resync_seconds: float = 900.0  # reconcile every policy at least this often
    workers: int = 8  # reconciles in parallel (threads)
    backoff_min_seconds: float = 5.0  # first retry after a failed reconcile
    backoff_max_seconds: float = 300.0
    serve_grace_seconds: float = 60.0  # a RayService rolled this recently may not be in the index yet
    default_store_secret: SecretKeyRef | None = None  # jobs' DSN Secret for policies without secretRef
    default_dsn: str | None = None  # the operator's own DSN for policies without secretRef
    # Testing and benchmarks: the controller's clock runs this many times faster than real time (schedules,
    # resync, backoff and grace periods shrink alike). kopf's own timing is not scaled.
    time_scale: float = 1.0
    # On shutdown, wait this long (real seconds) for reconciles in flight: one cut off mid-way could leave a
    # registry transaction open, and a thread left running would outlive the operator's connections.
    shutdown_grace_seconds: float = 30.0


def _scaled_clock(scale: float) -> Callable[[], datetime]:
    if scale == 1.0:
        return lambda: datetime.now(UTC)
    start, t0 = datetime.now(UTC), time.monotonic()
    return lambda: start + timedelta(seconds=(time.monotonic() - t0) * scale)


def kube_api_client() -> Any:
    """A kubernetes ApiClient: in-cluster config, else $KUBECONFIG (read now, not at import time)."""
    try:
        k8s_config.load_incluster_config()
        return k8s_client.ApiClient()
    except k8s_config.ConfigException:
        configuration = k8s_client.Configuration()
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
        return k8s_client.ApiClient(configuration)
