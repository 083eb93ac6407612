"""The planner's analysis on live events (gates.analysis, docs/analysis.md): table-driven, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from recupdate_operator.api import (
    ANNOTATION_APPROVE,
    ANNOTATION_ROLLBACK,
    AnalysisMode,
    AnalysisPhase,
    AnalysisStatus,
    ConditionType,
    PolicySpec,
    PolicyStatus,
)
from recupdate_operator.planner import (
    AnalysisFigures,
    Event,
    Plan,
    Policy,
    Promote,
    RecordAnalysis,
    RegistryView,
    Reject,
    ReleaseView,
    Rollback,
    RollServe,
    plan,
)

NOW = datetime(2025, 3, 10, 12, 1, tzinfo=UTC)
START = NOW - timedelta(minutes=30)
PASSED = {"passed": True}


def spec(mode: str = "Shadow", **analysis: Any) -> dict[str, Any]:
    a = {"mode": mode, "duration": "1h", "minEvents": 100, "maxRegression": 0.01, **analysis}
    # Nothing due: schedules far apart, refreshes every 12h (the window must be shorter than the interval).
    return {
        "gates": {"analysis": a},
        "retrieval": {"refreshInterval": "12h", "maxStaleness": "7d"},
        "fineTune": {"initialRun": False},
    }


def rel(release_id: str, state: str, created: datetime, activated: datetime | None = None) -> ReleaseView:
    return ReleaseView(
        release_id=release_id,
        state=state,
        gates=PASSED,
        created_at=created,
        activated_at=activated,
        evidence_at=NOW - timedelta(hours=1),
        adapter_uri=None,
        table_version=release_id.removeprefix("rel-"),
    )


ACTIVE = rel("rel-1", "active", NOW - timedelta(days=2), NOW - timedelta(days=2))
OLD = rel("rel-0", "retired", NOW - timedelta(days=5), NOW - timedelta(days=5))
CAND = rel("rel-2", "candidate", START - timedelta(minutes=1))
NEWER = rel("rel-3", "candidate", NOW - timedelta(minutes=1))


def running(mode: AnalysisMode = AnalysisMode.SHADOW, **kw: Any) -> AnalysisStatus:
    return AnalysisStatus(
        release_id="rel-2",
        baseline_release="rel-1",
        mode=mode,
        traffic_percent=10 if mode == AnalysisMode.CANARY else 0,
        started_at=START,
        ends_at=START + timedelta(hours=1),
        **kw,
    )


def status(analysis: AnalysisStatus | None = None, **kw: Any) -> PolicyStatus:
    return PolicyStatus(active_release="rel-1", served_release="rel-1", analysis=analysis, **kw)


def figures(cand: tuple[int, int], base: tuple[int, int], release: str = "rel-2") -> AnalysisFigures:
    return AnalysisFigures(release, "rel-1", cand[0], cand[1], base[0], base[1])


@dataclass
class Case:
    id: str
    status: PolicyStatus
    releases: tuple[ReleaseView, ...] = (ACTIVE, CAND)
    measured: AnalysisFigures | None = None
    now: datetime = NOW
    mode: str = "Shadow"
    annotations: dict[str, str] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)  # the release actions, in order
    events: list[str] = field(default_factory=list)  # reasons that must be among the Events
    phase: str | None = None  # status.analysis.phase afterwards
    analyzing: str = ""  # the Analyzing condition: "True/Reason" or "False/Reason"


def summary(p: Plan) -> list[str]:
    out = []
    for a in p.actions:
        if isinstance(a, Promote):
            out.append(f"promote {a.release_id} {a.reason}")
        elif isinstance(a, Reject):
            out.append(f"reject {a.release_id}")
        elif isinstance(a, Rollback):
            out.append(f"rollback {a.release_id}")
        elif isinstance(a, RecordAnalysis):
            out.append(f"record {a.release_id} {a.verdict}")
        elif isinstance(a, RollServe):
            canary = a.user_config.get("canary")
            out.append(f"serve {a.release_id}" + (f" canary {canary['release_id']}" if canary else ""))
    return out


CASES = [
    Case(
        "a passing candidate enters analysis instead of being promoted",
        status(),
        events=["AnalysisStarted"],
        phase="Running",
        analyzing="True/Shadow",
    ),
    Case(
        "while it runs, the figures go into status and nothing is decided",
        status(running()),
        measured=figures((150, 30), (150, 30)),
        phase="Running",
        analyzing="True/Shadow",
    ),
    Case(
        "at the end of its window, no worse beyond maxRegression: promoted",
        status(running()),
        measured=figures((400, 80), (400, 82)),
        now=START + timedelta(hours=1),
        actions=["record rel-2 Promoted", "promote rel-2 Automatic", "serve rel-2"],
        events=["AnalysisPromoted", "Promoted"],
        phase="Promoted",
        analyzing="False/Promoted",
    ),
    Case(
        "a regression beyond maxRegression over minEvents aborts at once",
        status(running()),
        measured=figures((200, 20), (200, 40)),
        actions=["record rel-2 Aborted", "reject rel-2"],
        events=["AnalysisAborted"],
        phase="Aborted",
        analyzing="False/Aborted",
    ),
    Case(
        "a regression on fewer than minEvents decides nothing yet",
        status(running()),
        measured=figures((50, 0), (50, 25)),
        phase="Running",
    ),
    Case(
        "the window ends without minEvents: inconclusive, held (not promoted, not rejected)",
        status(running()),
        measured=figures((40, 20), (40, 10)),
        now=START + timedelta(hours=1, minutes=1),
        actions=["record rel-2 Inconclusive"],
        events=["AnalysisInconclusive", "CandidateHeld"],
        phase="Inconclusive",
        analyzing="False/Inconclusive",
    ),
    Case(
        "an inconclusive candidate stays held on the next reconcile",
        status(running(phase=AnalysisPhase.INCONCLUSIVE), candidate_release="rel-2"),
        now=START + timedelta(hours=2),
        phase="Inconclusive",
    ),
    Case(
        "an inconclusive candidate can be approved",
        status(running(phase=AnalysisPhase.INCONCLUSIVE), candidate_release="rel-2"),
        annotations={ANNOTATION_APPROVE: "rel-2"},
        actions=["promote rel-2 Manual", "serve rel-2"],
        phase="Inconclusive",
    ),
    Case(
        "approval during the analysis promotes and cancels it",
        status(running()),
        annotations={ANNOTATION_APPROVE: "rel-2"},
        actions=["promote rel-2 Manual", "record rel-2 Cancelled", "serve rel-2"],
        events=["AnalysisCancelled"],
        phase="Cancelled",
        analyzing="False/Cancelled",
    ),
    Case(
        "a rollback during the analysis changes its baseline: cancelled",
        status(running()),
        releases=(OLD, ACTIVE, CAND),
        annotations={ANNOTATION_ROLLBACK: "rel-0"},
        actions=["rollback rel-0", "record rel-2 Cancelled", "serve rel-0"],
        events=["RolledBack", "AnalysisCancelled"],
        phase="Cancelled",
    ),
    Case(
        "a newer candidate restarts the analysis with it",
        status(running()),
        releases=(ACTIVE, CAND, NEWER),
        actions=["record rel-2 Cancelled"],
        events=["AnalysisCancelled", "AnalysisStarted"],
        phase="Running",
    ),
    Case(
        "canary: the candidate rides along in the same Serve config",
        status(),
        mode="Canary",
        actions=["serve rel-1 canary rel-2"],
        events=["AnalysisStarted", "CanaryStarted"],
        phase="Running",
        analyzing="True/Canary",
    ),
    Case(
        "canary aborted: Serve goes back to the active release alone",
        status(running(AnalysisMode.CANARY), served_canary="rel-2"),
        mode="Canary",
        measured=figures((150, 10), (1500, 300)),
        actions=["record rel-2 Aborted", "reject rel-2", "serve rel-1"],
        events=["AnalysisAborted", "CanaryStopped"],
        phase="Aborted",
    ),
    Case(
        "canary promoted: the candidate serves everyone",
        status(running(AnalysisMode.CANARY), served_canary="rel-2"),
        mode="Canary",
        measured=figures((150, 30), (1500, 300)),
        now=START + timedelta(hours=1),
        actions=["record rel-2 Promoted", "promote rel-2 Automatic", "serve rel-2"],
        phase="Promoted",
    ),
    Case(
        "no active release to compare with: the first release is promoted at once",
        PolicyStatus(),
        releases=(CAND,),
        actions=["promote rel-2 Automatic", "serve rel-2"],
        phase=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_analysis(case: Case) -> None:
    policy = Policy("demo", "ml", spec(case.mode), 1, case.annotations, NOW - timedelta(days=30))
    view = RegistryView(releases=case.releases, analysis=case.measured)
    p = plan(policy, case.status, [], view, case.now)
    assert summary(p) == case.actions
    reasons = [a.reason for a in p.of(Event)]
    for r in case.events:
        assert r in reasons, reasons
    a = p.status.analysis
    assert (a.phase.value if a else None) == case.phase
    if case.analyzing:
        cond = next(c for c in p.status.conditions if c.type == ConditionType.ANALYZING)
        assert f"{cond.status.value}/{cond.reason}" == case.analyzing
    assert not [e for e in p.of(Event) if e.reason == "ServeUpdated" and "rel-1" in e.message]


def test_start_records_the_window_and_wakes_to_measure() -> None:
    p = plan(
        Policy("demo", "ml", spec(), 1, {}, NOW - timedelta(days=30)),
        status(),
        [],
        RegistryView((), (ACTIVE, CAND)),
        NOW,
    )
    a = p.status.analysis
    assert a is not None and a.release_id == "rel-2" and a.baseline_release == "rel-1"
    assert a.started_at == NOW and a.ends_at == NOW + timedelta(hours=1)
    assert p.wake_at is not None and p.wake_at <= NOW + timedelta(minutes=3)  # 1h / 20
    assert p.status.candidate_release == "rel-2"


def test_figures_and_verdict_are_recorded() -> None:
    st = status(running())
    p = plan(
        Policy("demo", "ml", spec(), 1, {}, NOW - timedelta(days=30)),
        st,
        [],
        RegistryView((), (ACTIVE, CAND), analysis=figures((200, 20), (200, 40))),
        NOW,
    )
    rec = p.of(RecordAnalysis)[0]
    assert rec.figures["candidateHitRate"] == pytest.approx(0.1)
    assert rec.figures["baselineHitRate"] == pytest.approx(0.2)
    assert rec.figures["phase"] == "Aborted"
    reject = p.of(Reject)[0]
    assert "0.1000" in reject.reasons[0] and "0.2000" in reject.reasons[0]


def test_figures_of_another_analysis_are_ignored() -> None:
    p = plan(
        Policy("demo", "ml", spec(), 1, {}, NOW - timedelta(days=30)),
        status(running()),
        [],
        RegistryView((), (ACTIVE, CAND), analysis=figures((500, 0), (500, 400), release="rel-9")),
        NOW,
    )
    assert not p.of(Reject) and p.status.analysis is not None and p.status.analysis.candidate_events == 0


def test_a_measure_error_is_shown_and_the_analysis_goes_on() -> None:
    fig = AnalysisFigures("rel-2", "rel-1", error="store error: timeout")
    p = plan(
        Policy("demo", "ml", spec(), 1, {}, NOW - timedelta(days=30)),
        status(running()),
        [],
        RegistryView((), (ACTIVE, CAND), analysis=fig),
        NOW,
    )
    a = p.status.analysis
    assert a is not None and a.phase == AnalysisPhase.RUNNING and "timeout" in a.message


def test_replan_after_applying_is_quiet() -> None:
    pol = Policy("demo", "ml", spec(), 1, {}, NOW - timedelta(days=30))
    view = RegistryView((), (ACTIVE, CAND))
    first = plan(pol, status(), [], view, NOW)
    again = plan(pol, first.status, [], RegistryView((), (ACTIVE, CAND), analysis=figures((1, 0), (1, 0))), NOW)
    assert summary(again) == [] and not [e for e in again.of(Event) if e.reason.startswith("Analysis")]


def test_analysis_must_be_shorter_than_the_refresh_interval() -> None:
    with pytest.raises(ValidationError, match=r"shorter than retrieval\.refreshInterval"):
        PolicySpec.model_validate({"gates": {"analysis": {"duration": "6h"}}})
    with pytest.raises(ValidationError):
        PolicySpec.model_validate({"gates": {"analysis": {"mode": "Canary", "trafficPercent": 80}}})
    assert PolicySpec.model_validate({"gates": {"analysis": {}}}).gates.analysis is not None
