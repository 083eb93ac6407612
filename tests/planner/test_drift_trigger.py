"""The planner's drift trigger (fineTune.onDrift), table-driven: threshold, minInterval, maxInterval, with and
without the cron schedule, under the concurrency and deadline rules; and status.lastDrift."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recupdate_operator.api import PolicyStatus, RunKind, RunRef, RunResult
from recupdate_operator.planner import (
    Event,
    LaunchRun,
    ObservedJob,
    Policy,
    RegistryView,
    ReleaseView,
    RunView,
    parse_run_name,
    plan,
)

FT = RunKind.FINETUNE
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
FIRE = datetime(2025, 3, 1, 3, 0, tzinfo=UTC)  # the last monthly fine-tune (schedule "0 3 1 * *")
NEXT_FIRE = datetime(2025, 4, 1, 3, 0, tzinfo=UTC)
FT_ID = "demo-ft-202503010300"
MEASURED = NOW - timedelta(hours=6)  # the refresh of 06:00 measured the drift
PASSED = {"passed": True}
RULE = {"threshold": 0.1, "minInterval": "1d"}


def ts(t: datetime) -> int:
    return int(t.timestamp())


def adapter(run: str = FT_ID, at: datetime = FIRE) -> dict[str, Any]:
    return {"run": run, "scheduledAt": ts(at), "trainStart": ts(at - timedelta(days=365)), "trainEnd": ts(at)}


ACTIVE = ReleaseView(
    "rel-ft",
    "active",
    PASSED,
    {"adapter": adapter()},
    FIRE + timedelta(hours=2),
    FIRE + timedelta(hours=2),
    FIRE,
    FT_ID,
)


def measured(
    excess: float | None, at: datetime = MEASURED, against: str = FT_ID, release_id: str = "rel-rf", contexts: int = 40
) -> ReleaseView:
    """A refresh's release (retired or rejected alike: the measurement is what counts) with its drift."""
    drift = {
        "jaccard": None if excess is None else 0.5,
        "floorJaccard": None if excess is None else 0.5 + excess,
        "excess": excess,
        "contexts": contexts,
        "measuredAt": ts(at),
        "adapterRun": against,
    }
    return ReleaseView(
        release_id,
        "retired",
        PASSED,
        {"adapter": adapter(), "refreshOf": "rel-ft", "drift": drift},
        at + timedelta(minutes=10),
        None,
        at,
        release_id,
    )


def status(mark: datetime = FIRE, **updates: Any) -> PolicyStatus:
    last = RunRef(
        run_id=FT_ID,
        kind=FT,
        job_name=FT_ID,
        scheduled_at=FIRE,
        started_at=FIRE,
        finished_at=FIRE + timedelta(hours=2),
        result=RunResult.SUCCEEDED,
        reason="Completed",
    )
    base = PolicyStatus(
        observed_generation=1,
        active_release="rel-ft",
        served_release="rel-ft",
        last_fine_tune=last,
        fine_tune_scheduled_at=mark,
        refresh_scheduled_at=NOW,
    )
    return base.model_copy(update=updates)


def policy(fine_tune: dict[str, Any]) -> Policy:
    return Policy("demo", "ml", {"fineTune": fine_tune}, 1, {}, datetime(2025, 1, 1, tzinfo=UTC))


@dataclass
class Case:
    id: str
    fine_tune: dict[str, Any]
    releases: tuple[ReleaseView, ...] = (ACTIVE,)
    status: PolicyStatus = field(default_factory=status)
    jobs: list[ObservedJob] = field(default_factory=list)
    runs: tuple[RunView, ...] = ()
    now: datetime = NOW
    launch: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # type:reason of every Event, in order
    expect: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # a part of the Launched event's message


CASES = [
    Case("no onDrift: drift does not matter", {}, (ACTIVE, measured(0.9)), expect={"next_fine_tune_at": NEXT_FIRE}),
    Case(
        "drift over the threshold: a fine-tune named after the measurement",
        {"onDrift": RULE},
        (ACTIVE, measured(0.2)),
        launch=["demo-ft-202503100600"],
        events=["Normal:Launched"],
        expect={"fine_tune_scheduled_at": MEASURED, "next_fine_tune_at": NEXT_FIRE},
        message="drift beyond noise 0.200 >= 0.1 in rel-rf",
    ),
    Case(
        "drift exactly at the threshold fires",
        {"onDrift": RULE},
        (ACTIVE, measured(0.1)),
        launch=["demo-ft-202503100600"],
        events=["Normal:Launched"],
    ),
    Case(
        "drift below the threshold: the schedule alone",
        {"onDrift": RULE},
        (ACTIVE, measured(0.05)),
        expect={"next_fine_tune_at": NEXT_FIRE, "next_fine_tune_reason": "schedule"},
    ),
    Case(
        "too little support (no excess): nothing",
        {"onDrift": RULE},
        (ACTIVE, measured(None, contexts=0)),
        expect={"next_fine_tune_at": NEXT_FIRE},
    ),
    Case(
        "minInterval: drift waits until the last fine-tune + minInterval",
        {"onDrift": {"threshold": 0.1, "minInterval": "14d"}},
        (ACTIVE, measured(0.3)),
        expect={"next_fine_tune_at": FIRE + timedelta(days=14), "next_fine_tune_reason": "drift"},
    ),
    Case(
        "minInterval passed: launched at last + minInterval, not at the measurement",
        {"onDrift": {"threshold": 0.1, "minInterval": "14d"}},
        (ACTIVE, measured(0.3)),
        now=FIRE + timedelta(days=14, minutes=5),
        launch=["demo-ft-202503150300"],
        events=["Normal:Launched"],
    ),
    Case(
        "maxInterval: a fine-tune whatever the drift",
        {"onDrift": {"threshold": 0.1, "minInterval": "1d", "maxInterval": "7d"}},
        (ACTIVE, measured(0.01)),
        launch=["demo-ft-202503080300"],
        events=["Normal:Launched"],
        expect={"fine_tune_scheduled_at": FIRE + timedelta(days=7)},
        message="maxInterval 7d",
    ),
    Case(
        "maxInterval ahead: it is the next fine-tune when sooner than the schedule",
        {"onDrift": {"threshold": 0.1, "minInterval": "1d", "maxInterval": "14d"}},
        (ACTIVE, measured(0.01)),
        expect={"next_fine_tune_at": FIRE + timedelta(days=14), "next_fine_tune_reason": "maxInterval"},
    ),
    Case(
        "a measurement against another adapter is not this adapter's drift",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5, against="demo-ft-202502010300")),
        expect={"next_fine_tune_at": NEXT_FIRE},
    ),
    Case(
        "the measurement that triggered the last fine-tune does not trigger again",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5)),
        status=status(mark=MEASURED),
        expect={"fine_tune_scheduled_at": MEASURED, "next_fine_tune_at": NEXT_FIRE},
    ),
    Case(
        "newest measurement wins: drift that went away does not fire",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5, at=MEASURED - timedelta(hours=6), release_id="rel-a"), measured(0.02)),
        expect={"next_fine_tune_at": NEXT_FIRE, "last_drift.release_id": "rel-rf"},
    ),
    Case(
        "Forbid: drift waits while a fine-tune runs",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5)),
        status=status(active_runs=[RunRef(run_id="demo-ft-202503050300", kind=FT, scheduled_at=FIRE, started_at=FIRE)]),
        jobs=[ObservedJob("demo-ft-202503050300", FT, "demo-ft-202503050300", 1, "Running", "RUNNING", NOW, None)],
        expect={"fine_tune_scheduled_at": FIRE},
    ),
    Case(
        "startingDeadlineSeconds: a drift fire past it is skipped with a warning",
        {"onDrift": RULE, "startingDeadlineSeconds": 3600},
        (ACTIVE, measured(0.5)),
        events=["Warning:MissedSchedule"],
        expect={"fine_tune_scheduled_at": MEASURED},
    ),
    Case(
        "launched before (the status was lost): never twice",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5)),
        runs=(RunView("demo-ft-202503100600", FT, "running"),),
        expect={"fine_tune_scheduled_at": MEASURED},
    ),
    Case(
        "no mark in the status: the active adapter's training time bounds it",
        {"onDrift": {"threshold": 0.1, "minInterval": "14d"}},
        (ACTIVE, measured(0.5)),
        status=status(mark=None),  # type: ignore[arg-type]
        expect={"next_fine_tune_at": FIRE + timedelta(days=14)},
    ),
    Case(
        "cron and drift both due: one fine-tune, for the later time",
        {"onDrift": RULE},
        (ACTIVE, measured(0.5)),
        status=status(mark=FIRE - timedelta(days=28)),
        launch=["demo-ft-202503100600"],
        events=["Normal:Launched"],
        expect={"fine_tune_scheduled_at": MEASURED},
    ),
    Case(
        "no cron schedule: drift alone launches",
        {"schedule": None, "onDrift": RULE},
        (ACTIVE, measured(0.5)),
        launch=["demo-ft-202503100600"],
        events=["Normal:Launched"],
        expect={"next_fine_tune_at": None},
    ),
    Case(
        "no cron schedule, no drift: nothing is next but the cap",
        {"schedule": None, "onDrift": {"threshold": 0.1, "minInterval": "1d", "maxInterval": "30d"}},
        (ACTIVE, measured(0.0)),
        expect={"next_fine_tune_at": FIRE + timedelta(days=30), "next_fine_tune_reason": "maxInterval"},
    ),
    Case(
        "no cron schedule and no onDrift: no fine-tune is ever next",
        {"schedule": None},
        expect={"next_fine_tune_at": None, "next_fine_tune_reason": None},
    ),
]


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_drift_trigger(case: Case) -> None:
    registry = RegistryView(runs=case.runs, releases=case.releases)
    p = plan(policy(case.fine_tune), case.status, case.jobs, registry, case.now)
    launches = [a for a in p.actions if isinstance(a, LaunchRun) and a.kind == FT]
    events = [a for a in p.actions if isinstance(a, Event)]
    assert [a.run_id for a in launches] == case.launch
    assert [f"{e.type}:{e.reason}" for e in events if "refresh" not in e.message] == case.events
    for path, want in case.expect.items():
        assert _lookup(p.status, path) == want, path
    for a in launches:
        assert a.scheduled_at == parse_run_name(a.run_id)[0]  # type: ignore[index]
        assert a.config["window"]["end"] == a.scheduled_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if case.message:
        assert case.message in next(e.message for e in events if e.reason == "Launched")


def test_no_schedule_still_bootstraps_with_the_initial_fine_tune() -> None:
    created = NOW - timedelta(seconds=30)
    pol = Policy("demo", "ml", {"fineTune": {"schedule": None}}, 1, {}, created)
    p = plan(pol, None, [], RegistryView(), NOW)
    assert [a.run_id for a in p.actions if isinstance(a, LaunchRun)] == ["demo-ft-202503101159"]


def test_last_drift_is_shown_in_status() -> None:
    p = plan(policy({}), status(), [], RegistryView(releases=(ACTIVE, measured(0.25))), NOW)
    d = p.status.last_drift
    assert d is not None and d.release_id == "rel-rf" and d.adapter_run == FT_ID
    assert d.excess == 0.25 and d.contexts == 40 and d.measured_at == MEASURED
    assert d.floor_jaccard == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("on_drift", "error"),
    [
        ({"threshold": 0.1, "minInterval": "7d", "maxInterval": "1d"}, "maxInterval must be at least minInterval"),
        ({"threshold": 1.5}, "less than or equal to 1"),
        ({"threshold": 0.1, "minInterval": "0d"}, "greater than zero"),
        ({"threshold": 0.1, "every": "1d"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_on_drift_is_an_invalid_spec(on_drift: dict[str, Any], error: str) -> None:
    p = plan(policy({"onDrift": on_drift}), status(), [], RegistryView(releases=(ACTIVE,)), NOW)
    spec_valid = next(c for c in p.status.conditions if c.type == "SpecValid")
    assert spec_valid.status == "False" and error in spec_valid.message
    assert not [a for a in p.actions if isinstance(a, LaunchRun)]
