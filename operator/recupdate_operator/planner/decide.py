"""The controller's brain, pure: (policy, status, observed jobs, registry, now) -> Plan.

No I/O, no kopf, no Kubernetes client, no Ray: the same function drives the operator (handlers.py) and
local mode on a simulated clock, and is tested table-driven without any of them.

How a caller applies a Plan:
  1. Read the observed jobs (the policy's RayJobs or local jobs) first, then the registry, then call plan().
  2. Apply `plan.actions` in order. If one fails, stop and do NOT write the status: the next reconcile
     recomputes the same decisions (launches are idempotent by their deterministic names; promotions are
     derived from the registry, and RollServe from registry-active vs status.servedRelease).
  3. Patch the status subresource with `plan.status_patch()` (JSON merge patch: None deletes a key).
  4. Reconcile again at `plan.wake_at` at the latest (a timer), or on any change of the policy or its jobs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from recupdate_workloads.contract.drift import DriftRule, drift_fire
from recupdate_workloads.contract.serve import canary_keys, release_keys
from recupdate_workloads.contract.timefmt import iso

from .. import schedule
from ..api import (
    ANNOTATION_APPROVE,
    ANNOTATION_ROLLBACK,
    AnalysisMode,
    AnalysisPhase,
    AnalysisSpec,
    AnalysisStatus,
    ChangeStatus,
    ConcurrencyPolicy,
    ConditionStatus,
    ConditionType,
    PolicySpec,
    PolicyStatus,
    Promotion,
    RunCost,
    RunKind,
    RunRef,
    RunResult,
    SyncStatus,
    parse_duration,
    schema_name,
    validate_spec,
)
from ..conditions import get_condition, set_condition
from .actions import (
    Action,
    DeleteJob,
    Event,
    LaunchRun,
    Plan,
    Promote,
    PruneReleases,
    RecordAnalysis,
    RecordRun,
    Reject,
    Rollback,
    RollServe,
    StopServe,
)
from .drift import adapter_of, newest_drift
from .inputs import JOB_APPEAR_GRACE, NOT_A_FAULT, ObservedJob, Policy, RegistryView, ReleaseView, owner_conflict
from .naming import _fmt, config_hash, gates_verdict, parse_run_name, run_config, run_name


def plan(
    policy: Policy,
    status: PolicyStatus | Mapping[str, Any] | None,
    observed_jobs: Iterable[ObservedJob],
    registry: RegistryView,
    now: datetime,
) -> Plan:
    """Decide what to do now. Never raises on bad input: an invalid spec gives SpecValid=False."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return _Planner(policy, status, list(observed_jobs), registry, now.astimezone(UTC)).run()


class _Planner:
    def __init__(
        self,
        policy: Policy,
        status: PolicyStatus | Mapping[str, Any] | None,
        jobs: list[ObservedJob],
        registry: RegistryView,
        now: datetime,
    ) -> None:
        self.policy = policy
        self.jobs = {j.run_id: j for j in jobs}
        self.registry = registry
        self.now = now
        self.actions: list[Action] = []
        self.wake: list[datetime] = []
        self.s = self._parse_status(status)
        self.s.observed_generation = policy.generation
        self.waiting: dict[RunKind, str] = {}  # why a due run did not launch, for the conditions
        self.spec = PolicySpec()
        # (latest at or before now, next after now); None for fine-tunes without a cron schedule
        self.fires: dict[RunKind, tuple[datetime, datetime] | None] = {}
        self.drift_note = ""  # why a drift-triggered fine-tune launched, for its event

    # -- helpers -------------------------------------------------------------------------------------------

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(Event(type_, reason, message))

    def condition(self, type_: ConditionType, status: ConditionStatus | bool, reason: str, msg: str) -> None:
        self.s.conditions = set_condition(
            self.s.conditions, type_, status, reason, msg, self.now, self.policy.generation
        )

    def _parse_status(self, raw: PolicyStatus | Mapping[str, Any] | None) -> PolicyStatus:
        if isinstance(raw, PolicyStatus):
            return raw.model_copy(deep=True)
        try:
            return PolicyStatus.model_validate(dict(raw or {}))
        except ValidationError as exc:
            self.event("Warning", "StatusReset", f"unreadable status was reset: {_short(exc)}")
            return PolicyStatus()

    def last(self, kind: RunKind) -> RunRef | None:
        return self.s.last_fine_tune if kind == RunKind.FINETUNE else self.s.last_refresh

    def set_last(self, kind: RunKind, ref: RunRef) -> None:
        if kind == RunKind.FINETUNE:
            self.s.last_fine_tune = ref
        else:
            self.s.last_refresh = ref

    def active(self, kind: RunKind) -> list[RunRef]:
        return [r for r in self.s.active_runs if r.kind == kind]

    def scheduled_mark(self, kind: RunKind) -> datetime | None:
        return self.s.fine_tune_scheduled_at if kind == RunKind.FINETUNE else self.s.refresh_scheduled_at

    def mark_scheduled(self, kind: RunKind, when: datetime) -> None:
        mark = self.scheduled_mark(kind)
        if mark is not None and mark >= when:
            return
        if kind == RunKind.FINETUNE:
            self.s.fine_tune_scheduled_at = when
        else:
            self.s.refresh_scheduled_at = when

    def failures(self, kind: RunKind) -> int:
        return self.s.failures.finetune if kind == RunKind.FINETUNE else self.s.failures.refresh

    def set_failures(self, kind: RunKind, n: int) -> None:
        if kind == RunKind.FINETUNE:
            self.s.failures.finetune = n
        else:
            self.s.failures.refresh = n

    # -- main ----------------------------------------------------------------------------------------------

    def run(self) -> Plan:
        spec = self._validate_spec()
        if spec is None:
            return Plan(tuple(self.actions), self.s, None)
        self.spec = spec
        self._track_runs()
        self._last_sync()
        self._last_change()
        self._last_drift()
        active = self._decide_releases()
        for kind in (RunKind.FINETUNE, RunKind.REFRESH):
            self._schedule(kind, active)
        self._prune_jobs()
        self._set_conditions(active)
        wake = min(self.wake) if self.wake else None
        return Plan(tuple(self.actions), self.s, wake)

    def _last_sync(self) -> None:
        """status.lastSync: the newest run (the registry lists them oldest first) that recorded a sync."""
        for run in reversed(self.registry.runs):
            sync = run.sync
            if isinstance(sync, Mapping) and "rows" in sync:
                skipped = sync.get("skipped") or {}
                self.s.last_sync = SyncStatus(
                    run_id=run.run_id,
                    rows=int(sync.get("rows") or 0),
                    new=int(sync.get("new") or 0),
                    duplicate=int(sync.get("duplicate") or 0),
                    skipped={str(k): int(v) for k, v in skipped.items()} if isinstance(skipped, Mapping) else {},
                    files=int(sync.get("files") or 0),
                    seconds=float(sync.get("seconds") or 0.0),
                )
                return

    def _last_change(self) -> None:
        """status.lastChange: the newest release whose job measured its change against the active table
        (releases.metrics.change, jobs/change.py); an Event when it is a new one."""
        for rel in reversed(self.registry.releases):
            change = rel.metrics.get("change")
            if not isinstance(change, Mapping) or "top1Changed" not in change:
                continue
            if self.s.last_change is not None and self.s.last_change.release_id == rel.release_id:
                return
            run = self.registry.run(rel.run_id) if rel.run_id else None
            try:
                last = ChangeStatus(
                    release_id=rel.release_id,
                    kind=run.kind if run is not None else None,
                    against=str(change.get("against") or ""),
                    pairs=int(change.get("pairs") or 0),
                    top1_changed=float(change["top1Changed"]),
                    top5_overlap=float(change.get("top5Overlap", 1.0)),
                    new_pairs=int(change.get("newPairs") or 0),
                    dropped_pairs=int(change.get("droppedPairs") or 0),
                )
            except (ValidationError, TypeError, ValueError):
                continue  # a malformed record is not shown
            self.s.last_change = last
            kind = f"{last.kind.value} " if last.kind else ""
            self.event(
                "Normal",
                "CandidateChange",
                f"{kind}candidate {last.release_id} against {last.against or 'the active release'}: top-1 changed "
                f"for {last.top1_changed:.1%} of {last.pairs} pairs, top-5 overlap {last.top5_overlap:.2f}",
            )
            return

    def _cost(self, run_id: str) -> RunCost | None:
        """A run's cost from its registry row (runs.cost), None when it recorded none."""
        row = None if self.registry.error else self.registry.run(run_id)
        cost = row.cost if row is not None else None
        if not isinstance(cost, Mapping) or not cost:
            return None
        sync = cost.get("sync")
        try:
            return RunCost(
                cpu_seconds=max(0.0, float(cost.get("cpuSeconds") or 0.0)),
                gpu_seconds=max(0.0, float(cost.get("gpuSeconds") or 0.0)),
                training_tokens=max(0, int(cost.get("tokens") or 0)),
                wall_seconds=max(0.0, float(cost.get("wallSeconds") or 0.0)),
                rows_ingested=max(0, int(sync.get("new") or 0)) if isinstance(sync, Mapping) else 0,
            )
        except (TypeError, ValueError):
            return None

    def _last_drift(self) -> None:
        """status.lastDrift: the newest release whose run measured drift (a refresh, docs/spec.md)."""
        m = newest_drift(self.registry.releases)
        if m is not None:
            self.s.last_drift = m.status()

    def _validate_spec(self) -> PolicySpec | None:
        raw = self.policy.spec
        try:
            # The same validation as local mode (api.validate_spec): JSON types strictly, as the CRD types them.
            spec = raw if isinstance(raw, PolicySpec) else validate_spec(raw)
        except (ValidationError, TypeError, ValueError) as exc:
            self._invalid(_short(exc))
            return None
        # Scheduling can fail where validation cannot see it (a time zone's rules at this `now`): report it on
        # the policy rather than raise, so one policy never stops the operator.
        try:
            self.fires = self._fires(spec)
        except (ValueError, OverflowError) as exc:  # croniter's CroniterBadDateError is a ValueError
            self._invalid(str(exc)[:500])
            return None
        # Another policy's schema: refused like an invalid spec, so nothing is launched, recorded or served.
        schema = schema_name(self.policy.name, spec)
        owner = self.registry.owner
        conflict = owner_conflict(owner, self.policy.namespace, self.policy.name, schema)
        if conflict is not None:
            old = get_condition(self.s.conditions, ConditionType.SPEC_VALID)
            if old is None or old.status != ConditionStatus.FALSE or old.message != conflict:
                self.event("Warning", "SchemaInUse", conflict)
            self.condition(ConditionType.SPEC_VALID, False, "SchemaInUse", conflict)
            return None
        if owner is not None and owner.previous_uid:
            self.event(
                "Normal",
                "SchemaAdopted",
                f"store schema {schema!r} was owned by an earlier {owner.namespace}/{owner.name} "
                f"(uid {owner.previous_uid}); this policy carries on with its releases",
            )
        self.condition(ConditionType.SPEC_VALID, True, "Valid", "")
        return spec

    def _invalid(self, message: str) -> None:
        """SpecValid=False, and a Warning event when the message is new (not one per reconcile)."""
        old = get_condition(self.s.conditions, ConditionType.SPEC_VALID)
        if old is None or old.status != ConditionStatus.FALSE or old.message != message:
            self.event("Warning", "InvalidSpec", message)
        self.condition(ConditionType.SPEC_VALID, False, "InvalidSpec", message)

    def _fires(self, spec: PolicySpec) -> dict[RunKind, tuple[datetime, datetime] | None]:
        """The latest fire at or before now and the next one after it, per kind (no cron: no fine-tune fires)."""
        ft = spec.fine_tune
        try:
            cron = (
                (
                    schedule.prev_cron_fire(ft.schedule, self.now, ft.time_zone),
                    schedule.next_cron_fire(ft.schedule, self.now, ft.time_zone),
                )
                if ft.schedule is not None
                else None
            )
        except (ValueError, OverflowError, KeyError, OSError) as exc:  # KeyError, OSError: zoneinfo's lookups
            raise ValueError(f"fineTune.schedule {ft.schedule!r} ({ft.time_zone}) has no fire time: {exc}") from None
        try:
            interval = parse_duration(spec.retrieval.refresh_interval)
            every = (schedule.prev_interval_fire(interval, self.now), schedule.next_interval_fire(interval, self.now))
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"retrieval.refreshInterval {spec.retrieval.refresh_interval!r}: {exc}") from None
        return {RunKind.FINETUNE: cron, RunKind.REFRESH: every}

    # -- 1. runs in flight ---------------------------------------------------------------------------------

    def _track_runs(self) -> None:
        still: list[RunRef] = []
        for ref in self.s.active_runs:
            outcome = self._outcome(ref, self.jobs.get(ref.run_id))
            if outcome is None:
                still.append(ref)
            else:
                self._finish(ref, *outcome)
        self.s.active_runs = still
        self._adopt_orphans()

    def _outcome(self, ref: RunRef, job: ObservedJob | None) -> tuple[RunResult, str, str, datetime] | None:
        """The end of a run, or None while it is (or may be) still going."""
        row = None if self.registry.error else self.registry.run(ref.run_id)
        if job is None:
            # The job is gone: trust the store if the run got that far (e.g. a TTL removed the job).
            if row is not None and row.status in ("succeeded", "failed"):
                result = RunResult.SUCCEEDED if row.status == "succeeded" else RunResult.FAILED
                return result, "Registered", row.error or "", self.now
            if self.registry.error:
                return None  # cannot tell a deleted job from a finished one without the store
            if ref.started_at is not None and self.now - ref.started_at < JOB_APPEAR_GRACE:
                self.wake.append(ref.started_at + JOB_APPEAR_GRACE)
                return None
            return RunResult.FAILED, "JobDeleted", f"job {ref.job_name or ref.run_id} disappeared", self.now
        if not job.terminal:
            return None
        end = job.end_time or self.now
        if job.succeeded:
            if row is not None and row.status == "failed":
                return RunResult.FAILED, "RunFailed", row.error or "the run registered a failure", end
            return RunResult.SUCCEEDED, "Completed", "", end
        if job.job_deployment_status == "Complete":
            reason = "JobFailed"
            message = job.message or f"Ray job ended {job.job_status or 'without status'}"
        else:
            reason = job.reason or f"Job{job.job_deployment_status}"
            message = job.message
        return RunResult.FAILED, reason, message, end

    def _finish(self, ref: RunRef, result: RunResult, reason: str, message: str, end: datetime) -> None:
        kind = ref.kind
        cost = self._cost(ref.run_id)
        done = ref.model_copy(
            update={"result": result, "reason": reason, "message": message, "finished_at": end, "cost": cost}
        )
        last = self.last(kind)
        if last is None or last.run_id == ref.run_id or _after(ref.started_at, last.started_at):
            self.set_last(kind, done)
        self.actions.append(RecordRun(ref.run_id, kind, result, reason, message, cost))
        note = ""
        if ref.generation is not None and ref.generation != self.policy.generation:
            note = f" (launched for spec generation {ref.generation}, now {self.policy.generation})"
        if cost is not None:
            note += f"; cost {_cost_text(cost)}"
        if result == RunResult.SUCCEEDED:
            self.set_failures(kind, 0)
            self.event("Normal", "RunSucceeded", f"{kind.value} {ref.run_id} succeeded{note}")
            return
        if reason in NOT_A_FAULT:
            self.event("Normal", reason, f"{kind.value} {ref.run_id} stopped: {message}")
            return
        self.set_failures(kind, self.failures(kind) + 1)
        detail = f": {message}" if message else ""
        self.event("Warning", "RunFailed", f"{kind.value} {ref.run_id} failed ({reason}){detail}{note}")
        limit = self.spec.fine_tune.backoff_limit
        if kind == RunKind.FINETUNE and ref.attempt >= limit:
            self.event(
                "Warning",
                "BackoffLimitExceeded",
                f"fine-tune for {_fmt(ref.scheduled_at)} failed {ref.attempt + 1} time(s); "
                "waiting for the next scheduled time",
            )

    def _adopt_orphans(self) -> None:
        """Jobs the status does not know about: launched just before a status write was lost."""
        known = {r.run_id for r in self.s.active_runs}
        for job in sorted(self.jobs.values(), key=lambda j: (j.start_time or self.now, j.run_id)):
            if job.run_id in known:
                continue
            last = self.last(job.kind)
            if last is not None and (last.run_id == job.run_id or not _after(job.start_time, last.started_at)):
                continue  # already recorded, or history
            parsed = parse_run_name(job.run_id)
            ref = RunRef(
                run_id=job.run_id,
                kind=job.kind,
                job_name=job.name,
                scheduled_at=parsed[0] if parsed else None,
                attempt=parsed[1] if parsed else 0,
                generation=job.generation,
                started_at=job.start_time or self.now,
            )
            if ref.scheduled_at is not None:
                self.mark_scheduled(job.kind, ref.scheduled_at)
            self.set_last(job.kind, ref)
            outcome = self._outcome(ref, job)
            if outcome is None:
                self.s.active_runs.append(ref)
                self.event("Normal", "RunAdopted", f"{job.kind.value} {job.run_id} is running")
            else:
                self._finish(ref, *outcome)

    # -- 2. releases ---------------------------------------------------------------------------------------

    def _decide_releases(self) -> _Release | None:
        """Rollback, approval, promotion and rejection of candidates, and rolling Serve. Returns the release
        that is active once the actions are applied."""
        if self.registry.error:
            return None
        reg_active = self.registry.active()
        active = _Release.of(reg_active) if reg_active else None
        touched: set[str] = set()

        rollback_to = self.policy.annotations.get(ANNOTATION_ROLLBACK)
        if rollback_to and rollback_to != self.s.handled_rollback:
            self.s.handled_rollback = rollback_to
            target = self.registry.release(rollback_to)
            if target is None:
                self.event("Warning", "RollbackRefused", f"release {rollback_to} does not exist")
            elif target.state == "rejected":
                self.event("Warning", "RollbackRefused", f"release {rollback_to} was rejected")
            elif active is not None and active.id == rollback_to:
                self.event("Normal", "RollbackNoop", f"release {rollback_to} is already active")
            else:
                self.actions.append(Rollback(rollback_to))
                self.event("Normal", "RolledBack", f"release {rollback_to} re-activated")
                active = _Release.of(target, activated_at=self.now)
                touched.add(rollback_to)

        approve = self.policy.annotations.get(ANNOTATION_APPROVE)
        if approve and approve != self.s.handled_approval:
            self.s.handled_approval = approve
            target = self.registry.release(approve)
            passed, reasons = gates_verdict(target.gates) if target else (False, [])
            if target is None:
                self.event("Warning", "ApprovalRefused", f"release {approve} does not exist")
            elif active is not None and active.id == approve:
                self.event("Normal", "ApprovalNoop", f"release {approve} is already active")
            elif target.state != "candidate":
                self.event("Warning", "ApprovalRefused", f"release {approve} is {target.state}, not a candidate")
            elif not passed:
                self.event("Warning", "ApprovalRefused", f"release {approve} failed its gates: {', '.join(reasons)}")
            else:
                self.actions.append(Promote(approve, "Manual"))
                self.event("Normal", "Promoted", f"release {approve} promoted by approval")
                active = _Release.of(target, activated_at=self.now)
                touched.add(approve)

        active = self._decide_candidates(active, touched)
        self._roll_serve(active)
        self._prune_releases(touched | ({active.id} if active else set()))
        return active

    def _decide_candidates(self, active: _Release | None, touched: set[str]) -> _Release | None:
        candidates = sorted(
            (r for r in self.registry.releases if r.state == "candidate" and r.release_id not in touched),
            key=lambda r: (r.created_at or self.now, r.release_id),
        )
        self._cancel_stale_analysis(active, {c.release_id for c in candidates}, touched)
        running = {r.run_id for r in self.s.active_runs}
        passing: list[tuple[ReleaseView, str]] = []  # (release, why it is held; "" if promotable)
        for c in candidates:
            producer = self._producer(c)
            if producer in running:
                continue  # registered before its job ended: decide once the run's outcome is known
            passed, reasons = gates_verdict(c.gates)
            if not passed:
                self.actions.append(Reject(c.release_id, tuple(reasons)))
                self.event("Warning", "GatesFailed", f"release {c.release_id} rejected: {', '.join(reasons)}")
                continue
            passing.append((c, self._hold_reason(c, producer, active)))

        promotable = [c for c, held in passing if not held]
        promoted = promotable[-1] if promotable else None
        analysed: dict[str, str] = {}  # release id -> why analysis holds it ("rejected": aborted)
        if promoted is not None:
            outcome = self._analyze(promoted, active)
            if outcome:
                analysed[promoted.release_id] = outcome
                promoted = None
        a = self.s.analysis
        if a is not None and a.phase == AnalysisPhase.RUNNING and a.release_id not in analysed:
            self._end_analysis(AnalysisPhase.CANCELLED, "its candidate is no longer the one to promote automatically")
        if promoted is not None:
            self.actions.append(Promote(promoted.release_id, "Automatic"))
            after = " and its analysis" if self.s.analysis and self.s.analysis.release_id == promoted.release_id else ""
            self.event("Normal", "Promoted", f"release {promoted.release_id} passed its gates{after} and was promoted")
            active = _Release.of(promoted, activated_at=self.now)

        # A candidate older than the active release can only turn the clock back: superseded. (After a
        # rollback the active release is old, so newer candidates stay, held by _hold_reason.)
        held: list[tuple[ReleaseView, str]] = []
        for c, why in passing:
            if c is promoted or analysed.get(c.release_id) == _REJECTED:
                continue
            why = analysed.get(c.release_id, why)
            if active is not None and _after(active.created_at, c.created_at) and c.created_at is not None:
                reason = f"superseded by {active.id}"
                self.actions.append(Reject(c.release_id, (reason,)))
                self.event("Normal", "Superseded", f"release {c.release_id} {reason}")
            else:
                held.append((c, why or "not promoted"))

        newest_held = held[-1] if held else None
        if newest_held is None:
            self.s.candidate_release = None
        elif self.s.candidate_release != newest_held[0].release_id:
            self.s.candidate_release = newest_held[0].release_id
            self.event("Normal", "CandidateHeld", f"release {newest_held[0].release_id}: {newest_held[1]}")
        return active

    # -- 2b. analysis on live events (gates.analysis; docs/analysis.md) --------------------------------------

    def _analyze(self, c: ReleaseView, active: _Release | None) -> str:
        """Whether the analysis lets candidate `c` be promoted now: "" (promote), _REJECTED (aborted: rejected
        here), or why it is held (in analysis, or inconclusive). Without gates.analysis, or without an
        active release to compare with (the first release), "" at once."""
        spec = self.spec.gates.analysis
        if spec is None or active is None:
            return ""
        cur = self.s.analysis
        if cur is not None and cur.release_id == c.release_id and cur.baseline_release == active.id:
            if cur.phase == AnalysisPhase.RUNNING:
                return self._measure(cur, c, spec)
            if cur.phase == AnalysisPhase.PROMOTED:
                return ""  # decided before; the promotion did not get applied: promote again
            if cur.phase == AnalysisPhase.ABORTED:
                self.actions.append(Reject(c.release_id, (cur.message,)))
                return _REJECTED
            if cur.phase == AnalysisPhase.INCONCLUSIVE:
                return f"analysis inconclusive ({cur.message}); approve to promote"
            # Cancelled (e.g. superseded by a newer candidate that has gone since): analyse it afresh.
        if cur is not None and cur.phase == AnalysisPhase.RUNNING:
            self._end_analysis(AnalysisPhase.CANCELLED, f"superseded by the newer candidate {c.release_id}")
        duration = parse_duration(spec.duration)
        self.s.analysis = AnalysisStatus(
            release_id=c.release_id,
            baseline_release=active.id,
            mode=spec.mode,
            traffic_percent=spec.traffic_percent if spec.mode == AnalysisMode.CANARY else 0,
            started_at=self.now,
            ends_at=self.now + duration,
        )
        what = f"{spec.mode.value}" + (
            f", {spec.traffic_percent}% of users" if spec.mode == AnalysisMode.CANARY else ""
        )
        self.event(
            "Normal",
            "AnalysisStarted",
            f"release {c.release_id} passed its gates; analysing it against {active.id} on live events "
            f"({what}) until {iso(self.now + duration)}",
        )
        self.wake.append(self.now + _poll(duration))
        return f"in analysis until {iso(self.now + duration)}"

    def _measure(self, cur: AnalysisStatus, c: ReleaseView, spec: AnalysisSpec) -> str:
        fig = self.registry.analysis
        if fig is not None and (fig.release_id, fig.baseline_release) == (cur.release_id, cur.baseline_release):
            if fig.error:
                cur = cur.model_copy(update={"message": f"measure failed: {fig.error}"[:4096]})
            else:
                cur = cur.model_copy(
                    update={
                        "candidate_events": fig.candidate_events,
                        "baseline_events": fig.baseline_events,
                        "candidate_hit_rate": fig.candidate_hit_rate,
                        "baseline_hit_rate": fig.baseline_hit_rate,
                        "measured_at": self.now,
                    }
                )
                cur = cur.model_copy(update={"message": _figures(cur, spec)})
        self.s.analysis = cur
        enough = cur.candidate_events >= spec.min_events and cur.baseline_events >= spec.min_events
        drop = (cur.baseline_hit_rate or 0.0) - (cur.candidate_hit_rate or 0.0)
        # Like an Argo Rollouts analysis with failureLimit 0: the first conclusive failure aborts at once, while
        # a pass needs the whole window (an early pass would be decided on whichever hour came first).
        if enough and drop > spec.max_regression:
            reason = f"analysis: {cur.message}"
            self._end_analysis(AnalysisPhase.ABORTED, cur.message)
            self.actions.append(Reject(c.release_id, (reason,)))
            return _REJECTED
        ends_at = cur.ends_at or self.now
        if self.now >= ends_at:
            if enough:
                self._end_analysis(AnalysisPhase.PROMOTED, cur.message)
                return ""
            why = (
                f"only {min(cur.candidate_events, cur.baseline_events)} of {spec.min_events} events by the end of "
                f"its window" + (f" ({cur.message})" if cur.message and not cur.measured_at else "")
            )
            self._end_analysis(AnalysisPhase.INCONCLUSIVE, why)
            return f"analysis inconclusive ({why}); approve to promote"
        self.wake.append(min(ends_at, self.now + _poll(parse_duration(spec.duration))))
        return f"in analysis until {iso(ends_at)}"

    def _end_analysis(self, phase: AnalysisPhase, message: str) -> None:
        """Give the running analysis its verdict: status, an Event and the record in the release's gates."""
        cur = self.s.analysis
        assert cur is not None
        cur = cur.model_copy(update={"phase": phase, "finished_at": self.now, "message": message[:4096]})
        self.s.analysis = cur
        figures = cur.model_dump(mode="json", by_alias=True, exclude={"release_id"})
        self.actions.append(RecordAnalysis(cur.release_id, phase.value, figures))
        warn = phase in (AnalysisPhase.ABORTED, AnalysisPhase.INCONCLUSIVE)
        self.event(
            "Warning" if warn else "Normal",
            f"Analysis{phase.value}",
            f"release {cur.release_id} against {cur.baseline_release}: {message}",
        )

    def _cancel_stale_analysis(self, active: _Release | None, candidates: set[str], touched: set[str]) -> None:
        """End a running analysis whose question is gone: its candidate was approved, rejected or pruned, or the
        release it is compared with is no longer active (a rollback or an approval)."""
        cur = self.s.analysis
        if cur is None or cur.phase != AnalysisPhase.RUNNING:
            return
        if cur.release_id in touched:
            why = "promoted by approval"
        elif cur.release_id not in candidates:
            why = "no longer a candidate"
        elif active is None or active.id != cur.baseline_release:
            why = f"the active release is now {active.id if active else 'none'}, not {cur.baseline_release}"
        elif self.spec.gates.analysis is None:
            why = "gates.analysis was removed from the spec"
        else:
            return
        self._end_analysis(AnalysisPhase.CANCELLED, why)

    def _canary(self) -> ReleaseView | None:
        """The candidate Serve should also carry for a canary share of users, while a Canary analysis runs."""
        cur = self.s.analysis
        if cur is None or cur.phase != AnalysisPhase.RUNNING or cur.mode != AnalysisMode.CANARY:
            return None
        c = self.registry.release(cur.release_id)
        return c if c is not None and c.state == "candidate" else None

    def _producer(self, release: ReleaseView) -> str:
        """The run that produced a release: its run_id, else the run linked to it, else a run of that name."""
        if release.run_id:
            return release.run_id
        linked = next((r.run_id for r in self.registry.runs if r.release_id == release.release_id), None)
        return linked or release.release_id

    def _hold_reason(self, c: ReleaseView, producer: str, active: _Release | None) -> str:
        # Decision: a candidate made under spec inputs that have since changed (model, data, retrieval, gates,
        # fine-tune training settings) is not promoted automatically: it answers a question nobody asks any
        # more. It stays a candidate that a person may still approve. Changes that do not affect a run's
        # result (schedules, suspend, history, serving, runtime) do not hold it back.
        ref = next((r for r in (self.s.last_fine_tune, self.s.last_refresh) if r and r.run_id == producer), None)
        if ref is not None and self._spec_changed_since(ref):
            return (
                f"produced under spec generation {ref.generation}, whose inputs have changed since; approve to promote"
            )
        if self.spec.gates.promotion == Promotion.MANUAL:
            return f"awaiting approval (annotate {ANNOTATION_APPROVE}={c.release_id})"
        # After a rollback, candidates older than the active release must not undo it.
        if active and active.activated_at and c.created_at and c.created_at < active.activated_at:
            return f"older than the active release {active.id}; approve to promote"
        return ""

    def _spec_changed_since(self, ref: RunRef) -> bool:
        if ref.config_hash:
            current = config_hash(self.policy.name, self.policy.namespace, self.spec, ref.kind)
            return ref.config_hash != current
        return ref.generation is not None and ref.generation != self.policy.generation

    def _roll_serve(self, active: _Release | None) -> None:
        if not self.spec.serving.enabled:
            if self.s.served_release is not None:
                self.actions.append(StopServe("serving disabled"))
                self.event("Normal", "ServeStopped", "serving.enabled is false")
                self.s.served_release = None
            return
        canary = self._canary() if active is not None else None
        canary_id = canary.release_id if canary is not None else None
        if active is not None and (self.s.served_release != active.id or self.s.served_canary != canary_id):
            schema = schema_name(self.policy.name, self.spec)
            user_config = release_keys(active.id, active.adapter_uri, active.table_version, schema)
            if canary is not None:
                percent = self.s.analysis.traffic_percent if self.s.analysis else 0
                user_config["canary"] = canary_keys(
                    canary.release_id, canary.adapter_uri, canary.table_version, percent
                )
            self.actions.append(RollServe(active.id, user_config))
            if self.s.served_release != active.id:
                self.event("Normal", "ServeUpdated", f"serving release {active.id}")
            if canary_id is not None and self.s.served_canary != canary_id:
                self.event("Normal", "CanaryStarted", f"release {canary_id} answers {percent}% of users")
            elif canary_id is None and self.s.served_canary is not None:
                self.event("Normal", "CanaryStopped", f"release {self.s.served_canary} no longer serves users")
            self.s.served_release = active.id
            self.s.served_canary = canary_id

    def _prune_releases(self, keep: set[str]) -> None:
        # Count the release this plan retires (the active one, when another takes over) as retired already.
        old = sorted(
            (
                r
                for r in self.registry.releases
                if (r.state in ("retired", "rejected") or r.state == "active") and r.release_id not in keep
            ),
            key=lambda r: (r.created_at or self.now, r.release_id),
            reverse=True,
        )
        extra = tuple(r.release_id for r in old[self.spec.history.releases_limit :])
        if extra:
            self.actions.append(PruneReleases(extra))
            self.event("Normal", "ReleasesPruned", f"pruned {len(extra)} old release(s): {', '.join(extra)}")

    # -- 3. launches ---------------------------------------------------------------------------------------

    def _schedule(self, kind: RunKind, active: _Release | None) -> None:
        """Launch the run that is due for `kind`, if any and if allowed; set next*At."""
        spec = self.spec
        ft = spec.fine_tune
        earliest = self.policy.creation_timestamp
        mark = self.scheduled_mark(kind)
        fires = self.fires[kind]
        latest, upcoming = fires if fires is not None else (None, None)
        due = schedule.missed_fire(latest, mark, earliest) if latest is not None else None
        why = "scheduled"

        # A refresh re-infers with the serving adapter: nothing to refresh before a first release.
        if kind == RunKind.REFRESH and self._active_id(active) is None:
            self.waiting[kind] = "WaitingForRelease"
            self._set_next(kind, None)
            return

        if kind == RunKind.FINETUNE:
            self.s.next_fine_tune_reason = "schedule" if upcoming is not None else None
            drift = self._drift_fire(active, mark)
            if drift is not None and drift[0] <= self.now:
                # One fine-tune answers both: the later time (the fresher window) is launched and marked.
                if due is None or drift[0] > due:
                    due, why = drift
            elif drift is not None and (upcoming is None or drift[0] < upcoming):
                upcoming = drift[0]  # a drift fine-tune waits for minInterval, or the maxInterval cap is next
                self.s.next_fine_tune_reason = drift[1]

        target: tuple[datetime, int, str] | None = None  # (scheduled_at, attempt, why)
        if due is not None:
            deadline = ft.starting_deadline_seconds if kind == RunKind.FINETUNE else None
            if schedule.within_deadline(due, self.now, deadline):
                target = (due, 0, why)
            elif not spec.suspend:
                self.mark_scheduled(kind, due)
                self.event(
                    "Warning",
                    "MissedSchedule",
                    f"{kind.value} scheduled for {iso(due)} missed its starting deadline ({deadline}s); skipped",
                )
        last = self.last(kind)
        if target is None and kind == RunKind.FINETUNE:
            target = self._retry_or_initial(last, active)

        if spec.suspend:
            self.waiting[kind] = "Suspended"
            self._set_next(kind, None)
            return
        next_at = upcoming
        if target is not None:
            next_at = self._try_launch(kind, target, active) or upcoming
        self._set_next(kind, _earliest(next_at, upcoming))

    def _drift_fire(self, active: _Release | None, mark: datetime | None) -> tuple[datetime, str] | None:
        """When fineTune.onDrift wants a fine-tune (contract.drift.drift_fire, which replay's adaptive runs
        too), and why: drift or maxInterval. The last fine-tune is the latest one launched or skipped (the
        mark), else the end of the active adapter's training window (a status that was lost)."""
        od = self.spec.fine_tune.on_drift
        if od is None or self.registry.error:
            return None
        adapter_run, trained_at = adapter_of(self.registry.release(active.id) if active else None)
        last = mark or trained_at
        if last is None:
            return None  # never fine-tuned: the initial fine-tune's business
        m = newest_drift(self.registry.releases, adapter_run) if adapter_run else None
        rule = DriftRule(
            od.threshold,
            int(parse_duration(od.min_interval).total_seconds()),
            int(parse_duration(od.max_interval).total_seconds()) if od.max_interval else None,
        )
        fire = drift_fire(
            rule,
            int(last.timestamp()),
            int(m.measured_at.timestamp()) if m is not None and m.measured_at else None,
            m.excess if m is not None else None,
        )
        if fire is None:
            return None
        self.drift_note = (
            f" (drift beyond noise {m.excess:.3f} >= {od.threshold} in {m.release_id})"
            if fire.reason == "drift" and m is not None and m.excess is not None
            else f" (maxInterval {od.max_interval} since {iso(last)})"
        )
        return datetime.fromtimestamp(fire.at, UTC), fire.reason

    def _retry_or_initial(self, last: RunRef | None, active: _Release | None) -> tuple[datetime, int, str] | None:
        ft = self.spec.fine_tune
        if last is not None:
            if (
                last.result == RunResult.FAILED
                and last.reason not in NOT_A_FAULT
                and last.scheduled_at is not None
                and last.attempt < ft.backoff_limit
                and not self.active(RunKind.FINETUNE)
            ):
                return last.scheduled_at, last.attempt + 1, "retry"
            return None
        # Never fine-tuned and nothing to serve: bootstrap now rather than wait for the first scheduled time.
        # The creation time (to the minute) names it, so a restart finds it again.
        has_release = self._active_id(active) is not None
        ever = any(r.kind == RunKind.FINETUNE for r in self.registry.runs) or self.active(RunKind.FINETUNE)
        if ft.initial_run and not has_release and not ever and not self.registry.error:
            when = (self.policy.creation_timestamp or self.now).astimezone(UTC)
            return when.replace(second=0, microsecond=0), 0, "initial"
        return None

    def _try_launch(self, kind: RunKind, target: tuple[datetime, int, str], active: _Release | None) -> datetime | None:
        """Launch `target` if nothing stops it. Returns when it may be tried again, if it is waiting."""
        scheduled_at, attempt, why = target
        if self.registry.error:
            self.waiting[kind] = "RegistryUnavailable"
            return None
        wait_until = schedule.not_before(self._last_failure_end(kind), self.failures(kind))
        if wait_until is not None and self.now < wait_until:
            self.waiting[kind] = "Backoff"
            self.wake.append(wait_until)
            return wait_until
        running = self.active(kind)
        policy = self.spec.fine_tune.concurrency_policy if kind == RunKind.FINETUNE else ConcurrencyPolicy.FORBID
        if running and policy == ConcurrencyPolicy.FORBID:
            self.waiting[kind] = "ConcurrencyForbid"
            return None
        run_id = run_name(self.policy.name, kind, scheduled_at, attempt)
        if run_id in self.jobs or self.registry.run(run_id) is not None or self._known(run_id):
            self.mark_scheduled(kind, scheduled_at)  # launched before (status lost): never twice
            return None
        if running and policy == ConcurrencyPolicy.REPLACE:
            for ref in running:
                self.actions.append(DeleteJob(ref.job_name or ref.run_id, "Replaced"))
                self.s.active_runs = [r for r in self.s.active_runs if r.run_id != ref.run_id]
                self._finish(ref, RunResult.FAILED, "Replaced", f"replaced by {run_id}", self.now)
        config = run_config(
            self.policy.name,
            self.policy.namespace,
            self.spec,
            kind,
            run_id,
            scheduled_at,
            self._active_id(active),
            self.policy.uid,
        )
        self.actions.append(LaunchRun(kind, run_id, run_id, config, self.policy.generation, scheduled_at, attempt))
        ref = RunRef(
            run_id=run_id,
            kind=kind,
            job_name=run_id,
            scheduled_at=scheduled_at,
            attempt=attempt,
            generation=self.policy.generation,
            config_hash=config_hash(self.policy.name, self.policy.namespace, self.spec, kind),
            started_at=self.now,
        )
        self.s.active_runs.append(ref)
        self.set_last(kind, ref)
        self.mark_scheduled(kind, scheduled_at)
        what = {"scheduled": "", "retry": f" (retry {attempt})", "initial": " (initial)"}.get(why, self.drift_note)
        self.event("Normal", "Launched", f"{kind.value} {run_id} for {iso(scheduled_at)}{what}")
        return None

    def _active_id(self, active: _Release | None) -> str | None:
        # Without the store, the last known active release stands; with it, the store is the truth.
        if self.registry.error:
            return self.s.active_release
        return active.id if active else None

    def _last_failure_end(self, kind: RunKind) -> datetime | None:
        last = self.last(kind)
        return last.finished_at if last is not None else None

    def _known(self, run_id: str) -> bool:
        refs = [*self.s.active_runs, self.s.last_fine_tune, self.s.last_refresh]
        return any(r is not None and r.run_id == run_id for r in refs)

    def _set_next(self, kind: RunKind, when: datetime | None) -> None:
        if when is not None:
            self.wake.append(when)
        if kind == RunKind.FINETUNE:
            self.s.next_fine_tune_at = when
        else:
            self.s.next_refresh_at = when

    # -- 4. history ----------------------------------------------------------------------------------------

    def _prune_jobs(self) -> None:
        deleted = {a.name for a in self.actions if isinstance(a, DeleteJob)}
        running = {r.run_id for r in self.s.active_runs}
        limits = {True: self.spec.history.successful_runs_limit, False: self.spec.history.failed_runs_limit}
        for kind in RunKind:
            for ok, limit in limits.items():
                done = sorted(
                    (
                        j
                        for j in self.jobs.values()
                        if j.kind == kind and j.terminal and j.succeeded == ok and j.run_id not in running
                    ),
                    key=lambda j: (j.end_time or j.start_time or self.now, j.run_id),
                    reverse=True,
                )
                pruned = [j.name for j in done[limit:] if j.name not in deleted]
                for name in pruned:
                    self.actions.append(DeleteJob(name, "History"))
                    deleted.add(name)
                if pruned:
                    what = "successful" if ok else "failed"
                    self.event("Normal", "JobsPruned", f"beyond the {what} {kind.value} history: {', '.join(pruned)}")

    # -- 5. conditions -------------------------------------------------------------------------------------

    def _set_conditions(self, active: _Release | None) -> None:
        C = ConditionType
        if self.registry.error:
            self.condition(C.READY, ConditionStatus.UNKNOWN, "RegistryUnavailable", self.registry.error)
            self.condition(C.FRESH, ConditionStatus.UNKNOWN, "RegistryUnavailable", self.registry.error)
            self.condition(C.DEGRADED, True, "RegistryUnavailable", self.registry.error)
        else:
            self.s.active_release = active.id if active else None
            self.s.active_release_evidence_at = active.evidence_at if active else None
            self._ready_and_fresh(active)
            self._degraded()
        self._analyzing_condition()
        for kind, ctype in ((RunKind.FINETUNE, C.FINE_TUNING), (RunKind.REFRESH, C.REFRESHING)):
            runs = self.active(kind)
            if runs:
                self.condition(ctype, True, "Running", ", ".join(r.run_id for r in runs))
                continue
            reason = self.waiting.get(kind, "Idle")
            nxt = self.s.next_fine_tune_at if kind == RunKind.FINETUNE else self.s.next_refresh_at
            self.condition(ctype, False, reason, f"next at {_fmt(nxt)}" if nxt else "")

    def _analyzing_condition(self) -> None:
        a = self.s.analysis
        if a is not None and a.phase == AnalysisPhase.RUNNING:
            msg = f"release {a.release_id} against {a.baseline_release} until {_fmt(a.ends_at)}"
            self.condition(ConditionType.ANALYZING, True, a.mode.value, msg + (f": {a.message}" if a.message else ""))
        elif self.spec.gates.analysis is None:
            # Policies without analysis get the condition only once they had one (conditions stay as they were).
            if get_condition(self.s.conditions, ConditionType.ANALYZING) is not None:
                self.condition(ConditionType.ANALYZING, False, "NotConfigured", "")
        elif a is None:
            self.condition(ConditionType.ANALYZING, False, "Idle", "")
        else:
            self.condition(ConditionType.ANALYZING, False, a.phase.value, f"release {a.release_id}: {a.message}")

    def _ready_and_fresh(self, active: _Release | None) -> None:
        C = ConditionType
        if active is None:
            self.condition(C.READY, False, "NoActiveRelease", "no release has been promoted yet")
            self.condition(C.FRESH, False, "NoActiveRelease", "")
            return
        if not self.spec.serving.enabled:
            self.condition(C.READY, True, "Active", f"release {active.id} is active; serving is disabled")
        else:
            self.condition(C.READY, True, "Serving", f"serving release {active.id}")
        if active.evidence_at is None:
            self.condition(C.FRESH, ConditionStatus.UNKNOWN, "NoEvidenceTime", f"release {active.id}")
            return
        limit = parse_duration(self.spec.retrieval.max_staleness)
        age = self.now - active.evidence_at
        if age <= limit:
            self.condition(C.FRESH, True, "EvidenceFresh", f"evidence is {_age(age)} old (max {_age(limit)})")
            self.wake.append(active.evidence_at + limit + timedelta(seconds=1))
        else:
            self.condition(C.FRESH, False, "Stale", f"evidence is {_age(age)} old (max {_age(limit)})")

    def _degraded(self) -> None:
        failed = [
            r
            for r in (self.s.last_fine_tune, self.s.last_refresh)
            if r is not None and r.result == RunResult.FAILED and r.reason not in NOT_A_FAULT
        ]
        if failed and (self.s.failures.finetune or self.s.failures.refresh):
            msg = "; ".join(f"{r.kind.value} {r.run_id}: {r.reason} {r.message}".strip() for r in failed)
            self.condition(ConditionType.DEGRADED, True, "RunFailed", msg)
        else:
            self.condition(ConditionType.DEGRADED, False, "AsExpected", "")


@dataclass(frozen=True)
class _Release:
    """The active release as this plan leaves it (after its own promotion or rollback)."""

    id: str
    created_at: datetime | None
    activated_at: datetime | None
    evidence_at: datetime | None
    adapter_uri: str | None
    table_version: str | None

    @staticmethod
    def of(r: ReleaseView, activated_at: datetime | None = None) -> _Release:
        return _Release(
            r.release_id, r.created_at, activated_at or r.activated_at, r.evidence_at, r.adapter_uri, r.table_version
        )


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return min(a, b) if a is not None and b is not None else a or b


_REJECTED = "rejected"


def _poll(duration: timedelta) -> timedelta:
    """How often a running analysis is measured: 20 times over its window, at most every 30 s (so an abort
    comes within 5% of the window of the events that decide it)."""
    return max(duration / 20, timedelta(seconds=30))


def _figures(a: AnalysisStatus, spec: AnalysisSpec) -> str:
    def rate(r: float | None) -> str:
        return f"{r:.4f}" if r is not None else "-"

    return (
        f"HR@5 {rate(a.candidate_hit_rate)} over {a.candidate_events} events vs the active "
        f"{rate(a.baseline_hit_rate)} over {a.baseline_events} (max regression {spec.max_regression:g}, "
        f"min events {spec.min_events})"
    )


def _after(a: datetime | None, b: datetime | None) -> bool:
    """a is later than b (unknown times count as not later, except against an unknown b)."""
    if a is None:
        return False
    return b is None or a > b


def _age(d: timedelta) -> str:
    s = int(d.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if (s >= n and s % n == 0) or s >= 10 * n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e["loc"])
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
        return "; ".join(parts)
    return str(exc)[:500]


def _cost_text(cost: RunCost) -> str:
    """A run's cost in one phrase, for its Event."""
    return (
        f"{cost.cpu_seconds:.1f} CPU s, {cost.gpu_seconds:.1f} GPU s, {cost.training_tokens} training tokens, "
        f"{cost.wall_seconds:.1f} wall s, {cost.rows_ingested} rows ingested"
    )
