"""planner.py, table-driven: every decision the controller makes, with no I/O.

Each Case gives the inputs (policy, status, observed jobs, registry, now) and the expected non-Event actions
(summarised, in order), the Events (type:reason, in order), some status fields and conditions.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recupdate_operator import api
from recupdate_operator.api import PolicySpec, PolicyStatus, RunKind, RunRef, RunResult
from recupdate_operator.planner import (
    Action,
    DeleteJob,
    Event,
    LaunchRun,
    ObservedJob,
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
    StopServe,
    config_hash,
    gates_verdict,
    parse_run_name,
    plan,
    run_config,
    run_name,
)

FT, RF = RunKind.FINETUNE, RunKind.REFRESH
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
CREATED = datetime(2025, 1, 1, tzinfo=UTC)
FIRE = datetime(2025, 3, 1, 3, 0, tzinfo=UTC)  # latest monthly fine-tune fire at NOW
PREV_FIRE = datetime(2025, 2, 1, 3, 0, tzinfo=UTC)
NEXT_FIRE = datetime(2025, 4, 1, 3, 0, tzinfo=UTC)
RF_FIRE = NOW  # 12:00 is on the 6h grid
FT_ID = "demo-ft-202503010300"
PREV_FT_ID = "demo-ft-202502010300"
RF_ID = "demo-rf-202503101200"
PASSED = {"passed": True, "exact_match": {"passed": True, "value": 0.95, "threshold": 0.9}}
FAILED = {"passed": False, "exact_match": {"passed": False, "value": 0.5, "threshold": 0.9}}


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def spec(**sections: dict[str, Any] | bool) -> dict[str, Any]:
    """A raw (camelCase) spec, as the API server hands it over."""
    return copy.deepcopy(dict(sections))


def policy(
    raw: Any = None, generation: int = 1, annotations: dict[str, str] | None = None, created: datetime = CREATED
) -> Policy:
    return Policy("demo", "ml", {} if raw is None else raw, generation, annotations or {}, created)


def ref(
    run_id: str,
    started: datetime,
    result: RunResult = RunResult.RUNNING,
    finished: datetime | None = None,
    reason: str = "",
    generation: int = 1,
    config: str = "",
) -> RunRef:
    parsed = parse_run_name(run_id)
    assert parsed is not None
    return RunRef(
        run_id=run_id,
        kind=FT if "-ft-" in run_id else RF,
        job_name=run_id,
        scheduled_at=parsed[0],
        attempt=parsed[1],
        generation=generation,
        config_hash=config,
        started_at=started,
        finished_at=finished,
        result=result,
        reason=reason,
    )


def job(
    run_id: str,
    dep: str = "Running",
    js: str = "RUNNING",
    start: datetime | None = None,
    end: datetime | None = None,
    reason: str = "",
    message: str = "",
) -> ObservedJob:
    parsed = parse_run_name(run_id)
    assert parsed is not None
    return ObservedJob(
        name=run_id,
        kind=FT if "-ft-" in run_id else RF,
        run_id=run_id,
        generation=1,
        job_deployment_status=dep,
        job_status=js,
        start_time=start or parsed[0],
        end_time=end,
        reason=reason,
        message=message,
    )


def done(run_id: str, end: datetime, ok: bool = True, start: datetime | None = None) -> ObservedJob:
    return job(run_id, "Complete", "SUCCEEDED" if ok else "FAILED", start=start or end - minutes(30), end=end)


def rel(
    release_id: str,
    state: str,
    gates: dict[str, Any] | None = None,
    created: datetime = FIRE + timedelta(hours=2),
    activated: datetime | None = None,
    evidence: datetime | None = NOW - timedelta(hours=2),
    run_id: str | None = None,
) -> ReleaseView:
    return ReleaseView(
        release_id=release_id,
        state=state,
        gates=PASSED if gates is None else gates,
        created_at=created,
        activated_at=activated,
        evidence_at=evidence,
        run_id=run_id,
        adapter_uri=f"file:///adapters/{release_id}",
        table_version=f"t-{release_id}",
    )


ACTIVE = rel("rel-1", "active", activated=FIRE + timedelta(hours=2))


def registry(*releases: ReleaseView, runs: tuple[RunView, ...] = (), error: str | None = None) -> RegistryView:
    return RegistryView(runs=runs, releases=releases or (ACTIVE,), error=error)


def steady(**updates: Any) -> PolicyStatus:
    """Everything done for NOW: fine-tune of FIRE succeeded, refresh of RF_FIRE launched and finished."""
    base = PolicyStatus(
        observed_generation=1,
        active_release="rel-1",
        served_release="rel-1",
        last_fine_tune=ref(FT_ID, FIRE, RunResult.SUCCEEDED, FIRE + timedelta(hours=2), "Completed"),
        last_refresh=ref(RF_ID, NOW - minutes(1), RunResult.SUCCEEDED, NOW - minutes(1), "Completed"),
        fine_tune_scheduled_at=FIRE,
        refresh_scheduled_at=RF_FIRE,
    )
    return base.model_copy(update=updates)


def running(r: RunRef, **updates: Any) -> PolicyStatus:
    """steady(), with run `r` in flight (and last of its kind)."""
    last = "last_fine_tune" if r.kind == FT else "last_refresh"
    return steady(active_runs=[r], **{last: r, **updates})


RUNNING_RF = ref(RF_ID, NOW - minutes(5))
PREV_RF_ID = "demo-rf-202503100600"
RF_DUE_STATUS = steady(
    refresh_scheduled_at=NOW - timedelta(hours=6),
    last_refresh=ref(PREV_RF_ID, NOW - timedelta(hours=6), RunResult.SUCCEEDED, NOW - timedelta(hours=5), "Completed"),
)
RUNNING_PREV_FT = ref(PREV_FT_ID, PREV_FIRE)
# The fine-tune for PREV_FIRE ran long ago; FIRE is due (not yet launched).
FT_DUE = {"fine_tune_scheduled_at": PREV_FIRE}
FT_DUE_STATUS = steady(
    last_fine_tune=ref(PREV_FT_ID, PREV_FIRE, RunResult.SUCCEEDED, PREV_FIRE + timedelta(hours=2), "Completed"),
    **FT_DUE,
)


@dataclass
class Case:
    id: str
    status: PolicyStatus | dict[str, Any] | None = field(default_factory=steady)
    jobs: list[ObservedJob] = field(default_factory=list)
    registry: RegistryView = field(default_factory=registry)
    policy: Policy = field(default_factory=policy)
    now: datetime = NOW
    actions: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, str] = field(default_factory=dict)


def summarize(a: Action) -> str:
    match a:
        case LaunchRun():
            return f"launch {a.run_id}"
        case DeleteJob():
            return f"delete {a.name} {a.reason}"
        case RecordRun():
            return f"record {a.run_id} {a.result.value} {a.reason}"
        case Promote():
            return f"promote {a.release_id} {a.reason}"
        case Reject():
            return f"reject {a.release_id}"
        case Rollback():
            return f"rollback {a.release_id}"
        case RollServe():
            return f"serve {a.release_id}"
        case StopServe():
            return "stop-serve"
        case PruneReleases():
            return f"prune-releases {','.join(a.release_ids)}"
        case Event():
            return f"{a.type}:{a.reason}"
    raise AssertionError(a)


def lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if part == "active_run_ids":
            return [r.run_id for r in obj.active_runs]
        obj = getattr(obj, part)
    return obj


CASES = [
    # -- schedules ----------------------------------------------------------------------------------------
    Case(
        "steady state: nothing to do",
        expect={"next_fine_tune_at": NEXT_FIRE, "next_refresh_at": NOW + timedelta(hours=6), "active_run_ids": []},
        conditions={
            "Ready": "True/Serving",
            "Fresh": "True/EvidenceFresh",
            "FineTuning": "False/Idle",
            "Refreshing": "False/Idle",
            "Degraded": "False",
            "SpecValid": "True",
        },
    ),
    Case(
        "new policy, no release: initial fine-tune named after the creation minute",
        status=None,
        registry=RegistryView(),
        policy=policy(created=NOW - timedelta(seconds=30)),
        actions=["launch demo-ft-202503101159"],
        events=["Normal:Launched"],
        expect={"next_refresh_at": None, "next_fine_tune_at": NEXT_FIRE},
        conditions={"FineTuning": "True/Running", "Refreshing": "False/WaitingForRelease", "Ready": "False"},
    ),
    Case(
        "initialRun false: wait for the schedule",
        status=None,
        registry=RegistryView(),
        policy=policy({"fineTune": {"initialRun": False}}, created=NOW - timedelta(seconds=30)),
        expect={"next_fine_tune_at": NEXT_FIRE},
        conditions={"FineTuning": "False/Idle"},
    ),
    Case(
        "cron fire due: launch it",
        status=FT_DUE_STATUS,
        actions=[f"launch {FT_ID}"],
        events=["Normal:Launched"],
        expect={"fine_tune_scheduled_at": FIRE, "active_run_ids": [FT_ID], "last_fine_tune.run_id": FT_ID},
        conditions={"FineTuning": "True/Running"},
    ),
    Case(
        "missed fire beyond startingDeadlineSeconds: skipped once, with a warning",
        status=FT_DUE_STATUS,
        policy=policy({"fineTune": {"startingDeadlineSeconds": 3600}}),
        events=["Warning:MissedSchedule"],
        expect={"fine_tune_scheduled_at": FIRE, "active_run_ids": [], "next_fine_tune_at": NEXT_FIRE},
    ),
    Case(
        "late fire within startingDeadlineSeconds: launched",
        status=FT_DUE_STATUS,
        policy=policy({"fineTune": {"startingDeadlineSeconds": 3600}}),
        now=FIRE + minutes(30),
        actions=[f"launch {FT_ID}"],
        events=["Normal:Launched"],
    ),
    Case(
        "fires before the policy existed are not missed runs",
        status=steady(fine_tune_scheduled_at=None),
        policy=policy(created=datetime(2025, 3, 5, tzinfo=UTC)),
        expect={"fine_tune_scheduled_at": None},
    ),
    # -- concurrency --------------------------------------------------------------------------------------
    Case(
        "Forbid: a due fire waits while one runs",
        status=running(RUNNING_PREV_FT, **FT_DUE),
        jobs=[job(PREV_FT_ID)],
        expect={"fine_tune_scheduled_at": PREV_FIRE, "active_run_ids": [PREV_FT_ID]},
        conditions={"FineTuning": "True/Running"},
    ),
    Case(
        "Replace: stop the running one, then launch",
        status=running(RUNNING_PREV_FT, **FT_DUE),
        jobs=[job(PREV_FT_ID)],
        policy=policy({"fineTune": {"concurrencyPolicy": "Replace"}}),
        actions=[f"delete {PREV_FT_ID} Replaced", f"record {PREV_FT_ID} Failed Replaced", f"launch {FT_ID}"],
        events=["Normal:Replaced", "Normal:Launched"],
        expect={"active_run_ids": [FT_ID], "failures.finetune": 0},
        conditions={"Degraded": "False"},
    ),
    Case(
        "Forbid: a fire that waited past its starting deadline is skipped",
        status=running(RUNNING_PREV_FT, **FT_DUE),
        jobs=[job(PREV_FT_ID)],
        policy=policy({"fineTune": {"startingDeadlineSeconds": 3600}}),
        events=["Warning:MissedSchedule"],
        expect={"fine_tune_scheduled_at": FIRE, "active_run_ids": [PREV_FT_ID]},
    ),
    Case(
        "Allow: launch alongside",
        status=running(RUNNING_PREV_FT, **FT_DUE),
        jobs=[job(PREV_FT_ID)],
        policy=policy({"fineTune": {"concurrencyPolicy": "Allow"}}),
        actions=[f"launch {FT_ID}"],
        events=["Normal:Launched"],
        expect={"active_run_ids": [PREV_FT_ID, FT_ID]},
    ),
    # -- suspend ------------------------------------------------------------------------------------------
    Case(
        "suspend: no launch, the running one continues",
        status=running(RUNNING_PREV_FT, **FT_DUE),
        jobs=[job(PREV_FT_ID)],
        policy=policy({"suspend": True}),
        expect={"active_run_ids": [PREV_FT_ID], "next_fine_tune_at": None, "next_refresh_at": None},
        conditions={"FineTuning": "True/Running", "Refreshing": "False/Suspended"},
    ),
    Case(
        "suspend: a due fire is not consumed",
        status=FT_DUE_STATUS,
        policy=policy({"suspend": True}),
        expect={"fine_tune_scheduled_at": PREV_FIRE, "next_fine_tune_at": None},
        conditions={"FineTuning": "False/Suspended"},
    ),
    Case(
        "suspended finishes still promote",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy({"suspend": True}),
        actions=[f"record {RF_ID} Succeeded Completed", "promote rel-2 Automatic", "serve rel-2"],
        events=["Normal:RunSucceeded", "Normal:Promoted", "Normal:ServeUpdated"],
    ),
    # -- reading finished jobs ----------------------------------------------------------------------------
    Case(
        "success with a passing candidate: promote and roll Serve",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        actions=[f"record {RF_ID} Succeeded Completed", "promote rel-2 Automatic", "serve rel-2"],
        events=["Normal:RunSucceeded", "Normal:Promoted", "Normal:ServeUpdated"],
        expect={
            "active_release": "rel-2",
            "served_release": "rel-2",
            "candidate_release": None,
            "last_refresh.result": RunResult.SUCCEEDED,
            "last_refresh.finished_at": NOW - minutes(1),
            "active_run_ids": [],
        },
        conditions={"Ready": "True/Serving", "Refreshing": "False/Idle"},
    ),
    Case(
        "success with a failing candidate: reject, keep serving the last good release",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", FAILED, created=NOW - minutes(2), run_id=RF_ID)),
        actions=[f"record {RF_ID} Succeeded Completed", "reject rel-2"],
        events=["Normal:RunSucceeded", "Warning:GatesFailed"],
        expect={"active_release": "rel-1", "served_release": "rel-1", "candidate_release": None},
    ),
    Case(
        "Complete but the Ray job FAILED: a failure",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1), ok=False)],
        actions=[f"record {RF_ID} Failed JobFailed"],
        events=["Warning:RunFailed"],
        expect={"failures.refresh": 1, "last_refresh.result": RunResult.FAILED},
        conditions={"Degraded": "True/RunFailed"},
    ),
    Case(
        "deployment Failed (deadline): a failure with KubeRay's reason",
        status=running(RUNNING_RF),
        jobs=[job(RF_ID, "Failed", "", end=NOW - minutes(1), reason="DeadlineExceeded")],
        actions=[f"record {RF_ID} Failed DeadlineExceeded"],
        events=["Warning:RunFailed"],
    ),
    Case(
        "ValidationFailed is terminal",
        status=running(RUNNING_RF),
        jobs=[job(RF_ID, "ValidationFailed", "")],
        actions=[f"record {RF_ID} Failed JobValidationFailed"],
        events=["Warning:RunFailed"],
    ),
    Case(
        "a job still initializing is running",
        status=running(RUNNING_RF),
        jobs=[job(RF_ID, "Initializing", "")],
        conditions={"Refreshing": "True/Running"},
        expect={"active_run_ids": [RF_ID]},
    ),
    Case(
        "the job was deleted: record JobDeleted",
        status=running(RUNNING_RF),
        registry=registry(runs=(RunView(RF_ID, RF, "running"),)),
        actions=[f"record {RF_ID} Failed JobDeleted"],
        events=["Warning:RunFailed"],
        expect={"failures.refresh": 1, "active_run_ids": []},
    ),
    Case(
        "a just-launched job not visible yet is not deleted",
        status=running(ref(RF_ID, NOW - timedelta(seconds=10))),
        expect={"active_run_ids": [RF_ID]},
    ),
    Case(
        "the job is gone but the store has the result",
        status=running(RUNNING_RF),
        registry=registry(runs=(RunView(RF_ID, RF, "succeeded"),)),
        actions=[f"record {RF_ID} Succeeded Registered"],
        events=["Normal:RunSucceeded"],
    ),
    Case(
        "the job succeeded but the store says the run failed",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(runs=(RunView(RF_ID, RF, "failed", "no evidence"),)),
        actions=[f"record {RF_ID} Failed RunFailed"],
        events=["Warning:RunFailed"],
    ),
    # -- spec changes mid-run -----------------------------------------------------------------------------
    Case(
        "spec inputs changed mid-run: finish, but hold its candidate",
        status=running(ref(RF_ID, NOW - minutes(5), config=config_hash("demo", "ml", PolicySpec(), RF))),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy({"model": {"lora": {"r": 8}}}, generation=2),
        actions=[f"record {RF_ID} Succeeded Completed"],
        events=["Normal:RunSucceeded", "Normal:CandidateHeld"],
        expect={"candidate_release": "rel-2", "active_release": "rel-1", "observed_generation": 2},
    ),
    Case(
        "spec changed mid-run in ways that do not touch the run: promote",
        status=running(ref(RF_ID, NOW - minutes(5), config=config_hash("demo", "ml", PolicySpec(), RF))),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy({"serving": {"replicas": 3}, "history": {"releasesLimit": 5}}, generation=2),
        actions=[f"record {RF_ID} Succeeded Completed", "promote rel-2 Automatic", "serve rel-2"],
        events=["Normal:RunSucceeded", "Normal:Promoted", "Normal:ServeUpdated"],
    ),
    Case(
        "old generation without a config hash: held",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy(generation=2),
        actions=[f"record {RF_ID} Succeeded Completed"],
        events=["Normal:RunSucceeded", "Normal:CandidateHeld"],
        expect={"candidate_release": "rel-2"},
    ),
    Case(
        "a candidate whose run is still going waits",
        status=running(RUNNING_RF),
        jobs=[job(RF_ID)],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        expect={"candidate_release": None, "active_release": "rel-1"},
    ),
    Case(
        "two passing candidates: the older is superseded",
        registry=registry(
            ACTIVE,
            rel("rel-2", "candidate", created=NOW - minutes(120)),
            rel("rel-3", "candidate", created=NOW - minutes(60)),
        ),
        actions=["promote rel-3 Automatic", "reject rel-2", "serve rel-3"],
        events=["Normal:Promoted", "Normal:Superseded", "Normal:ServeUpdated"],
    ),
    Case(
        "a candidate older than the active release is superseded",
        registry=registry(ACTIVE, rel("rel-0b", "candidate", created=PREV_FIRE)),
        actions=["reject rel-0b"],
        events=["Normal:Superseded"],
        expect={"candidate_release": None},
    ),
    Case(
        "a candidate linked through the runs table",
        status=running(RUNNING_RF),
        jobs=[job(RF_ID)],
        registry=registry(
            ACTIVE,
            rel("rel-2", "candidate", created=NOW - minutes(2)),
            runs=(RunView(RF_ID, RF, "running", None, "rel-2"),),
        ),
        expect={"active_release": "rel-1"},
    ),
    # -- manual promotion, approval and rollback ----------------------------------------------------------
    Case(
        "Manual: a passing candidate is held for approval",
        status=running(RUNNING_RF),
        jobs=[done(RF_ID, NOW - minutes(1))],
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy({"gates": {"promotion": "Manual"}}),
        actions=[f"record {RF_ID} Succeeded Completed"],
        events=["Normal:RunSucceeded", "Normal:CandidateHeld"],
        expect={"candidate_release": "rel-2", "active_release": "rel-1"},
    ),
    Case(
        "Manual: a held candidate is announced once",
        status=steady(candidate_release="rel-2"),
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2))),
        policy=policy({"gates": {"promotion": "Manual"}}),
        expect={"candidate_release": "rel-2"},
    ),
    Case(
        "approval annotation promotes the candidate",
        status=steady(candidate_release="rel-2"),
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2))),
        policy=policy({"gates": {"promotion": "Manual"}}, annotations={api.ANNOTATION_APPROVE: "rel-2"}),
        actions=["promote rel-2 Manual", "serve rel-2"],
        events=["Normal:Promoted", "Normal:ServeUpdated"],
        expect={"handled_approval": "rel-2", "active_release": "rel-2", "candidate_release": None},
    ),
    Case(
        "approving the newest candidate supersedes the older held ones",
        status=steady(candidate_release="rel-3"),
        registry=registry(
            ACTIVE,
            rel("rel-2", "candidate", created=NOW - minutes(60)),
            rel("rel-3", "candidate", created=NOW - minutes(2)),
        ),
        policy=policy({"gates": {"promotion": "Manual"}}, annotations={api.ANNOTATION_APPROVE: "rel-3"}),
        actions=["promote rel-3 Manual", "reject rel-2", "serve rel-3"],
        events=["Normal:Promoted", "Normal:Superseded", "Normal:ServeUpdated"],
        expect={"candidate_release": None, "active_release": "rel-3"},
    ),
    Case(
        "an approval is acted on once",
        status=steady(candidate_release="rel-2", handled_approval="rel-2"),
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2))),
        policy=policy({"gates": {"promotion": "Manual"}}, annotations={api.ANNOTATION_APPROVE: "rel-2"}),
    ),
    Case(
        "approval of an unknown release is refused",
        policy=policy({"gates": {"promotion": "Manual"}}, annotations={api.ANNOTATION_APPROVE: "rel-9"}),
        events=["Warning:ApprovalRefused"],
        expect={"handled_approval": "rel-9", "active_release": "rel-1"},
    ),
    Case(
        "approval of a candidate that failed its gates is refused (and it is rejected)",
        registry=registry(ACTIVE, rel("rel-3", "candidate", FAILED, created=NOW - minutes(2))),
        policy=policy({"gates": {"promotion": "Manual"}}, annotations={api.ANNOTATION_APPROVE: "rel-3"}),
        actions=["reject rel-3"],
        events=["Warning:ApprovalRefused", "Warning:GatesFailed"],
    ),
    Case(
        "approval in Automatic mode promotes a held candidate",
        status=steady(candidate_release="rel-2"),
        registry=registry(ACTIVE, rel("rel-2", "candidate", created=NOW - minutes(2), run_id=RF_ID)),
        policy=policy(annotations={api.ANNOTATION_APPROVE: "rel-2"}, generation=2),
        actions=["promote rel-2 Manual", "serve rel-2"],
        events=["Normal:Promoted", "Normal:ServeUpdated"],
    ),
    Case(
        "rollback to a retired release",
        registry=registry(rel("rel-0", "retired", created=PREV_FIRE), ACTIVE),
        policy=policy(annotations={api.ANNOTATION_ROLLBACK: "rel-0"}),
        actions=["rollback rel-0", "serve rel-0"],
        events=["Normal:RolledBack", "Normal:ServeUpdated"],
        expect={"handled_rollback": "rel-0", "active_release": "rel-0", "served_release": "rel-0"},
    ),
    Case(
        "rollback to a rejected release is refused",
        registry=registry(rel("rel-0", "rejected", FAILED), ACTIVE),
        policy=policy(annotations={api.ANNOTATION_ROLLBACK: "rel-0"}),
        events=["Warning:RollbackRefused"],
        expect={"handled_rollback": "rel-0", "active_release": "rel-1"},
    ),
    Case(
        "rollback to a release that does not exist is refused",
        policy=policy(annotations={api.ANNOTATION_ROLLBACK: "rel-404"}),
        events=["Warning:RollbackRefused"],
    ),
    Case(
        "rollback to the active release does nothing",
        policy=policy(annotations={api.ANNOTATION_ROLLBACK: "rel-1"}),
        events=["Normal:RollbackNoop"],
    ),
    Case(
        "a rollback is acted on once",
        status=steady(handled_rollback="rel-0", active_release="rel-0", served_release="rel-0"),
        registry=registry(rel("rel-0", "active", activated=NOW - minutes(5)), rel("rel-1", "retired")),
        policy=policy(annotations={api.ANNOTATION_ROLLBACK: "rel-0"}),
    ),
    Case(
        "after a rollback, older candidates are not promoted automatically",
        status=steady(handled_rollback="rel-0", active_release="rel-0", served_release="rel-0"),
        registry=registry(
            rel("rel-0", "active", activated=NOW - minutes(1)),
            rel("rel-1", "retired"),
            rel("rel-2", "candidate", created=NOW - minutes(60)),
        ),
        events=["Normal:CandidateHeld"],
        expect={"candidate_release": "rel-2", "active_release": "rel-0"},
    ),
    # -- backoff ------------------------------------------------------------------------------------------
    Case(
        "a failed fine-tune waits out its backoff",
        status=steady(
            last_fine_tune=ref(FT_ID, FIRE, RunResult.FAILED, NOW - timedelta(seconds=30), "JobFailed"),
            failures=api.FailureCounts(finetune=1),
        ),
        expect={"next_fine_tune_at": NOW + timedelta(seconds=30)},
        conditions={"FineTuning": "False/Backoff", "Degraded": "True/RunFailed"},
    ),
    Case(
        "then retries the same scheduled time",
        status=steady(
            last_fine_tune=ref(FT_ID, FIRE, RunResult.FAILED, NOW - minutes(10), "JobFailed"),
            failures=api.FailureCounts(finetune=1),
        ),
        actions=[f"launch {FT_ID}-r1"],
        events=["Normal:Launched"],
        expect={"last_fine_tune.attempt": 1, "last_fine_tune.scheduled_at": FIRE},
    ),
    Case(
        "backoff grows with consecutive failures",
        status=steady(
            last_fine_tune=ref(f"{FT_ID}-r2", FIRE, RunResult.FAILED, NOW - minutes(3), "JobFailed"),
            failures=api.FailureCounts(finetune=3),
        ),
        expect={"next_fine_tune_at": NOW + minutes(1)},
        conditions={"FineTuning": "False/Backoff"},
    ),
    Case(
        "no retries beyond backoffLimit: wait for the next scheduled time",
        status=steady(
            last_fine_tune=ref(f"{FT_ID}-r3", FIRE, RunResult.FAILED, NOW - timedelta(hours=3), "JobFailed"),
            failures=api.FailureCounts(finetune=4),
        ),
        expect={"next_fine_tune_at": NEXT_FIRE},
        conditions={"Degraded": "True/RunFailed"},
    ),
    Case(
        "the failure that reaches backoffLimit says so",
        status=running(ref(f"{FT_ID}-r3", NOW - timedelta(hours=1)), failures=api.FailureCounts(finetune=3)),
        jobs=[done(f"{FT_ID}-r3", NOW - minutes(1), ok=False)],
        actions=[f"record {FT_ID}-r3 Failed JobFailed"],
        events=["Warning:RunFailed", "Warning:BackoffLimitExceeded"],
        expect={"failures.finetune": 4},
    ),
    Case(
        "a success resets the failure count",
        status=running(ref(f"{FT_ID}-r1", NOW - timedelta(hours=1)), failures=api.FailureCounts(finetune=1)),
        jobs=[done(f"{FT_ID}-r1", NOW - minutes(1))],
        actions=[f"record {FT_ID}-r1 Succeeded Completed"],
        events=["Normal:RunSucceeded"],
        expect={"failures.finetune": 0},
        conditions={"Degraded": "False"},
    ),
    # -- refresh ------------------------------------------------------------------------------------------
    Case(
        "refresh due on the interval grid",
        status=RF_DUE_STATUS,
        actions=[f"launch {RF_ID}"],
        events=["Normal:Launched"],
        expect={"refresh_scheduled_at": RF_FIRE, "next_refresh_at": NOW + timedelta(hours=6)},
        conditions={"Refreshing": "True/Running"},
    ),
    Case(
        "no refresh before a first release",
        status=steady(active_release=None, served_release=None, refresh_scheduled_at=None),
        registry=RegistryView(),
        expect={"next_refresh_at": None},
        conditions={"Refreshing": "False/WaitingForRelease", "Ready": "False/NoActiveRelease", "Fresh": "False"},
    ),
    Case(
        "a refresh due while one runs waits",
        status=running(ref("demo-rf-202503100600", NOW - timedelta(hours=6))),
        jobs=[job("demo-rf-202503100600")],
        expect={"refresh_scheduled_at": RF_FIRE, "active_run_ids": ["demo-rf-202503100600"]},
    ),
    Case(
        "refresh backoff after failures",
        status=steady(
            refresh_scheduled_at=NOW - timedelta(hours=6),
            last_refresh=ref(
                "demo-rf-202503100600", NOW - timedelta(hours=6), RunResult.FAILED, NOW - minutes(1), "JobFailed"
            ),
            failures=api.FailureCounts(refresh=2),
        ),
        expect={"next_refresh_at": NOW + minutes(1)},
        conditions={"Refreshing": "False/Backoff"},
    ),
    Case(
        "stale evidence: Fresh=False",
        registry=registry(rel("rel-1", "active", evidence=NOW - timedelta(hours=30))),
        conditions={"Fresh": "False/Stale", "Ready": "True"},
    ),
    Case(
        "unknown evidence time: Fresh=Unknown",
        registry=registry(rel("rel-1", "active", evidence=None)),
        conditions={"Fresh": "Unknown/NoEvidenceTime"},
    ),
    # -- restarts and lost status -------------------------------------------------------------------------
    Case(
        "status lost while a run is in flight: adopt it, never launch it twice",
        status=None,
        jobs=[job(FT_ID, start=FIRE + minutes(1))],
        actions=["serve rel-1", f"launch {RF_ID}"],
        events=["Normal:RunAdopted", "Normal:ServeUpdated", "Normal:Launched"],
        expect={"active_run_ids": [FT_ID, RF_ID], "fine_tune_scheduled_at": FIRE},
    ),
    Case(
        "status lost after a run finished and its job was pruned: the store remembers it",
        status=None,
        registry=registry(runs=(RunView(FT_ID, FT, "succeeded"),)),
        actions=["serve rel-1", f"launch {RF_ID}"],
        events=["Normal:ServeUpdated", "Normal:Launched"],
        expect={"fine_tune_scheduled_at": FIRE},
    ),
    Case(
        "status lost after a run finished: record it once",
        status=steady(last_fine_tune=None, fine_tune_scheduled_at=None),
        jobs=[done(FT_ID, FIRE + timedelta(hours=2), start=FIRE + minutes(1))],
        actions=[f"record {FT_ID} Succeeded Completed"],
        events=["Normal:RunSucceeded"],
        expect={"fine_tune_scheduled_at": FIRE, "last_fine_tune.result": RunResult.SUCCEEDED},
    ),
    Case(
        "store unavailable: launch nothing, decide nothing, say Degraded",
        status=running(ref(PREV_FT_ID, NOW - minutes(10)), refresh_scheduled_at=NOW - timedelta(hours=6)),
        registry=RegistryView(error="connection refused"),
        expect={"active_run_ids": [PREV_FT_ID], "active_release": "rel-1"},
        conditions={
            "Degraded": "True/RegistryUnavailable",
            "Ready": "Unknown",
            "Refreshing": "False/RegistryUnavailable",
            "FineTuning": "True",
        },
    ),
    # -- serving and history ------------------------------------------------------------------------------
    Case(
        "Serve not yet rolled to the active release (e.g. an earlier RollServe failed)",
        status=steady(served_release=None),
        actions=["serve rel-1"],
        events=["Normal:ServeUpdated"],
    ),
    Case(
        "serving disabled: stop the RayService",
        policy=policy({"serving": {"enabled": False}}),
        actions=["stop-serve"],
        events=["Normal:ServeStopped"],
        expect={"served_release": None},
        conditions={"Ready": "True/Active"},
    ),
    Case(
        "history: keep 3 successful and 1 failed job per kind",
        jobs=[done(f"demo-rf-20250310{h:02d}00", NOW - timedelta(hours=12 - h)) for h in (0, 1, 2, 3, 4)]
        + [done(f"demo-rf-20250309{h:02d}00", NOW - timedelta(hours=30 - h), ok=False) for h in (0, 1)],
        actions=[
            "delete demo-rf-202503100100 History",
            "delete demo-rf-202503100000 History",
            "delete demo-rf-202503090000 History",
        ],
        events=["Normal:JobsPruned", "Normal:JobsPruned"],
    ),
    Case(
        "history: old releases are pruned from the store",
        registry=registry(
            ACTIVE, *(rel(f"old-{i:02d}", "retired", created=CREATED + timedelta(days=i)) for i in range(12))
        ),
        actions=["prune-releases old-01,old-00"],
        events=["Normal:ReleasesPruned"],
    ),
    # -- invalid input ------------------------------------------------------------------------------------
    Case(
        "invalid spec: SpecValid=False, a warning, no launches",
        status=FT_DUE_STATUS,
        policy=policy({"fineTune": {"schedule": "every day"}}),
        events=["Warning:InvalidSpec"],
        conditions={"SpecValid": "False/InvalidSpec"},
        expect={"fine_tune_scheduled_at": PREV_FIRE, "observed_generation": 1},
    ),
    Case(
        "a spec that is not even an object",
        status=None,
        policy=policy(["not", "an", "object"]),
        events=["Warning:InvalidSpec"],
        conditions={"SpecValid": "False/InvalidSpec"},
    ),
    Case(
        "unreadable status is reset, with a warning",
        status={"activeRuns": "garbage"},
        registry=registry(runs=(RunView(FT_ID, FT, "succeeded"),)),
        actions=["serve rel-1", f"launch {RF_ID}"],
        events=["Warning:StatusReset", "Normal:ServeUpdated", "Normal:Launched"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan(case: Case) -> None:
    result = plan(case.policy, case.status, case.jobs, case.registry, case.now)
    summary = [summarize(a) for a in result.actions]
    assert [s for s in summary if " " in s or s == "stop-serve"] == case.actions
    assert [s for s in summary if " " not in s and s != "stop-serve"] == case.events
    for path, expected in case.expect.items():
        assert lookup(result.status, path) == expected, path
    by_type = {c.type.value: c for c in result.status.conditions}
    for type_, expected in case.conditions.items():
        got = by_type[type_]
        assert f"{got.status.value}/{got.reason}".startswith(expected), f"{type_}: {got.status.value}/{got.reason}"
    # whatever happened, the status is a valid PolicyStatus and round-trips through its wire form
    assert PolicyStatus.model_validate(result.status_patch()) == result.status


def test_plan_is_pure() -> None:
    """Same inputs, same plan; the input status is not modified."""
    status = running(RUNNING_PREV_FT, **FT_DUE)
    before = status.model_copy(deep=True)
    args = (policy({"fineTune": {"concurrencyPolicy": "Replace"}}), status, [job(PREV_FT_ID)], registry(), NOW)
    assert plan(*args) == plan(*args)
    assert status == before


def test_replan_after_applying_is_quiet() -> None:
    """Feeding a plan's status back (as if its actions were applied) gives no new decisions."""
    first = plan(policy(), FT_DUE_STATUS, [], registry(), NOW)
    assert [summarize(a) for a in first.of(LaunchRun)] == [f"launch {FT_ID}"]
    second = plan(policy(), first.status, [job(FT_ID, start=NOW)], registry(), NOW + minutes(1))
    assert second.actions == ()


def test_invalid_spec_warns_once() -> None:
    bad = policy({"fineTune": {"schedule": "every day"}})
    first = plan(bad, steady(), [], registry(), NOW)
    assert [summarize(a) for a in first.actions] == ["Warning:InvalidSpec"]
    again = plan(bad, first.status, [], registry(), NOW + minutes(1))
    assert again.actions == ()
    fixed = plan(policy(generation=2), again.status, [], registry(), NOW + minutes(2))
    assert {c.type.value: c.status.value for c in fixed.status.conditions}["SpecValid"] == "True"


def test_launch_config_is_the_entrypoint_contract() -> None:
    raw = {"model": {"base": "Qwen/Qwen2-0.5B"}, "fineTune": {"window": "90d"}, "store": {"schema": "movies"}}
    result = plan(policy(raw), FT_DUE_STATUS, [], registry(), NOW)
    (launch,) = result.of(LaunchRun)
    assert (launch.kind, launch.run_id, launch.job_name, launch.scheduled_at) == (FT, FT_ID, FT_ID, FIRE)
    assert launch.generation == 1 and launch.attempt == 0
    c = launch.config
    assert c["runId"] == FT_ID and c["kind"] == "finetune" and c["policy"] == "demo" and c["namespace"] == "ml"
    assert c["window"] == {"start": "2024-12-01T03:00:00Z", "end": "2025-03-01T03:00:00Z"}
    assert c["storeSchema"] == "movies" and c["activeRelease"] == "rel-1"
    assert c["model"]["base"] == "Qwen/Qwen2-0.5B"
    assert c["fineTune"]["hyperparameters"]["withEvidence"] is True
    assert "schedule" not in c["fineTune"]  # scheduling is the controller's business
    assert c["gates"] == {"minExactMatch": 0.9, "minRecall": 0.015, "maxRegression": 0.002}
    assert c["retrieval"]["topSuccessors"] == 1 and "refreshInterval" not in c["retrieval"]

    refresh = plan(policy(raw), RF_DUE_STATUS, [], registry(), NOW)
    (launch,) = refresh.of(LaunchRun)
    assert launch.config["window"] == {"start": "2025-02-08T12:00:00Z", "end": "2025-03-10T12:00:00Z"}
    assert "fineTune" not in launch.config


def test_blend_reaches_the_run_config_and_its_hash_only_when_set() -> None:
    unset = PolicySpec()
    assert unset.retrieval.blend == 0.0  # the default ranks by the LLM alone
    c = run_config("demo", "ml", unset, RF, "x", NOW, None)
    assert "blend" not in c["retrieval"]  # so a policy without it keeps the config hash it had before blend
    blended = PolicySpec.model_validate({"retrieval": {"blend": 0.4}})
    assert run_config("demo", "ml", blended, RF, "x", NOW, None)["retrieval"]["blend"] == 0.4
    assert config_hash("demo", "ml", blended, RF) != config_hash("demo", "ml", unset, RF)


def test_roll_serve_user_config() -> None:
    result = plan(policy(), steady(served_release=None), [], registry(), NOW)
    (roll,) = result.of(RollServe)
    assert roll.user_config == {
        "release_id": "rel-1",
        "adapter_uri": "file:///adapters/rel-1",
        "table_version": "t-rel-1",
        "store_schema": "demo",
    }


def test_wake_at_is_the_earliest_due_time() -> None:
    assert plan(policy(), steady(), [], registry(), NOW).wake_at == NOW + timedelta(hours=6)
    backoff = steady(
        last_fine_tune=ref(FT_ID, FIRE, RunResult.FAILED, NOW - timedelta(seconds=30), "JobFailed"),
        failures=api.FailureCounts(finetune=1),
    )
    assert plan(policy(), backoff, [], registry(), NOW).wake_at == NOW + timedelta(seconds=30)
    unseen = running(ref(RF_ID, NOW - timedelta(seconds=10)))
    assert plan(policy(), unseen, [], registry(), NOW).wake_at == NOW + timedelta(seconds=50)


def test_conditions_keep_their_transition_time() -> None:
    first = plan(policy(), steady(), [], registry(), NOW)
    later = plan(policy(), first.status, [], registry(), NOW + minutes(5))
    for a, b in zip(first.status.conditions, later.status.conditions, strict=True):
        assert a.last_transition_time == b.last_transition_time == NOW


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        plan(policy(), None, [], registry(), datetime(2025, 1, 1))


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("name", "kind", "attempt"),
    [
        ("demo", FT, 0),
        ("demo", RF, 2),
        ("My_Policy.v2", FT, 0),
        ("a" * 63, FT, 0),
        ("a" * 40 + "-" + "b" * 20, RF, 12),
        ("-weird--name-", RF, 0),
    ],
)
def test_run_names(name: str, kind: RunKind, attempt: int) -> None:
    when = datetime(2025, 3, 1, 3, 0, 42, tzinfo=UTC)
    rid = run_name(name, kind, when, attempt)
    assert len(rid) <= 63 and DNS_LABEL.match(rid), rid
    assert parse_run_name(rid) == (when.replace(second=0), attempt)
    assert rid == run_name(name, kind, when, attempt)


def test_long_names_stay_unique() -> None:
    a = run_name("x" * 60 + "a", FT, FIRE)
    b = run_name("x" * 60 + "b", FT, FIRE)
    assert a != b and len(a) <= 63


@pytest.mark.parametrize(
    ("gates", "passed"),
    [
        ({"passed": True}, True),
        ({"passed": False}, False),
        ({"exact_match": {"passed": True}, "recall": {"passed": True}}, True),
        ({"exact_match": {"passed": True}, "recall": {"passed": False, "value": 0.01, "threshold": 0.015}}, False),
        ({"passed": True, "recall": {"passed": False}}, False),  # a failed check wins over the summary
        ({}, False),
        ({"metrics": 3}, False),
    ],
)
def test_gates_verdict(gates: dict[str, Any], passed: bool) -> None:
    ok, reasons = gates_verdict(gates)
    assert ok is passed
    assert bool(reasons) is not passed
