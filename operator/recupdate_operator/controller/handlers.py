"""kopf registration only: each decorator hands its event to the Controller (see the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from ..api import (
    GROUP,
    LABEL_POLICY,
    PLURAL,
    VERSION,
)
from ..backends.kuberay import RAY_GROUP, RAY_VERSION, RAYJOBS, RAYSERVICES, observed_job, owner_key
from ..backends.kuberay import serving_status_of as _serving_status_of
from .config import JOBS_INDEX, KOPF_PREFIX, SERVICES_INDEX, Key
from .reconcile import Controller

log = logging.getLogger("recupdate.operator")


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """recupdate's kopf settings: persistence under our own prefix, Events only for warnings."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    # Our decisions are posted as Events explicitly (events.post); kopf's own log lines only when they warn.
    settings.posting.level = logging.WARNING


def _index_value(body: Mapping[str, Any], value: Any) -> dict[Key, Any] | None:
    key = owner_key(body)
    return {key: value} if key is not None and value is not None else None


def register(
    registry: kopf.OperatorRegistry, controller: Controller, *, peering: bool = False
) -> kopf.OperatorRegistry:
    """Register the operator's handlers for `controller` on `registry` (a fresh one per operator or test).

    peering=True (several operators, kopf peering): policies are reconciled only while kopf runs a daemon for
    them. kopf delivers its pause (a peer with a higher priority is active) to daemons only, and a daemon
    makes kopf put its finalizer (kopf.recupdate.io/finalizer) on each policy, so standalone operators, the
    default, have no daemon and no finalizer.
    """
    jobs_filter = {LABEL_POLICY: kopf.PRESENT}
    controller.gated = peering

    @kopf.on.startup(registry=registry, id="recupdate_startup")
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)
        await controller.start()

    @kopf.on.cleanup(registry=registry, id="recupdate_cleanup")
    async def cleanup(**_: Any) -> None:
        await controller.stop()

    @kopf.index(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=jobs_filter, registry=registry, id=JOBS_INDEX)
    def jobs_index(body: kopf.Body, **_: Any) -> dict[Key, Any] | None:
        return _index_value(body, observed_job(body))

    @kopf.index(RAY_GROUP, RAY_VERSION, RAYSERVICES, labels=jobs_filter, registry=registry, id=SERVICES_INDEX)
    def services_index(body: kopf.Body, **_: Any) -> dict[Key, Any] | None:
        return _index_value(body, _serving_status_of(body))

    # rbac: recupdate.io recommenderupdatepolicies list
    # rbac: recupdate.io recommenderupdatepolicies watch
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="recupdate_policy")
    async def policy_event(type: str | None, body: kopf.Body, **kwargs: Any) -> None:
        controller.attach(kwargs.get(JOBS_INDEX), kwargs.get(SERVICES_INDEX))
        controller.on_policy(type, body)

    # rbac: ray.io rayjobs list
    # rbac: ray.io rayjobs watch
    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=jobs_filter, registry=registry, id="recupdate_rayjob")
    async def rayjob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_job(type, body)

    # rbac: ray.io rayservices list
    # rbac: ray.io rayservices watch
    @kopf.on.event(
        RAY_GROUP, RAY_VERSION, RAYSERVICES, labels=jobs_filter, registry=registry, id="recupdate_rayservice"
    )
    async def rayservice_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_service(type, body)

    if peering:

        @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="recupdate_lease", cancellation_timeout=60.0)
        async def lease(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
            key = (namespace or "", name)
            controller.activate(key)
            try:
                await stopped.wait()
            finally:
                await controller.deactivate(key)

    @kopf.on.probe(registry=registry, id="policies")
    def probe(**_: Any) -> int:
        if controller._scheduler_task is not None and not controller.alive:
            raise RuntimeError("the reconcile scheduler has stopped")
        return len(controller._entries)

    return registry
