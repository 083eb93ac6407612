"""What the planner reads: the policy, the observed jobs and the registry's view of runs and releases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..api import (
    PolicySpec,
    RunKind,
)

# A job launched this recently may not be visible yet (informer cache, API latency): not "deleted" yet.
JOB_APPEAR_GRACE = timedelta(seconds=60)
# RayJob status.jobDeploymentStatus values that mean the job will not change any more. ValidationFailed
# (KubeRay >= 1.3) never runs, so it is as final as Failed.
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})
# Failure reasons that are decisions, not faults: they do not count toward backoff or trigger retries.
NOT_A_FAULT = frozenset({"Replaced"})


@dataclass(frozen=True)
class Policy:
    """The policy object as the planner needs it. `spec` may be raw (a dict from the API server).

    creation_timestamp matters: scheduled times before it are not missed runs, and it names the initial
    fine-tune. Local mode should pass a fixed one too.
    """

    name: str
    namespace: str
    spec: PolicySpec | Mapping[str, Any]
    generation: int = 1
    annotations: Mapping[str, str] = field(default_factory=dict)
    creation_timestamp: datetime | None = None
    uid: str = ""  # metadata.uid: passed to jobs (policyUid) so they check the schema's owner


@dataclass(frozen=True)
class ObservedJob:
    """One run's job as observed (a RayJob, or a local job reporting the same vocabulary). Pass only the
    policy's own jobs (label api.LABEL_POLICY).

    kind, run_id and generation come from the job's labels (api.LABEL_*); the statuses from RayJob
    status.jobDeploymentStatus and status.jobStatus; reason/message from status.reason/message;
    start_time from status.startTime, else metadata.creationTimestamp; end_time from status.endTime.
    """

    name: str
    kind: RunKind
    run_id: str
    generation: int | None = None
    job_deployment_status: str = ""
    job_status: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    message: str = ""
    reason: str = ""

    @property
    def terminal(self) -> bool:
        return self.job_deployment_status in TERMINAL_DEPLOYMENT_STATUSES

    @property
    def succeeded(self) -> bool:
        # KubeRay also reports Complete when the Ray job itself FAILED (docs/architecture.md).
        return self.job_deployment_status == "Complete" and self.job_status == "SUCCEEDED"


@dataclass(frozen=True)
class RunView:
    """A row of the store's runs table. status: running, succeeded or failed."""

    run_id: str
    kind: RunKind
    status: str
    error: str | None = None
    release_id: str | None = None  # the candidate this run registered, when the store links them
    sync: Mapping[str, Any] | None = None  # the run's data sync (runs.cost.sync), when it recorded one
    cost: Mapping[str, Any] | None = None  # the run's whole runs.cost (cpuSeconds, gpuSeconds, tokens, ...)


@dataclass(frozen=True)
class ReleaseView:
    """A row of the store's releases table. state: candidate, active, rejected or retired.

    gates is what the workload wrote: {"passed": bool} and/or {gate: {"passed": bool, "value": ...,
    "threshold": ...}}. evidence_at is the end of the evidence window of its snapshot (for Fresh).
    """

    release_id: str
    state: str
    gates: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    activated_at: datetime | None = None
    evidence_at: datetime | None = None
    run_id: str | None = None  # the run that produced it, when known
    adapter_uri: str | None = None
    table_version: str | None = None


@dataclass(frozen=True)
class SchemaOwner:
    """The policy the store records as the owner of the schema (its policy_owner row). previous_uid is set
    when this read adopted the schema for a re-created policy (same namespace/name, new uid)."""

    namespace: str
    name: str
    uid: str = ""
    previous_uid: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f" (uid {self.uid})" if self.uid else "")


def owner_conflict(owner: SchemaOwner | None, namespace: str, name: str, schema: str) -> str | None:
    """Why policy namespace/name may not use `schema`, owned by `owner`; None when it may (it owns it, or the
    owner is unknown). A policy's identity is its namespace/name: a re-created one adopts its schema."""
    if owner is None or (owner.namespace, owner.name) == (namespace, name):
        return None
    return (
        f"store schema {schema!r} belongs to policy {owner}; a schema holds one policy's data. Delete this policy "
        "and create it again with spec.store.schema set to a schema of its own (docs/install.md, Store schemas)"
    )


@dataclass(frozen=True)
class AnalysisFigures:
    """The store's measure of an analysis (status.analysis): HR@5 of each table on the events after
    `since` (Shadow: both tables on every event; Canary: each arm with the table that served it). error: the
    measure failed (the analysis goes on; the next reconcile measures again)."""

    release_id: str
    baseline_release: str
    candidate_events: int = 0
    candidate_hits: int = 0
    baseline_events: int = 0
    baseline_hits: int = 0
    error: str | None = None

    @property
    def candidate_hit_rate(self) -> float | None:
        return self.candidate_hits / self.candidate_events if self.candidate_events else None

    @property
    def baseline_hit_rate(self) -> float | None:
        return self.baseline_hits / self.baseline_events if self.baseline_events else None


@dataclass(frozen=True)
class RegistryView:
    """What the store says. error is set (and the rest empty) when the store could not be read. owner: who
    owns the schema (None: not known, e.g. no claim was made); a policy that is not the owner gets no plan."""

    runs: Sequence[RunView] = ()
    releases: Sequence[ReleaseView] = ()
    error: str | None = None
    owner: SchemaOwner | None = None
    analysis: AnalysisFigures | None = None  # measured for status.analysis while it runs

    def run(self, run_id: str) -> RunView | None:
        return next((r for r in self.runs if r.run_id == run_id), None)

    def release(self, release_id: str) -> ReleaseView | None:
        return next((r for r in self.releases if r.release_id == release_id), None)

    def active(self) -> ReleaseView | None:
        return next((r for r in self.releases if r.state == "active"), None)
