"""Analysis on live events (gates.analysis) through the real operator: kopf against the emulated API, the
embedded PostgreSQL registry with real transition tables and interactions. The test plays KubeRay and the
workloads (fixtures/operator_world.py) and the users (interactions after the candidate was built)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import yaml

from fixtures.operator_world import World
from recupdate_operator import metrics

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(120)]
MakeWorld = Callable[..., Awaitable[World]]
DAY = 86400.0
FIRST = "recs-ft-203001080030"
REFRESH_1 = "recs-rf-203001090000"
N_CLUSTERS = 10


def _catalogue(w: World) -> None:
    with w.conn.transaction():
        for k in range(N_CLUSTERS):
            w._sql("INSERT INTO {s}.clusters (cluster, name, external) VALUES (%s, %s, %s)", k, f"c{k}", f"c{k}")
            w._sql("INSERT INTO {s}.items (item_id, cluster, external) VALUES (%s, %s, %s)", k, k, str(k))


def _table(w: World, release_id: str, good: bool) -> None:
    """The release's transition table: for the context (k, k+1), a good table ranks k+2 first; a bad one
    leaves it out of its top 5."""
    version = w._sql("SELECT table_version FROM {s}.releases WHERE release_id = %s", release_id)[0][0]
    name = f"transitions_v{version}"
    with w.conn.transaction():
        w._sql(f"CREATE TABLE {{s}}.{name} (c1 int, c2 int, rank smallint, cluster int, score real, source text)")
        for a in range(N_CLUSTERS):
            for b in range(N_CLUSTERS):
                if a == b:
                    continue
                nxt = (b + 1) % N_CLUSTERS
                others = [c for c in range(N_CLUSTERS) if c not in (a, b, nxt)]
                ranked = [nxt, *others] if good else others
                for rank, c in enumerate(ranked[:5], 1):
                    w._sql(f"INSERT INTO {{s}}.{name} VALUES (%s, %s, %s, %s, 1.0, 'model')", a, b, rank, c)


def _users_act(w: World, users: range, steps: int = 10) -> None:
    """Each user walks the clusters in order (k, k+1, k+2, ...), one positive interaction a minute from now."""
    t0 = int(w.now().timestamp()) + 60
    with w.conn.transaction():
        for u in users:
            for i in range(steps):
                w._sql(
                    "INSERT INTO {s}.interactions (user_id, item_id, ts, weight) VALUES (%s, %s, %s, 5.0)",
                    u,
                    (u + i) % N_CLUSTERS,
                    t0 + 60 * i,
                )


def _spec(w: World, mode: str) -> dict[str, Any]:
    analysis = {"mode": mode, "duration": "2h", "minEvents": 50, "maxRegression": 0.02, "trafficPercent": 50}
    return w.spec(gates={"analysis": analysis})


async def _into_analysis(w: World, mode: str, good: bool) -> dict[str, Any]:
    await w.create_policy("recs", _spec(w, mode))
    await w.wait_jobs(1)
    await w.succeed(FIRST)  # the first release has nothing to be compared with: promoted at once
    await w.wait_condition("recs", "Ready", "True", "Serving")
    assert w.releases() == {FIRST: "active"}
    _catalogue(w)
    _table(w, FIRST, good=True)
    await w.wait_jobs(2, timeout=2 * DAY)
    await w.set_job(REFRESH_1, "Running", "RUNNING")
    await w.register(REFRESH_1)
    _table(w, REFRESH_1, good=good)
    await w.set_job(REFRESH_1, "Complete", "SUCCEEDED")
    cond = await w.wait_condition("recs", "Analyzing", "True", mode)
    assert REFRESH_1 in cond["message"] and FIRST in cond["message"]
    status = w.status("recs")
    assert status["analysis"]["phase"] == "Running" and status["activeRelease"] == FIRST
    assert w.releases() == {FIRST: "active", REFRESH_1: "candidate"}
    await w.wait_events("AnalysisStarted")
    return status


async def test_shadow_promotes_a_good_candidate(make_world: MakeWorld) -> None:
    w = await make_world()
    before = metrics.value("recupdate_analysis_verdicts_total", {"policy": "recs", "verdict": "Promoted"}) or 0.0
    async with w.operator():
        status = await _into_analysis(w, "Shadow", good=True)
        assert w.served_user_config() == {**w.served_user_config(), "release_id": FIRST}  # type: ignore[dict-item]
        assert "canary" not in (w.served_user_config() or {})
        _users_act(w, range(20))
        # Measured while it runs: in status and in the gauges; nothing is decided before the window ends.
        await w.wait(lambda: w.status("recs")["analysis"].get("candidateEvents", 0) >= 50, timeout=3600)
        a = w.status("recs")["analysis"]
        assert a["phase"] == "Running" and a["candidateHitRate"] == a["baselineHitRate"] == 1.0
        assert (
            metrics.value(
                "recupdate_analysis_running", {"namespace": "default", "policy": "recs", "release": REFRESH_1}
            )
            == 1
        )
        assert w.releases()[REFRESH_1] == "candidate"

        await w.wait(lambda: w.releases().get(REFRESH_1) == "active", timeout=3 * 3600)
        await w.wait(lambda: (w.served_user_config() or {}).get("release_id") == REFRESH_1)
        await w.wait(lambda: w.status("recs")["analysis"]["phase"] != "Running")  # written after the actions
        a = w.status("recs")["analysis"]
        assert a["phase"] == "Promoted" and a["candidateEvents"] == 160
        assert w.condition("recs", "Analyzing")["reason"] == "Promoted"
        ends = a["endsAt"]
        assert ends == status["analysis"]["endsAt"]
        await w.wait_events("AnalysisPromoted", "Promoted")
        gates = w._sql("SELECT gates FROM {s}.releases WHERE release_id = %s", REFRESH_1)[0][0]
        assert gates["analysis"]["verdict"] == "Promoted" and gates["analysis"]["candidateEvents"] == 160
    assert metrics.value("recupdate_analysis_verdicts_total", {"policy": "recs", "verdict": "Promoted"}) == before + 1


async def test_canary_aborts_a_worse_candidate(make_world: MakeWorld) -> None:
    w = await make_world()
    before = metrics.value("recupdate_analysis_verdicts_total", {"policy": "recs", "verdict": "Aborted"}) or 0.0
    async with w.operator():
        await _into_analysis(w, "Canary", good=False)
        # Both releases in the same RayService's user_config: the active one, and the candidate for 50%.
        await w.wait(lambda: "canary" in (w.served_user_config() or {}))
        uc = w.served_user_config() or {}
        assert uc["release_id"] == FIRST
        assert uc["canary"]["release_id"] == REFRESH_1 and uc["canary"]["percent"] == 50
        await w.wait_events("CanaryStarted")
        # A spec change that the RayService follows (replicas) keeps the canary in it.
        await w.patch_policy("recs", {"spec": {"serving": {"replicas": 2}}})

        def replicas() -> int:
            config = yaml.safe_load((w.rayservice() or {})["spec"]["serveConfigV2"])
            return int(config["applications"][0]["deployments"][0]["num_replicas"])

        await w.wait(lambda: replicas() == 2)
        assert (w.served_user_config() or {})["canary"]["release_id"] == REFRESH_1
        _users_act(w, range(60))

        await w.wait(lambda: w.releases().get(REFRESH_1) == "rejected", timeout=3600)
        await w.wait(lambda: w.status("recs")["analysis"]["phase"] != "Running")
        a = w.status("recs")["analysis"]
        assert a["phase"] == "Aborted" and a["candidateHitRate"] == 0.0 and a["baselineHitRate"] == 1.0
        assert a["candidateEvents"] >= 50 and a["baselineEvents"] >= 50
        assert a["candidateEvents"] + a["baselineEvents"] == 60 * 8
        await w.wait(lambda: "canary" not in (w.served_user_config() or {"canary": 1}))
        assert (w.served_user_config() or {})["release_id"] == FIRST  # serving stays on the active release
        assert w.status("recs")["activeRelease"] == FIRST
        events = await w.wait_events("AnalysisAborted", "CanaryStopped")
        (aborted,) = [e for e in events if e["reason"] == "AnalysisAborted"]
        assert aborted["type"] == "Warning" and "HR@5 0.0000" in aborted["message"]
        gates = w._sql("SELECT gates FROM {s}.releases WHERE release_id = %s", REFRESH_1)[0][0]
        assert any("HR@5 0.0000" in r for r in gates["reasons"]) and gates["analysis"]["verdict"] == "Aborted"
        assert w.condition("recs", "Analyzing")["status"] == "False"
        assert (
            metrics.value(
                "recupdate_analysis_running", {"namespace": "default", "policy": "recs", "release": REFRESH_1}
            )
            is None
        )
    assert metrics.value("recupdate_analysis_verdicts_total", {"policy": "recs", "verdict": "Aborted"}) == before + 1


async def test_approval_and_rollback_during_the_analysis(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        await _into_analysis(w, "Shadow", good=False)
        await w.annotate("recs", approve=REFRESH_1)  # a person overrides the analysis
        await w.wait(lambda: w.releases().get(REFRESH_1) == "active")
        await w.wait(lambda: w.status("recs")["analysis"]["phase"] == "Cancelled")
        await w.wait_events("AnalysisCancelled")
        await w.annotate("recs", rollback=FIRST)
        await w.wait(lambda: (w.served_user_config() or {}).get("release_id") == FIRST)
        await asyncio.sleep(3600)
        assert w.releases() == {FIRST: "active", REFRESH_1: "retired"}
