"""The planner's part of cost and change (issue 13): a run's cost from the registry on its RunRef, its Event
and its RecordRun; the newest candidate's change in status.lastChange, with one Event per candidate. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from recupdate_operator.api import PolicyStatus, RunCost, RunKind, RunRef, RunResult
from recupdate_operator.planner import Event, ObservedJob, Policy, RecordRun, RegistryView, ReleaseView, RunView, plan

NOW = datetime(2025, 3, 10, 12, 5, tzinfo=UTC)
RF_ID = "demo-rf-202503101200"
PASSED = {"passed": True}
COST = {"cpuSeconds": 12.25, "gpuSeconds": 0, "tokens": 0, "wallSeconds": 30.5, "sync": {"rows": 9, "new": 7}}
CHANGE = {"pairs": 50, "top1Changed": 0.2, "top5Overlap": 0.75, "newPairs": 1, "droppedPairs": 2, "against": "rel-1"}


def _release(
    release_id: str, state: str, created: datetime, metrics: dict[str, Any], run_id: str | None
) -> ReleaseView:
    return ReleaseView(
        release_id, state, PASSED, metrics, created, None, NOW - timedelta(hours=1), run_id, "file:///a", "1"
    )


def _plan(status: PolicyStatus, runs: tuple[RunView, ...], releases: tuple[ReleaseView, ...]) -> Any:
    job = ObservedJob(RF_ID, RunKind.REFRESH, RF_ID, 1, "Complete", "SUCCEEDED", NOW - timedelta(minutes=5), NOW)
    policy = Policy("demo", "ml", {}, 1, {}, datetime(2025, 1, 1, tzinfo=UTC))
    return plan(policy, status, [job], RegistryView(runs=runs, releases=releases), NOW)


def test_a_finished_run_carries_its_cost_and_the_newest_change_is_shown_once() -> None:
    running = RunRef(run_id=RF_ID, kind=RunKind.REFRESH, started_at=NOW - timedelta(minutes=5))
    status = PolicyStatus(active_release="rel-1", served_release="rel-1", active_runs=[running], last_refresh=running)
    runs = (RunView(RF_ID, RunKind.REFRESH, "succeeded", cost=COST),)
    older = _release("rel-0", "retired", NOW - timedelta(days=2), {"change": {**CHANGE, "top1Changed": 0.9}}, None)
    active = _release("rel-1", "active", NOW - timedelta(days=1), {}, None)
    candidate = _release(RF_ID, "candidate", NOW - timedelta(minutes=1), {"change": CHANGE}, RF_ID)
    p = _plan(status, runs, (older, active, candidate))

    cost = RunCost(cpu_seconds=12.25, gpu_seconds=0.0, training_tokens=0, wall_seconds=30.5, rows_ingested=7)
    assert p.status.last_refresh.cost == cost
    (record,) = [a for a in p.actions if isinstance(a, RecordRun)]
    assert record.cost == cost and record.result == RunResult.SUCCEEDED
    events = {a.reason: a.message for a in p.actions if isinstance(a, Event)}
    assert "; cost 12.2 CPU s, 0.0 GPU s, 0 training tokens, 30.5 wall s, 7 rows ingested" in events["RunSucceeded"]
    change = p.status.last_change
    assert (change.release_id, change.kind, change.against, change.top1_changed) == (
        RF_ID,
        RunKind.REFRESH,
        "rel-1",
        0.2,
    )
    assert (change.pairs, change.top5_overlap, change.new_pairs, change.dropped_pairs) == (50, 0.75, 1, 2)
    assert "top-1 changed for 20.0% of 50 pairs, top-5 overlap 0.75" in events["CandidateChange"]

    # the next plan, from the status just written: the same change, no second Event
    again = _plan(p.status, runs, (older, active, candidate))
    assert again.status.last_change == change
    assert not [a for a in again.actions if isinstance(a, Event) and a.reason == "CandidateChange"]


def test_no_cost_and_a_malformed_change_are_left_out() -> None:
    running = RunRef(run_id=RF_ID, kind=RunKind.REFRESH, started_at=NOW - timedelta(minutes=5))
    status = PolicyStatus(active_release="rel-1", served_release="rel-1", active_runs=[running], last_refresh=running)
    runs = (RunView(RF_ID, RunKind.REFRESH, "succeeded"),)
    bad = _release(RF_ID, "candidate", NOW, {"change": {**CHANGE, "top1Changed": 1.5}}, RF_ID)
    p = _plan(status, runs, (_release("rel-1", "active", NOW - timedelta(days=1), {}, None), bad))
    assert p.status.last_refresh.cost is None and p.status.last_change is None
    assert "cost" not in next(a.message for a in p.actions if isinstance(a, Event) and a.reason == "RunSucceeded")
