"""Local backend: the same interface as the KubeRay backend, on one machine.

Jobs are the same workload entrypoints KubeRay would run (`python -m recupdate_workloads.<kind> --config ...
--run-id ...`), as subprocesses attached to the local Ray cluster (RAY_ADDRESS), against the embedded
PostgreSQL store. Serving is a local Ray Serve application deployed through Serve's deploy path, with the
same Serve config the operator puts into a RayService (base.serve_config), so a roll is a reconfigure.

The DSN reaches jobs through their process environment and Serve replicas through a private file
(``<workdir>/secrets/store-dsn``, 0600, named by RECUPDATE_STORE_DSN_FILE): Ray logs a deployment's
runtime_env, so the DSN itself is never put there.

The store is the source of truth for finished runs: a restarted `recupdate local` observes earlier runs from
the registry (a run still marked running whose process is gone is reported failed), so it never repeats one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from recupdate_workloads.contract import entrypoints
from recupdate_workloads.contract.env import DSN_ENV
from recupdate_workloads.contract.secret_file import file_env, remove, write_private

from ..api import RunKind
from ..planner import LaunchRun, ObservedJob
from .base import BackendError, PolicyRef, ServingStatus, serve_config

LOCAL_REPLICA_CPUS = 0.25  # leave the cores to training and refresh jobs on a small machine


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the job's whole process group (its pid: the job leads its own session), not just its leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(proc.pid, sig)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float, signaled: bool = False) -> None:
    """SIGTERM the job's process group, SIGKILL what is left of it after `timeout`, and reap the job, so that
    processes the job started in its group go too. A job reaped earlier is left alone: its group id may
    belong to someone else by now (an unreaped job, even one that exited, still holds it)."""
    if proc.returncode is not None:
        return
    if not signaled:
        _signal_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


@dataclass
class _Job:
    name: str
    kind: RunKind
    run_id: str
    generation: int
    proc: subprocess.Popen[bytes]
    started: datetime
    ended: datetime | None = None
    log: Path | None = None
    degraded: bool = False


class LocalBackend:
    """Runs jobs as local subprocesses and serves through a local Ray Serve. `clock` gives job start/end times
    (the simulated clock in accelerated runs); `env` is added to every job's environment."""

    def __init__(
        self,
        dsn: str,
        workdir: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int = 8000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        serve: bool = True,
        command: Callable[[LaunchRun, Path], list[str]] | None = None,
        fail_runs: tuple[str, ...] = (),
        worse_runs: tuple[str, ...] = (),
        stop_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.workdir = Path(workdir)
        self.env = dict(env or {})
        self.port = port
        self.clock = clock
        self.serve = serve
        self.jobs: dict[str, _Job] = {}
        self.command = command or self._entrypoint
        # Fault injection for chaos tests and demos: runs whose id contains one of these get unpassable gates,
        # so the controller must reject their release and keep serving the last good one.
        self.fail_runs = fail_runs
        # ...and runs whose id contains one of these pass their gates but publish a table whose clusters are
        # shuffled: worse on live events, for the analysis (gates.analysis) to catch.
        self.worse_runs = worse_runs
        self.stop_timeout = stop_timeout  # seconds a stopped job gets to exit on SIGTERM before SIGKILL
        self._served: dict[str, Any] | None = None

    # -- jobs ----------------------------------------------------------------------------------------------

    def launch_run(self, policy: PolicyRef, launch: LaunchRun) -> str:
        if launch.job_name in self.jobs or self._stored_run(policy, launch.run_id) is not None:
            return launch.job_name
        jobs_dir = self.workdir / "jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True)
        cfg = jobs_dir / f"{launch.job_name}.json"
        config = dict(launch.config)
        if any(f in launch.run_id for f in self.fail_runs):
            config["gates"] = {**(config.get("gates") or {}), "minExactMatch": 1.01}
        cfg.write_text(json.dumps(config, indent=2, default=str))
        log = jobs_dir / f"{launch.job_name}.log"
        cmd = self.command(launch, cfg)
        env = {**os.environ, **self.env, DSN_ENV: self.dsn}
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.jobs[launch.job_name] = _Job(launch.job_name, launch.kind, launch.run_id, launch.generation, proc,
                                          self.clock(), log=log)  # fmt: skip
        return launch.job_name

    @staticmethod
    def _entrypoint(launch: LaunchRun, config: Path) -> list[str]:
        """The same command a KubeRay RayJob runs (contract.entrypoints), with this Python."""
        return entrypoints.command(launch.kind.value, str(config), launch.run_id, python=sys.executable)

    def delete_job(self, policy: PolicyRef, name: str) -> None:
        job = self.jobs.pop(name, None)
        if job is not None:
            _stop_group(job.proc, timeout=self.stop_timeout)

    def running(self) -> bool:
        return any(j.proc.poll() is None for j in self.jobs.values())

    def shutdown(self, timeout: float | None = None) -> list[str]:
        """Stop every job this backend started that still runs, with all its processes; returns their names.

        Jobs run in their own session (start_new_session), so a terminal's Ctrl-C reaches only `recupdate local`:
        without this they would outlive it, reparented to PID 1. Their runs stay 'running' in the store, and a
        later session reports them failed ("interrupted: its process is gone") and retries them.
        """
        live = [j for j in self.jobs.values() if j.proc.poll() is None]
        for job in live:  # signal all first, then wait: the timeout is shared, not per job
            _signal_group(job.proc, signal.SIGTERM)
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        for job in live:
            _stop_group(job.proc, timeout=max(0.0, deadline - time.monotonic()), signaled=True)
        return [j.name for j in live]

    def observe_jobs(self, policy: PolicyRef) -> list[ObservedJob]:
        out: dict[str, ObservedJob] = {}
        for run_id, kind, status, started, finished, error in self._stored_runs(policy):
            if run_id in self.jobs:
                continue
            # From an earlier session: the store says how it ended; a run left 'running' has no process now.
            dep, js = ("Complete", "SUCCEEDED") if status == "succeeded" else ("Failed", "FAILED")
            msg = error or ("interrupted: its process is gone" if status == "running" else "")
            out[run_id] = ObservedJob(run_id, RunKind(kind), run_id, policy.generation, dep, js, started,
                                      finished or started, msg, "" if status == "succeeded" else "JobFailed")  # fmt: skip
        for job in self.jobs.values():
            rc = job.proc.poll()
            if rc is None:
                dep, js = "Running", "RUNNING"
            else:
                job.ended = job.ended or self.clock()
                dep, js = ("Complete", "SUCCEEDED") if rc == 0 else ("Complete", "FAILED")
                if rc == 0 and not job.degraded and any(f in job.run_id for f in self.worse_runs):
                    self._degrade(policy, job.run_id)
                    job.degraded = True
            msg = "" if rc in (None, 0) else f"exit code {rc}; log {job.log}"
            out[job.name] = ObservedJob(job.name, job.kind, job.run_id, job.generation, dep, js, job.started,
                                        job.ended, msg)  # fmt: skip
        return list(out.values())

    def _degrade(self, policy: PolicyRef, run_id: str) -> None:
        """Chaos (worse_runs): map every cluster of the run's transition table through a fixed permutation."""
        import random

        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
                row = conn.execute(
                    sql.SQL("SELECT table_version FROM {} WHERE run_id = %s ORDER BY created_at DESC LIMIT 1").format(
                        sql.Identifier(policy.schema, "releases")
                    ),
                    (run_id,),
                ).fetchone()
                if row is None or row[0] is None:
                    return
                n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(policy.schema, "clusters")))
                count = int(n.fetchone()[0])  # type: ignore[index]
                perm = list(range(count))
                random.Random(run_id).shuffle(perm)
                conn.execute(
                    sql.SQL("UPDATE {} SET cluster = (%s::int[])[cluster + 1]").format(
                        sql.Identifier(policy.schema, f"transitions_v{int(row[0])}")
                    ),
                    (perm,),
                )
        except psycopg.Error as exc:
            raise BackendError(f"cannot degrade the table of {run_id}: {type(exc).__name__}") from None

    def _stored_runs(self, policy: PolicyRef) -> list[tuple[Any, ...]]:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                q = sql.SQL("SELECT run_id, kind, status, started_at, finished_at, error FROM {}").format(
                    sql.Identifier(policy.schema, "runs")
                )
                return [r for r in conn.execute(q).fetchall() if r[1] in ("finetune", "refresh")]
        except psycopg.errors.UndefinedTable:
            return []
        except psycopg.Error as exc:
            raise BackendError(f"cannot read runs: {type(exc).__name__}") from None

    def _stored_run(self, policy: PolicyRef, run_id: str) -> tuple[Any, ...] | None:
        return next((r for r in self._stored_runs(policy) if r[0] == run_id), None)

    # -- serving -------------------------------------------------------------------------------------------

    @property
    def dsn_file(self) -> Path:
        return self.workdir / "secrets" / "store-dsn"

    def _config(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> dict[str, Any]:
        cfg = serve_config(policy.spec, user_config)
        dsn_file = str(write_private(self.dsn_file, self.dsn))
        for app in cfg["applications"]:
            env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env_vars.pop(DSN_ENV, None)  # Ray would log it (runtime_env_agent.log); replicas read the file
            env_vars[file_env(DSN_ENV)] = dsn_file
            for dep in app["deployments"]:
                dep["ray_actor_options"] = {"num_cpus": LOCAL_REPLICA_CPUS}
        return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": self.port}, **cfg}

    def ensure_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        if not self.serve:
            self._served = dict(user_config)
            return
        from recupdate_workloads.serving import deployment as serving  # local mode may import the workloads

        serving.deploy(self._config(policy, user_config))
        self._served = dict(user_config)

    def roll_serving(self, policy: PolicyRef, user_config: Mapping[str, Any]) -> None:
        # Deploying a config that differs only in user_config reconfigures live replicas (no serve.run).
        self.ensure_serving(policy, user_config)

    def stop_serving(self, policy: PolicyRef) -> None:
        if self.serve and self._served is not None:
            from ray import serve

            serve.delete(policy.spec.serving.application_name)
        self._served = None
        remove(self.dsn_file)

    def close(self) -> None:
        """Remove the DSN file (at the end of a local run; a later deploy writes it again)."""
        remove(self.dsn_file)

    def serving_status(self, policy: PolicyRef) -> ServingStatus | None:
        if self._served is None:
            return None
        return ServingStatus(policy.spec.serving.application_name, self._served.get("release_id"), self._served,
                             policy.generation, "Running", True)  # fmt: skip
