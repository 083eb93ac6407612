"""The planner over weeks of simulated time, against a fake world that applies its actions.

Checks properties of the whole loop rather than single decisions: every run is launched once, schedules
are kept, candidates are promoted, history stays bounded, failures back off and give up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from recupdate_operator.api import PolicyStatus, RunKind
from recupdate_operator.planner import (
    DeleteJob,
    Event,
    LaunchRun,
    ObservedJob,
    Plan,
    Policy,
    Promote,
    PruneReleases,
    RecordRun,
    RegistryView,
    Reject,
    ReleaseView,
    Rollback,
    RollServe,
    RunView,
    plan,
)

START = datetime(2025, 1, 5, tzinfo=UTC)  # after the Jan 1 fire
PASSED = {"passed": True}


@dataclass
class World:
    """Jobs take `duration`, then succeed (or fail, per `fail`) and register a passing candidate."""

    duration: timedelta = timedelta(minutes=30)
    fail: set[RunKind] = field(default_factory=set)
    jobs: dict[str, ObservedJob] = field(default_factory=dict)
    runs: dict[str, RunView] = field(default_factory=dict)
    releases: dict[str, ReleaseView] = field(default_factory=dict)
    served: str | None = None
    launched: list[LaunchRun] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def advance(self, now: datetime) -> None:
        for run_id, job in list(self.jobs.items()):
            if job.terminal or job.start_time is None or now - job.start_time < self.duration:
                continue
            ok = job.kind not in self.fail
            self.jobs[run_id] = replace(
                job, job_deployment_status="Complete", job_status="SUCCEEDED" if ok else "FAILED", end_time=now
            )
            self.runs[run_id] = RunView(run_id, job.kind, "succeeded" if ok else "failed")
            if ok:
                self.releases[f"rel-{run_id}"] = ReleaseView(
                    f"rel-{run_id}", "candidate", PASSED, created_at=now, evidence_at=now, run_id=run_id
                )

    def registry(self) -> RegistryView:
        return RegistryView(runs=tuple(self.runs.values()), releases=tuple(self.releases.values()))

    def activate(self, release_id: str, now: datetime) -> None:
        for rid, r in self.releases.items():
            if r.state == "active":
                self.releases[rid] = replace(r, state="retired")
        self.releases[release_id] = replace(self.releases[release_id], state="active", activated_at=now)

    def apply(self, p: Plan, now: datetime) -> None:
        for a in p.actions:
            match a:
                case LaunchRun():
                    self.launched.append(a)
                    self.jobs[a.job_name] = ObservedJob(
                        a.job_name, a.kind, a.run_id, a.generation, "Running", "RUNNING", now
                    )
                    self.runs[a.run_id] = RunView(a.run_id, a.kind, "running")
                case DeleteJob():
                    self.jobs.pop(a.name)
                case RecordRun():
                    if self.runs.get(a.run_id, RunView("", a.kind, "running")).status == "running":
                        self.runs[a.run_id] = RunView(a.run_id, a.kind, a.result.value.lower(), a.reason)
                case Promote() | Rollback():
                    self.activate(a.release_id, now)
                case Reject():
                    self.releases[a.release_id] = replace(self.releases[a.release_id], state="rejected")
                case RollServe():
                    self.served = a.release_id
                case PruneReleases():
                    for rid in a.release_ids:
                        del self.releases[rid]
                case Event():
                    self.events.append(a)


def simulate(world: World, days: int, raw_spec: dict[str, Any]) -> PolicyStatus:
    """Event-driven, like the operator: reconcile when a job changes or at the plan's wake_at, no sooner.

    So a wrong wake_at shows up as a missed or late run."""
    pol = Policy("demo", "ml", raw_spec, 1, {}, START)
    status: PolicyStatus | None = None
    now, end = START, START + timedelta(days=days)
    while now < end:
        world.advance(now)
        p = plan(pol, status, list(world.jobs.values()), world.registry(), now)
        world.apply(p, now)
        status = p.status
        assert p.wake_at is None or p.wake_at > now
        finishes = [j.start_time + world.duration for j in world.jobs.values() if j.start_time and not j.terminal]
        upcoming = [t for t in [p.wake_at, *finishes] if t is not None]
        if not upcoming:
            break
        now = min(upcoming)
    assert status is not None
    return status


def test_two_months_of_healthy_operation() -> None:
    world = World()
    status = simulate(world, 62, {})
    ids = [a.run_id for a in world.launched]
    assert len(ids) == len(set(ids)), "a run was launched twice"
    fine_tunes = [a.run_id for a in world.launched if a.kind == RunKind.FINETUNE]
    assert fine_tunes == ["demo-ft-202501050000", "demo-ft-202502010300", "demo-ft-202503010300"]
    refreshes = [a for a in world.launched if a.kind == RunKind.REFRESH]
    # every 6h from the first 6h mark after the first release, for 62 days
    assert 62 * 4 - 2 <= len(refreshes) <= 62 * 4
    # every run's candidate passed and was promoted; Serve follows the active release
    active = [r for r in world.releases.values() if r.state == "active"]
    assert len(active) == 1 and world.served == active[0].release_id == status.active_release
    conditions = {c.type.value: c.status.value for c in status.conditions}
    assert conditions == {
        "Ready": "True",
        "Fresh": "True",
        "FineTuning": "False",
        "Refreshing": "False",
        "Degraded": "False",
        "SpecValid": "True",
    }
    # history stays bounded: 3 successful jobs per kind, 10 old releases
    assert Counter(j.kind for j in world.jobs.values()) == {RunKind.FINETUNE: 3, RunKind.REFRESH: 3}
    assert len(world.releases) == 11  # the active one and 10 retired
    assert not [e for e in world.events if e.type == "Warning"]


def test_failing_fine_tunes_back_off_then_give_up() -> None:
    world = World(fail={RunKind.FINETUNE})
    status = simulate(world, 40, {"fineTune": {"backoffLimit": 2}})
    fine_tunes = [(a.run_id, a.scheduled_at) for a in world.launched]
    # initial run + 2 retries, then the Feb 1 fire + 2 retries; never more
    assert [rid for rid, _ in fine_tunes] == [
        "demo-ft-202501050000",
        "demo-ft-202501050000-r1",
        "demo-ft-202501050000-r2",
        "demo-ft-202502010300",
        "demo-ft-202502010300-r1",
        "demo-ft-202502010300-r2",
    ]
    launches = [e for e in world.events if e.reason == "Launched"]
    assert len(launches) == 6
    # no release ever, so no refresh either; Degraded says why
    assert status.active_release is None
    conditions = {c.type.value: (c.status.value, c.reason) for c in status.conditions}
    assert conditions["Degraded"] == ("True", "RunFailed")
    assert conditions["Refreshing"] == ("False", "WaitingForRelease")
    assert sum(e.reason == "BackoffLimitExceeded" for e in world.events) == 2
