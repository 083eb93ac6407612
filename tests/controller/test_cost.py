"""Cost and change in status, Events and metrics (issue 13): kopf runs the real handlers against the emulated
API and the embedded registry; the test plays KubeRay and the workloads, which record each run's cost
(runs.cost) and each candidate's change against the active table (releases.metrics.change)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fixtures.operator_world import World, crd
from k8s.emulator import EmulatedCluster
from k8s.kubectl import Kubectl
from recupdate_operator import metrics
from recupdate_operator.api import RunCost

pytestmark = [pytest.mark.timeout(120)]
MakeWorld = Callable[..., Awaitable[World]]
DAY = 86400.0
FIRST = "cost-ft-203001080030"
REFRESH_1 = "cost-rf-203001090000"
NS, POLICY = "default", "cost"
COST_METRICS = {
    "cpu_seconds": "recupdate_run_cpu_seconds_total",
    "gpu_seconds": "recupdate_run_gpu_seconds_total",
    "training_tokens": "recupdate_run_training_tokens_total",
    "wall_seconds": "recupdate_run_wall_seconds_total",
    "rows_ingested": "recupdate_run_rows_ingested_total",
}
FT_COST = {
    "cpuSeconds": 125.5,
    "gpuSeconds": 40.0,
    "tokens": 91_000,
    "wallSeconds": 60.25,
    "examples": 900,
    "sync": {"rows": 1200, "new": 1100, "duplicate": 90, "skipped": {"bad-rating": 10}, "files": 1, "seconds": 0.4},
}
RF_COST = {"cpuSeconds": 7.5, "examples": 0, "tokens": 0, "wallSeconds": 9.0, "sync": {"rows": 30, "new": 30}}
CHANGE = {"pairs": 400, "top1Changed": 0.125, "top5Overlap": 0.8125, "newPairs": 12, "droppedPairs": 3}


def _counters(kind: str) -> dict[str, float]:
    labels = {"namespace": NS, "policy": POLICY, "kind": kind}
    return {k: metrics.value(name, labels) or 0.0 for k, name in COST_METRICS.items()}


@pytest.mark.looptime
async def test_cost_and_change_reach_status_events_and_metrics_once(make_world: MakeWorld) -> None:
    w = await make_world()
    ft_before, rf_before = _counters("finetune"), _counters("refresh")
    async with w.operator(resync_seconds=600):
        await w.create_policy(POLICY)
        await w.wait_jobs(1)
        await w.succeed(FIRST, cost=FT_COST)
        await w.wait_condition(POLICY, "Ready", "True", "Serving")
        await w.wait(lambda: (w.status(POLICY).get("lastFineTune") or {}).get("cost"))
        assert w.status(POLICY)["lastFineTune"]["cost"] == {
            "cpuSeconds": 125.5,
            "gpuSeconds": 40.0,
            "trainingTokens": 91_000,
            "wallSeconds": 60.25,
            "rowsIngested": 1100,
        }
        (ok,) = [e for e in w.events("RunSucceeded") if FIRST in e["message"]]
        assert "125.5 CPU s, 40.0 GPU s, 91000 training tokens, 60.2 wall s, 1100 rows ingested" in ok["message"]
        assert "lastChange" not in w.status(POLICY)  # the first release had no table to compare with

        # the daily refresh: its candidate measured its change against the active table
        await w.wait_jobs(2, timeout=2 * DAY)
        await w.succeed(REFRESH_1, cost=RF_COST, metrics={"change": {**CHANGE, "against": FIRST}})
        await w.wait(lambda: w.status(POLICY).get("activeRelease") == REFRESH_1)
        status = w.status(POLICY)
        assert status["lastChange"] == {
            "releaseId": REFRESH_1,
            "kind": "refresh",
            "against": FIRST,
            "pairs": 400,
            "top1Changed": 0.125,
            "top5Overlap": 0.8125,
            "newPairs": 12,
            "droppedPairs": 3,
        }
        assert status["lastRefresh"]["cost"] == {
            "cpuSeconds": 7.5,
            "gpuSeconds": 0.0,
            "trainingTokens": 0,
            "wallSeconds": 9.0,
            "rowsIngested": 30,
        }
        (change,) = w.events("CandidateChange")
        assert f"refresh candidate {REFRESH_1} against {FIRST}" in change["message"]
        assert "top-1 changed for 12.5% of 400 pairs, top-5 overlap 0.81" in change["message"]
        labels = {"namespace": NS, "policy": POLICY, "kind": "refresh"}
        # set just after the status write of the same reconcile
        await w.wait(lambda: metrics.value("recupdate_candidate_top1_changed_ratio", labels) == 0.125)
        assert metrics.value("recupdate_candidate_top5_overlap_ratio", labels) == 0.8125

        # many reconciles later (resyncs every 10 minutes), each run is still counted once
        await asyncio.sleep(6 * 3600)
        ft = {k: v - ft_before[k] for k, v in _counters("finetune").items()}
        rf = {k: v - rf_before[k] for k, v in _counters("refresh").items()}
        assert ft == {
            "cpu_seconds": 125.5,
            "gpu_seconds": 40.0,
            "training_tokens": 91_000,
            "wall_seconds": 60.25,
            "rows_ingested": 1100,
        }
        assert rf == {
            "cpu_seconds": 7.5,
            "gpu_seconds": 0.0,
            "training_tokens": 0,
            "wall_seconds": 9.0,
            "rows_ingested": 30,
        }
        assert len(w.events("CandidateChange")) == 1


def test_a_run_is_counted_once_by_its_id() -> None:
    cost = RunCost(cpu_seconds=2.0, gpu_seconds=1.0, training_tokens=5, wall_seconds=3.0, rows_ingested=7)
    labels = {"namespace": "ns-once", "policy": "p", "kind": "finetune"}
    assert metrics.count_run_cost("ns-once", "p", "finetune", "run-1", cost)
    assert not metrics.count_run_cost("ns-once", "p", "finetune", "run-1", cost)  # seen again: not counted
    assert metrics.count_run_cost("ns-once", "p", "finetune", "run-2", cost)
    assert metrics.value("recupdate_run_cpu_seconds_total", labels) == 4.0
    assert metrics.value("recupdate_run_rows_ingested_total", labels) == 14.0
    metrics.forget_policy("ns-once", "p")


async def test_kubectl_wide_shows_change_and_drift(kubectl: Kubectl, k8s_cluster: EmulatedCluster) -> None:
    await k8s_cluster.apply(crd())
    policy = "apiVersion: recupdate.io/v1alpha1\nkind: RecommenderUpdatePolicy\nmetadata: {name: recs}\nspec: {}\n"
    created = await kubectl("apply", "-f", "-", input=policy)
    assert created.returncode == 0, created.stderr
    await k8s_cluster.patch_status(
        "recupdate.io/v1alpha1",
        "RecommenderUpdatePolicy",
        "recs",
        {
            "lastChange": {"releaseId": "recs-rf-1", "top1Changed": 0.125, "top5Overlap": 0.8},
            "lastDrift": {"releaseId": "recs-rf-1", "excess": 0.42},
        },
        namespace="default",
    )
    narrow = await kubectl("get", "rup", "recs")
    assert narrow.returncode == 0, narrow.stderr
    assert "CHANGE" not in narrow.stdout and "DRIFT" not in narrow.stdout  # priority 1: -o wide only
    wide = await kubectl("get", "rup", "recs", "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    columns = _table(wide.stdout)
    assert columns["CHANGE"] == "0.125", wide.stdout
    assert columns["DRIFT"] == "0.42", wide.stdout


def _table(text: str) -> dict[str, str]:
    """kubectl's first row by column, cut at the header's column starts (headers may hold spaces)."""
    head, row = text.splitlines()[:2]
    names = [n for n in head.split("   ") if n.strip()]
    starts = [head.index(n.strip()) for n in names]
    ends = [*starts[1:], None]
    return {n.strip(): row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
