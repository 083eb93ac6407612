"""One set of backend contract cases, run against both backends: KubeRay (on the emulated API) and local."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from recupdate_operator.api import PolicySpec, RunKind
from recupdate_operator.backends.base import Backend, PolicyRef
from recupdate_operator.backends.kuberay import KubeRayBackend
from recupdate_operator.backends.local import LocalBackend
from recupdate_operator.planner import LaunchRun

POLICY = PolicyRef("p", "default", "uid-1", PolicySpec.model_validate({"serving": {"replicas": 1}}), 3)


def _launch(run_id: str) -> LaunchRun:
    return LaunchRun(RunKind.REFRESH, run_id, run_id, {"runId": run_id}, 3, datetime(2026, 1, 1, tzinfo=UTC))


def _uc(release: str) -> dict[str, Any]:
    return {"release_id": release, "adapter_uri": None, "table_version": 1, "store_schema": "p"}


def contract(backend: Backend, finish: Callable[[str, bool], None]) -> None:
    """The cases every backend must pass. `finish(job, ok)` makes a job end (KubeRay's or the job's own doing)."""
    assert isinstance(backend, Backend)
    # launching is idempotent under the deterministic name
    assert backend.launch_run(POLICY, _launch("p-rf-1")) == "p-rf-1"
    backend.launch_run(POLICY, _launch("p-rf-1"))
    backend.launch_run(POLICY, _launch("p-rf-2"))
    jobs = {j.name: j for j in backend.observe_jobs(POLICY)}
    assert set(jobs) == {"p-rf-1", "p-rf-2"}
    assert jobs["p-rf-1"].kind == RunKind.REFRESH and jobs["p-rf-1"].run_id == "p-rf-1"
    assert jobs["p-rf-1"].generation == 3
    finish("p-rf-1", True)
    finish("p-rf-2", False)
    jobs = {j.name: j for j in backend.observe_jobs(POLICY)}
    assert jobs["p-rf-1"].terminal and jobs["p-rf-1"].job_status == "SUCCEEDED"
    assert jobs["p-rf-2"].terminal and jobs["p-rf-2"].job_status != "SUCCEEDED"
    backend.delete_job(POLICY, "p-rf-2")
    backend.delete_job(POLICY, "p-rf-2")  # already gone: fine
    assert {j.name for j in backend.observe_jobs(POLICY)} == {"p-rf-1"}
    # serving: none, then created by a roll, then switched by changing only user_config
    assert backend.serving_status(POLICY) is None
    backend.roll_serving(POLICY, _uc("r1"))
    assert backend.serving_status(POLICY).release_id == "r1"  # type: ignore[union-attr]
    backend.roll_serving(POLICY, _uc("r2"))
    assert backend.serving_status(POLICY).release_id == "r2"  # type: ignore[union-attr]
    backend.stop_serving(POLICY)
    assert backend.serving_status(POLICY) is None


def test_local_backend_contract(tmp_path: Path) -> None:
    outcome: dict[str, bool] = {}

    def command(launch: LaunchRun, config: Path) -> list[str]:
        # A job program that waits for the test to say how it ends (a file), like a real run would take time.
        flag = tmp_path / launch.run_id
        return [
            sys.executable,
            "-c",
            f"import os,sys,time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)\n"
            f"sys.exit(0 if open({str(flag)!r}).read() == 'ok' else 3)",
        ]

    def finish(name: str, ok: bool) -> None:
        outcome[name] = ok
        (tmp_path / name).write_text("ok" if ok else "fail")
        deadline = time.monotonic() + 30
        job = backend.jobs[name]
        while job.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    # Runs the registry knows nothing of: a DSN is needed only for runs of earlier sessions.
    backend = LocalBackend("postgresql:///nonexistent?host=/nonexistent", tmp_path, command=command, serve=False)
    backend._stored_runs = lambda policy: []  # type: ignore[method-assign]  # no store in this contract test
    contract(backend, finish)


async def test_kuberay_backend_contract(k8s_cluster: Any) -> None:
    client = await asyncio.to_thread(k8s_cluster.kubernetes_client)
    backend = KubeRayBackend(client)

    def finish(name: str, ok: bool) -> None:
        status = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED" if ok else "FAILED"}
        asyncio.run_coroutine_threadsafe(
            k8s_cluster.patch_status("ray.io/v1", "RayJob", name, status, namespace="default"), loop
        ).result(10)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(contract, backend, finish)


@pytest.mark.parametrize("fail", [(), ("p-rf-1",)])
def test_local_backend_fault_injection_only_touches_named_runs(tmp_path: Path, fail: tuple[str, ...]) -> None:
    seen: dict[str, str] = {}

    def command(launch: LaunchRun, config: Path) -> list[str]:
        seen[launch.run_id] = config.read_text()
        return [sys.executable, "-c", "pass"]

    backend = LocalBackend("postgresql:///x", tmp_path, command=command, serve=False, fail_runs=fail)
    backend._stored_runs = lambda policy: []  # type: ignore[method-assign]
    backend.launch_run(POLICY, _launch("p-rf-1"))
    backend.launch_run(POLICY, _launch("p-rf-2"))
    assert ("1.01" in seen["p-rf-1"]) == bool(fail)
    assert "1.01" not in seen["p-rf-2"]
