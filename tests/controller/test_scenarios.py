"""Acceptance scenarios: kopf runs the real handlers against the emulated API server and the embedded
PostgreSQL registry; the test plays KubeRay (RayJob status) and the workloads (registry rows).

Time is simulated with looptime (see opk_world): a day passes in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest
import yaml

from fixtures.operator_world import FAILED_GATES, World
from recupdate_operator import metrics

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(120)]
MakeWorld = Callable[..., Awaitable[World]]
DAY = 86400.0
FIRST = "recs-ft-203001080030"  # the initial fine-tune: named after the policy's creation minute
REFRESH_1 = "recs-rf-203001090000"  # the first daily refresh after a release exists


async def _first_release(w: World, name: str = "recs") -> str:
    """Create the policy, let its initial fine-tune succeed, wait until its release is served."""
    await w.create_policy(name)
    (job,) = await w.wait_jobs(1)
    job_name = job["metadata"]["name"]
    await w.succeed(job_name)
    await w.wait_condition(name, "Ready", "True", "Serving")
    return str(job_name)


async def test_policy_to_ready(make_world: MakeWorld) -> None:
    w = await make_world()
    succeeded = metrics.value("recupdate_runs_total", {"kind": "finetune", "result": "Succeeded"}) or 0.0
    async with w.operator():
        await w.create_policy("recs")
        (job,) = await w.wait_jobs(1)
        assert job["metadata"]["name"] == FIRST
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"], owner["blockOwnerDeletion"]) == (
            "RecommenderUpdatePolicy",
            "recs",
            True,
            True,
        )
        assert owner["uid"] == w.policy("recs")["metadata"]["uid"]
        assert job["metadata"]["labels"]["recupdate.io/kind"] == "finetune"
        assert "recupdate_workloads.jobs.finetune" in job["spec"]["entrypoint"]
        await w.wait_condition("recs", "FineTuning", "True", "Running")
        assert w.status("recs")["activeRuns"][0]["runId"] == FIRST

        await w.succeed(FIRST)
        await w.wait_condition("recs", "Ready", "True", "Serving")
        status = w.status("recs")
        assert (status["activeRelease"], status["servedRelease"]) == (FIRST, FIRST)
        assert status["lastFineTune"]["result"] == "Succeeded"
        assert status["activeRuns"] == []
        assert w.releases() == {FIRST: "active"}
        uc = w.served_user_config()
        assert uc == {
            "release_id": FIRST,
            "adapter_uri": f"file:///adapters/{FIRST}",
            "table_version": uc["table_version"] if uc else None,
            "store_schema": w.schema,
        }
        assert isinstance(uc["table_version"], int)
        svc = w.rayservice()
        assert svc is not None and svc["metadata"]["ownerReferences"][0]["name"] == "recs"
        assert w.condition("recs", "Fresh")["status"] == "True"
        assert w.condition("recs", "Degraded")["status"] == "False"
        assert w.condition("recs", "SpecValid")["status"] == "True"
        assert status["nextRefreshAt"] == "2030-01-09T00:00:00Z"
        assert status["nextFineTuneAt"] == "2030-01-14T03:00:00Z"
        await w.wait_events("Launched", "RunSucceeded", "Promoted", "ServeUpdated")
        assert metrics.value("recupdate_runs_total", {"kind": "finetune", "result": "Succeeded"}) == succeeded + 1
        assert (
            metrics.value("recupdate_active_release", {"namespace": "default", "policy": "recs", "release": FIRST}) == 1
        )
        staleness = metrics.value("recupdate_staleness_seconds", {"namespace": "default", "policy": "recs"})
        assert staleness is not None and 0 <= staleness < 3600


async def test_failed_job_keeps_serving_and_degrades(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        first = await _first_release(w)
        jobs = await w.wait_jobs(2, timeout=2 * DAY)  # the next daily refresh
        assert [j["metadata"]["name"] for j in jobs] == [first, REFRESH_1]
        assert "recupdate_workloads.jobs.refresh" in jobs[1]["spec"]["entrypoint"]
        await w.fail(REFRESH_1, "RuntimeError: evidence window is empty")

        degraded = await w.wait_condition("recs", "Degraded", "True", "RunFailed")
        assert REFRESH_1 in degraded["message"] and "evidence window is empty" in degraded["message"]
        assert w.condition("recs", "Ready")["status"] == "True"  # still serving the previous release
        status = w.status("recs")
        assert (status["activeRelease"], status["servedRelease"]) == (first, first)
        assert status["lastRefresh"]["result"] == "Failed" and status["failures"]["refresh"] == 1
        assert w.served_user_config()["release_id"] == first  # type: ignore[index]
        await w.wait(lambda: w.runs().get(REFRESH_1) == "failed")  # recorded by the operator for the workload
        events = await w.wait_events("RunFailed")
        assert any(e["type"] == "Warning" and REFRESH_1 in e["message"] for e in events if e["reason"] == "RunFailed")


async def test_failed_gates_reject_the_candidate(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        first = await _first_release(w)
        await w.wait_jobs(2, timeout=2 * DAY)
        await w.succeed(REFRESH_1, gates=FAILED_GATES)
        await w.wait(lambda: w.releases().get(REFRESH_1) == "rejected")
        events = await w.wait_events("GatesFailed")
        (gates_failed,) = [e for e in events if e["reason"] == "GatesFailed"]
        assert gates_failed["type"] == "Warning" and "recall (0.004 vs 0.015)" in gates_failed["message"]
        await w.wait(lambda: w.status("recs").get("lastRefresh", {}).get("result") == "Succeeded")
        assert w.releases() == {first: "active", REFRESH_1: "rejected"}
        status = w.status("recs")
        assert (status["activeRelease"], status["servedRelease"]) == (first, first)
        assert w.served_user_config()["release_id"] == first  # type: ignore[index]
        assert w.condition("recs", "Degraded")["status"] == "False"  # a rejected candidate is not a fault


@pytest.mark.parametrize("lose_status", [False, True], ids=["status-kept", "status-lost"])
async def test_restart_mid_run_creates_no_duplicate_job(make_world: MakeWorld, lose_status: bool) -> None:
    w = await make_world()
    async with w.operator():
        await w.create_policy("recs")
        await w.wait_jobs(1)
        await w.wait_condition("recs", "FineTuning", "True")
    await w.set_job(FIRST, "Running", "RUNNING")
    if lose_status:  # e.g. the operator died between creating the job and writing the status
        await w.cluster.patch_status(
            "recupdate.io/v1alpha1",
            "RecommenderUpdatePolicy",
            "recs",
            {"activeRuns": None, "lastFineTune": None, "fineTuneScheduledAt": None, "conditions": None},
        )
    await asyncio.sleep(600)  # the operator is down for 10 minutes

    async with w.operator() as controller:
        await w.wait(lambda: controller.reconciles >= 1)
        await w.wait_condition("recs", "FineTuning", "True", "Running")
        await asyncio.sleep(3600)
        assert w.job_names() == [FIRST]
        assert w.status("recs")["activeRuns"][0]["runId"] == FIRST
        if lose_status:
            await w.wait_events("RunAdopted")
        await w.succeed(FIRST)
        await w.wait_condition("recs", "Ready", "True", "Serving")
        assert w.job_names() == [FIRST]
        assert w.releases() == {FIRST: "active"}


async def test_suspend_and_resume(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        await w.create_policy("recs", w.spec(suspend=True))
        await w.wait_condition("recs", "FineTuning", "False", "Suspended")
        await asyncio.sleep(2 * DAY)
        assert w.jobs() == []
        assert "nextFineTuneAt" not in w.status("recs")
        await w.patch_policy("recs", {"spec": {"suspend": False}})
        (job,) = await w.wait_jobs(1)
        assert job["metadata"]["name"] == FIRST  # the initial fine-tune, still named after creation
        assert job["metadata"]["labels"]["recupdate.io/generation"] == "2"


async def test_manual_approval(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        await w.create_policy("recs", w.spec(gates={"promotion": "Manual"}))
        await w.wait_jobs(1)
        await w.succeed(FIRST)
        await w.wait(lambda: w.status("recs").get("candidateRelease") == FIRST)
        events = await w.wait_events("CandidateHeld")
        assert any("recupdate.io/approve=" + FIRST in e["message"] for e in events)
        assert w.releases() == {FIRST: "candidate"}
        assert w.rayservice() is None
        assert w.condition("recs", "Ready")["status"] == "False"

        await w.annotate("recs", approve=FIRST)
        await w.wait_condition("recs", "Ready", "True", "Serving")
        assert w.releases() == {FIRST: "active"}
        assert w.served_user_config()["release_id"] == FIRST  # type: ignore[index]
        status = w.status("recs")
        assert status["handledApproval"] == FIRST and "candidateRelease" not in status
        await w.wait_events("Promoted")


async def test_rollback_annotation(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        first = await _first_release(w)
        svc_before = w.rayservice()
        await w.wait_jobs(2, timeout=2 * DAY)
        await w.succeed(REFRESH_1)
        await w.wait(lambda: (w.served_user_config() or {}).get("release_id") == REFRESH_1)
        await w.wait(lambda: w.status("recs").get("activeRelease") == REFRESH_1)

        await w.annotate("recs", rollback=first)
        await w.wait(lambda: (w.served_user_config() or {}).get("release_id") == first)
        await w.wait(lambda: w.status("recs").get("activeRelease") == first)
        assert w.releases() == {first: "active", REFRESH_1: "retired"}
        assert w.status("recs")["handledRollback"] == first
        await w.wait_events("RolledBack")
        # Rolling changed nothing in the RayService but user_config inside serveConfigV2.
        svc_after = w.rayservice()
        assert svc_before is not None and svc_after is not None
        assert svc_after["spec"]["rayClusterConfig"] == svc_before["spec"]["rayClusterConfig"]
        assert svc_after["spec"]["serveConfigV2"] == svc_before["spec"]["serveConfigV2"]  # back to `first`
        await asyncio.sleep(DAY / 2)  # the rollback sticks: the newer candidate is not promoted again
        assert w.status("recs")["activeRelease"] == first


@pytest.mark.parametrize(
    ("fine_tune", "retrieval", "expected"),
    [
        ({"schedule": "61 3 * * *"}, {}, "invalid cron expression"),  # matches the CRD's pattern
        ({}, {"refreshInterval": "6h", "maxStaleness": "1h"}, "maxStaleness must be at least refreshInterval"),
    ],
    ids=["cron", "cel-rule"],
)
async def test_invalid_spec_is_reported_not_acted_on(
    make_world: MakeWorld, fine_tune: dict[str, str], retrieval: dict[str, str], expected: str
) -> None:
    w = await make_world()
    async with w.operator():
        # The emulated apiserver validates against the CRD's schema but not its CEL rules: both pass it.
        await w.create_policy("recs", w.spec(fineTune=fine_tune, retrieval=retrieval))
        cond = await w.wait_condition("recs", "SpecValid", "False", "InvalidSpec")
        assert expected in cond["message"]
        events = await w.wait_events("InvalidSpec")
        assert [e["type"] for e in events if e["reason"] == "InvalidSpec"] == ["Warning"]
        await asyncio.sleep(DAY)
        assert w.jobs() == []
        assert len([e for e in w.events() if e["reason"] == "InvalidSpec"]) == 1  # reported once, not per retry

        await w.patch_policy("recs", {"spec": w.spec()})
        await w.wait_condition("recs", "SpecValid", "True")
        await w.wait_jobs(1)


async def test_the_dsn_never_shows(make_world: MakeWorld, caplog: pytest.LogCaptureFixture) -> None:
    password = "S3cretPassw0rd"
    # A DSN libpq cannot parse: its error message quotes the whole DSN, password included.
    bad_dsn = f"postgresql://recupdate:{password}@[::1/recsys"
    caplog.set_level(logging.DEBUG)
    w = await make_world(secret=False)
    await w.create_secret(bad_dsn)
    async with w.operator():
        await w.create_policy("recs")
        cond = await w.wait_condition("recs", "Degraded", "True", "RegistryUnavailable")
        assert "IPv6 host address" in cond["message"]
        await w.wait_events("RegistryUnavailable")
        await asyncio.sleep(600)  # several retries with backoff
        assert w.jobs() == []  # no launch without the registry
        assert w.condition("recs", "Ready")["status"] == "Unknown"

        await w.create_secret()  # fix the Secret: the operator recovers
        await w.wait_condition("recs", "Degraded", "False", timeout=1200)
        (job,) = await w.wait_jobs(1)
        text = json.dumps(job)
        assert w.dsn not in text and password not in text
        env = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        assert env == [{"name": "RECUPDATE_STORE_DSN", "valueFrom": {"secretKeyRef": {"name": "store", "key": "dsn"}}}]

    shown = json.dumps([w.policy("recs"), w.events(), w.jobs()]) + caplog.text
    assert "IPv6 host address" in shown  # the error itself is reported...
    assert password not in shown  # ...without the password
    assert password not in (yaml.safe_dump(w.events()) + str(metrics.REGISTRY.collect()))


async def test_a_failed_action_stops_the_plan_and_is_retried(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        await w.create_policy("recs")
        await w.wait_jobs(1)
        # The first two attempts to create the RayService fail on the API server.
        (
            w.cluster.api["post /apis/ray.io/v1/namespaces/default/rayservices"][:2]
            << 500
            << {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "etcd is sad",
                "code": 500,
            }
        )
        await w.succeed(FIRST)
        events = await w.wait_events("ReconcileFailed")
        failed = [e for e in events if e["reason"] == "ReconcileFailed"]
        assert failed[0]["type"] == "Warning" and "500" in failed[0]["message"]
        # The promotion was applied before the failure; the status was not written half-way: it only says
        # Degraded until a retry (with backoff) gets through.
        assert w.releases() == {FIRST: "active"}
        assert "servedRelease" not in w.status("recs")
        await w.wait_condition("recs", "Ready", "True", "Serving")
        history = w.cluster.history("recupdate.io", "v1alpha1", "recommenderupdatepolicies", "default", "recs")
        degraded = [
            c for v in history if v for c in (v.get("status") or {}).get("conditions", []) if c["type"] == "Degraded"
        ]
        assert any(
            c["status"] == "True" and c["reason"] == "ReconcileFailed" and "500" in c["message"] for c in degraded
        )
        assert w.condition("recs", "Degraded")["status"] == "False"
        assert w.served_user_config()["release_id"] == FIRST  # type: ignore[index]
        await w.wait_events("ServeUpdated")
        assert len([e for e in w.events() if e["reason"] == "Promoted"]) == 1  # decided once
        assert len([e for e in w.events() if e["reason"] == "ReconcileFailed"]) == 1  # reported once


async def test_a_deleted_rayservice_is_recreated(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        first = await _first_release(w)
        svc = w.rayservice()
        assert svc is not None
        await asyncio.sleep(120)  # past the grace period of a fresh roll
        await w.cluster.delete("ray.io/v1", "RayService", svc["metadata"]["name"], namespace="default")
        await w.wait(lambda: w.rayservice() is not None)
        assert w.served_user_config()["release_id"] == first  # type: ignore[index]
        # A spec change to serving reaches the RayService, keeping the served release.
        await w.patch_policy("recs", {"spec": {"serving": {"replicas": 3}}})
        await w.wait(
            lambda: (w.rayservice() or {}).get("metadata", {}).get("labels", {}).get("recupdate.io/generation") == "2"
        )
        svc = w.rayservice()
        assert svc is not None and svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
        assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]["num_replicas"] == 3
        assert w.served_user_config()["release_id"] == first  # type: ignore[index]


async def test_peering_one_operator_acts_at_a_time(make_world: MakeWorld) -> None:
    from k8s.emulator import kopf_peering_crds

    w = await make_world()
    for crd in kopf_peering_crds():
        await w.cluster.apply(crd)
    await w.cluster.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "recupdate"}})
    async with w.operator(peering=("recupdate", 100)) as leader, w.operator(peering=("recupdate", 10)) as standby:
        await asyncio.sleep(30)  # the standby sees the leader and pauses
        await w.create_policy("recs")
        await w.wait_jobs(1)
        await w.succeed(FIRST)
        await w.wait_condition("recs", "Ready", "True", "Serving")
        await asyncio.sleep(3600)
        assert leader.reconciles >= 2 and standby.reconciles == 0
        assert w.job_names() == [FIRST]
        assert "kopf.recupdate.io/finalizer" in w.policy("recs")["metadata"]["finalizers"]
    # (Taking over when the leader leaves is kopf's resume; two kopfs stopping in one event loop cancel each
    # other's tasks, so the takeover is not played here.) Deleting the policy: kopf's finalizer waits for an
    # operator, which stops the daemon and lets go; Kubernetes collects the children.
    await w.cluster.delete("recupdate.io/v1alpha1", "RecommenderUpdatePolicy", "recs", namespace="default")
    assert w.policy("recs")["metadata"]["deletionTimestamp"]
    # The stopped operators' peering records expire after 60 s of real time; forget them at once.
    await w.cluster.patch("kopf.dev/v1", "KopfPeering", "recupdate", {"status": None}, namespace="default")
    async with w.operator(peering=("recupdate", 10)):
        await w.wait(lambda: not w.policy("recs"))
    assert w.jobs() == [] and w.rayservice() is None


async def test_an_idle_policy_costs_about_one_request_an_hour(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator(resync_seconds=600) as controller:
        await _first_release(w)  # ~00:30; the next refresh is due at 00:00 tomorrow
        await asyncio.sleep(600)
        before, reconciles = len(w.cluster.api._requests), controller.reconciles
        await asyncio.sleep(22 * 3600)
        requests = [r for r in w.cluster.api._requests[before:] if "watch=true" not in str(r.url)]
        assert controller.reconciles - reconciles >= 22 * 6 - 2  # resyncs every 10 minutes...
        assert {str(r.url).split("?")[0].rsplit("/", 1)[-1] for r in requests} <= {"status"}
        assert 20 <= len(requests) <= 24  # ...but the status is written only when the evidence age message is
        fresh = w.condition("recs", "Fresh")  # an hour old
        assert fresh["status"] == "True" and "old" in fresh["message"]


async def test_shutdown_leaves_no_store_connection_behind(make_world: MakeWorld) -> None:
    """A stopped operator waits for its reconciles and closes its registry connections: a thread left running
    once held locks that deadlocked a schema drop (CI)."""
    w = await make_world()

    def others() -> int:
        row = w.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
        return int(row[0]) if row else -1

    before = others()
    async with w.operator():
        await _first_release(w)
        assert others() > before  # the operator's pooled registry connections
    assert others() == before
