"""Run real kopf inside pytest's event loop against an emulated cluster.

``kopf.operator()``/``kopf.run()`` would cancel pytest's own tasks at exit; this uses
``kopf.spawn_tasks`` + ``kopf.run_tasks(ignored=...)`` as docs/architecture.md describes::

    registry = kopf.OperatorRegistry()

    @kopf.on.create("recupdate.io", "v1alpha1", "recommenderupdatepolicies", registry=registry)
    def created(patch, **_):
        patch.status["seen"] = True

    async with run_kopf(cluster, registry=registry):
        await wait_for(lambda: (cluster.get(...) or {}).get("status"))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import kopf

from .emulator import EmulatedCluster


def fast_settings() -> kopf.OperatorSettings:
    """Kopf settings that suit tests: short idle/exit timeouts of the per-object workers."""
    settings = kopf.OperatorSettings()
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 1.0
    settings.watching.reconnect_backoff = 0.1
    settings.networking.request_timeout = 10
    return settings


@contextlib.asynccontextmanager
async def run_kopf(
    cluster: EmulatedCluster,
    *,
    registry: kopf.OperatorRegistry,
    namespaces: Iterable[str] = ("default",),
    clusterwide: bool = False,
    settings: kopf.OperatorSettings | None = None,
    memo: Any = None,
    standalone: bool = True,
    login: bool = True,
    startup_timeout: float = 10.0,
    stop_timeout: float = 10.0,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run kopf with ``registry`` until the block exits; yields the task that runs it.

    ``login=True`` adds an ``@kopf.on.login`` handler for the cluster to the registry.
    """
    if login:

        @kopf.on.login(registry=registry)
        async def _login(**_: Any) -> kopf.ConnectionInfo:
            return cluster.connection_info()

    stop_flag = asyncio.Event()
    ready_flag = asyncio.Event()
    existing = set(asyncio.all_tasks())
    tasks = await kopf.spawn_tasks(
        registry=registry,
        settings=settings or fast_settings(),
        standalone=standalone,
        clusterwide=clusterwide,
        namespaces=() if clusterwide else list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=memo,
    )
    runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=existing), name="kopf-under-test")
    try:
        ready_or_dead = asyncio.create_task(ready_flag.wait())
        done, _ = await asyncio.wait(
            {ready_or_dead, runner}, timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if runner in done:
            ready_or_dead.cancel()
            runner.result()  # re-raise the startup failure
            raise RuntimeError("kopf exited during startup")
        if not done:
            ready_or_dead.cancel()
            raise TimeoutError(f"kopf did not become ready in {startup_timeout} s")
        yield runner
    finally:
        stop_flag.set()
        try:
            await asyncio.wait_for(runner, stop_timeout)
        except TimeoutError:
            logging.getLogger(__name__).warning("kopf did not stop in %s s; cancelling", stop_timeout)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
