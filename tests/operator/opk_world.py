"""The world around the operator in acceptance tests: the emulated cluster, the embedded PostgreSQL registry,
KubeRay played by the test (patching RayJob status), and a stand-in for the workloads that writes the
registry as they do (a run row, an evidence snapshot, a candidate release with its gates).

Time is simulated: tests run under looptime, and the operator's clock, the emulated apiserver's timestamps
and the stand-in's timestamps all read `World.now()`, which follows the event loop's (fast-forwarded) time.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import pathlib
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import psycopg
import yaml
from psycopg import sql

from k8s.emulator import EmulatedCluster
from k8s.kopf_runner import fast_settings, run_kopf
from recupdate_operator.api import ANNOTATION_APPROVE, ANNOTATION_ROLLBACK, API_VERSION, GROUP, KIND, PLURAL, VERSION
from recupdate_operator.handlers import Controller, ControllerConfig, register

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "manifests" / "crd" / "recommenderupdatepolicies.recupdate.io.yaml"
NS = "default"
SECRET = "store"
PASSED = {
    "passed": True,
    "exactMatch": {"passed": True, "value": 0.96, "threshold": 0.9},
    "recall": {"passed": True, "value": 0.05, "threshold": 0.015},
}
FAILED_GATES = {
    "passed": False,
    "exactMatch": {"passed": True, "value": 0.96, "threshold": 0.9},
    "recall": {"passed": False, "value": 0.004, "threshold": 0.015},
}


def fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class World:
    def __init__(self, cluster: EmulatedCluster, dsn: str, schema: str, base: datetime) -> None:
        self.cluster = cluster
        self.dsn = dsn
        self.schema = schema
        self.base = base
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.conn = psycopg.connect(dsn, autocommit=True)

    def now(self) -> datetime:
        return self.base + timedelta(seconds=self.loop.time() - self.t0)

    def close(self) -> None:
        self.conn.close()

    # -- the operator ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def operator(self, peering: tuple[str, int] | None = None, **config: Any) -> AsyncIterator[Controller]:
        """Run the operator (kopf + Controller) until the block exits; peering=(name, priority) for HA."""
        api_client = self.cluster.kubernetes_client()
        cfg = ControllerConfig(**{"resync_seconds": 3600.0, "workers": 4, **config})
        controller = Controller(api_client=api_client, clock=self.now, config=cfg)
        registry = register(kopf.OperatorRegistry(), controller, peering=peering is not None)
        settings = fast_settings()
        if peering is not None:
            settings.peering.name, settings.peering.priority = peering
            settings.peering.mandatory = True
        # A real apiserver sends a bookmark about every minute; the emulator does not, and kopf would reconnect
        # every watch after 70 s of silence: thousands of times over simulated days.
        settings.watching.inactivity_timeout = 365 * 86400.0
        try:
            async with run_kopf(self.cluster, registry=registry, settings=settings, standalone=peering is None):
                yield controller
        finally:
            await asyncio.to_thread(api_client.close)

    # -- objects --------------------------------------------------------------------------------------------

    def spec(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "store": {"secretRef": {"name": SECRET, "key": "dsn"}, "schema": self.schema},
            "fineTune": {"schedule": "0 3 * * 1"},
            "retrieval": {"refreshInterval": "1d", "maxStaleness": "2d"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        return spec

    async def create_secret(self, dsn: str | None = None) -> None:
        await self.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": NS},
                "stringData": {"dsn": dsn or self.dsn},
            }
        )

    async def create_policy(self, name: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.cluster.create(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": name, "namespace": NS},
                "spec": spec or self.spec(),
            }
        )

    async def patch_policy(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.cluster.patch(API_VERSION, KIND, name, dict(patch), namespace=NS)

    async def annotate(self, name: str, approve: str | None = None, rollback: str | None = None) -> None:
        ann = {}
        if approve:
            ann[ANNOTATION_APPROVE] = approve
        if rollback:
            ann[ANNOTATION_ROLLBACK] = rollback
        await self.patch_policy(name, {"metadata": {"annotations": ann}})

    def policy(self, name: str) -> dict[str, Any]:
        return self.cluster.get(GROUP, VERSION, PLURAL, NS, name) or {}

    def status(self, name: str) -> dict[str, Any]:
        return self.policy(name).get("status") or {}

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c.get("type") == ctype), {})

    def jobs(self) -> list[dict[str, Any]]:
        return sorted(self.cluster.objects("ray.io", "v1", "rayjobs", NS), key=lambda j: j["metadata"]["name"])

    def job_names(self) -> list[str]:
        return [j["metadata"]["name"] for j in self.jobs()]

    def rayservice(self) -> dict[str, Any] | None:
        services = self.cluster.objects("ray.io", "v1", "rayservices", NS)
        return services[0] if services else None

    def served_user_config(self) -> dict[str, Any] | None:
        svc = self.rayservice()
        if svc is None:
            return None
        config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        return dict(config["applications"][0]["deployments"][0]["user_config"])

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        events = sorted(self.cluster.events(NS), key=lambda e: e["metadata"].get("creationTimestamp") or "")
        return [e for e in events if reason is None or e.get("reason") == reason]

    async def wait_events(self, *reasons: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until an Event of every reason given has been posted (kopf posts them asynchronously)."""
        await self.wait(lambda: set(reasons) <= {e.get("reason") for e in self.events()}, timeout)
        return self.events()

    async def wait(self, predicate: Callable[[], Any], timeout: float = 300.0) -> Any:
        """Wait (in loop time) until predicate() is truthy, re-checking on every change (and every 5 minutes)."""
        return await self.cluster.wait_for(predicate, timeout=timeout, poll=300.0)

    async def wait_jobs(self, n: int, timeout: float = 300.0) -> list[dict[str, Any]]:
        await self.wait(lambda: len(self.jobs()) >= n, timeout)
        return self.jobs()

    async def wait_condition(
        self, name: str, ctype: str, status: str, reason: str | None = None, timeout: float = 300.0
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, ctype)
            return c if c.get("status") == status and (reason is None or c.get("reason") == reason) else None

        return await self.wait(check, timeout)  # type: ignore[no-any-return]

    # -- KubeRay and the workloads, played by the test ------------------------------------------------------

    def _sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(sql.SQL(query).format(s=sql.Identifier(self.schema)), args)
        return cur.fetchall() if cur.description else []

    async def register(
        self,
        run_id: str,
        *,
        gates: Mapping[str, Any] | None = None,
        status: str = "succeeded",
        evidence_at: datetime | None = None,
        release: bool = True,
    ) -> None:
        """What a workload writes before it exits 0: its run, an evidence snapshot and a candidate release."""
        now = self.now()
        end = int((evidence_at or now).timestamp())

        def write() -> None:
            with self.conn.transaction():
                self._sql(
                    "INSERT INTO {s}.runs (run_id, kind, status, started_at, finished_at) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at",
                    run_id, "finetune" if "-ft-" in run_id else "refresh", status, now, now,
                )  # fmt: skip
                if not release:
                    return
                snap = self._sql(
                    "INSERT INTO {s}.snapshots (window_start, window_end, scoring, top_r, min_support, state)"
                    " VALUES (%s, %s, 'frequency', 1, 5, 'retired') RETURNING snapshot_id",
                    end - 86400 * 30, end,
                )[0][0]  # fmt: skip
                version = self._sql(
                    "INSERT INTO {s}.transition_tables (snapshot_id, adapter_uri, pairs, state)"
                    " VALUES (%s, %s, 100, 'published') RETURNING table_version",
                    snap, f"file:///adapters/{run_id}",
                )[0][0]  # fmt: skip
                self._sql(
                    "INSERT INTO {s}.releases (release_id, base_model, adapter_uri, snapshot_id, table_version,"
                    " prompt_hash, metrics, gates, state, created_at, run_id)"
                    " VALUES (%s, 'tiny', %s, %s, %s, 'h', %s, %s, 'candidate', %s, %s)",
                    run_id, f"file:///adapters/{run_id}", snap, version, json.dumps({"recall@5": 0.05}),
                    json.dumps(dict(gates or PASSED)), now, run_id,
                )  # fmt: skip

        await asyncio.to_thread(write)

    async def set_job(self, name: str, deployment: str, job_status: str, message: str = "") -> None:
        status: dict[str, Any] = {"jobDeploymentStatus": deployment, "jobStatus": job_status}
        if deployment in ("Complete", "Failed"):
            status["endTime"] = fmt(self.now())
        else:
            status["startTime"] = fmt(self.now())
        if message:
            status["message"] = message
        await self.cluster.patch_status("ray.io/v1", "RayJob", name, status, namespace=NS)

    async def succeed(self, name: str, *, gates: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """The workload registers its candidate and exits 0; KubeRay reports Complete/SUCCEEDED."""
        await self.set_job(name, "Running", "RUNNING")
        await self.register(name, gates=gates, **kw)
        await self.set_job(name, "Complete", "SUCCEEDED")

    async def fail(self, name: str, message: str = "Traceback: CUDA out of memory") -> None:
        """The Ray job fails (KubeRay: jobDeploymentStatus Complete, jobStatus FAILED)."""
        await self.set_job(name, "Running", "RUNNING")
        await self.set_job(name, "Complete", "FAILED", message)

    def releases(self) -> dict[str, str]:
        return dict(self._sql("SELECT release_id, state FROM {s}.releases ORDER BY created_at"))  # type: ignore[arg-type]

    def runs(self) -> dict[str, str]:
        return dict(self._sql("SELECT run_id, status FROM {s}.runs ORDER BY started_at"))  # type: ignore[arg-type]


def crd() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(CRD_PATH.read_text()))
