"""What the planner decides: actions for the caller to carry out, in order, each with an Event, and the Plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ..api import (
    PolicyStatus,
    RunCost,
    RunKind,
    RunResult,
)

# Actions: what the caller must do, in order. Every decision also comes with an Event.


@dataclass(frozen=True)
class LaunchRun:
    """Create the job `job_name` running `python -m recupdate_workloads.<kind> --config <config> --run-id
    <run_id>`, labelled with kind, run_id and generation. `config` is JSON-ready (see run_config)."""

    kind: RunKind
    run_id: str
    job_name: str
    config: Mapping[str, Any]
    generation: int
    scheduled_at: datetime
    attempt: int = 0


@dataclass(frozen=True)
class DeleteJob:
    """Delete the job (stop it if running). reason: Replaced (concurrencyPolicy) or History (pruning)."""

    name: str
    reason: str


@dataclass(frozen=True)
class RecordRun:
    """Record a run's end in the store's runs table, unless the workload already did (status final)."""

    run_id: str
    kind: RunKind
    result: RunResult
    reason: str
    message: str = ""
    cost: RunCost | None = None  # what the run recorded it cost (for the metrics; nothing to write)


@dataclass(frozen=True)
class Promote:
    """Activate a candidate in the store (one transaction: the old active one becomes retired)."""

    release_id: str
    reason: Literal["Automatic", "Manual"]


@dataclass(frozen=True)
class Reject:
    """Mark a candidate rejected in the store; it will never be promoted or rolled back to."""

    release_id: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Rollback:
    """Re-activate an earlier (retired or candidate) release in the store, as Promote does."""

    release_id: str


@dataclass(frozen=True)
class RecordAnalysis:
    """Write an analysis verdict and its figures into the release's gates (gates.analysis), for the record."""

    release_id: str
    verdict: str
    figures: Mapping[str, Any]


@dataclass(frozen=True)
class RollServe:
    """Create or update the owned RayService so Serve's user_config is `user_config`
    ({release_id, adapter_uri, table_version, store_schema}, and `canary` during a canary analysis); a
    reconfigure, not a redeploy."""

    release_id: str
    user_config: Mapping[str, Any]


@dataclass(frozen=True)
class StopServe:
    """Delete the owned RayService (serving.enabled turned false)."""

    reason: str


@dataclass(frozen=True)
class PruneReleases:
    """Delete these retired/rejected releases (and what only they reference) from the store."""

    release_ids: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the policy. type: Normal or Warning."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = (
    LaunchRun
    | DeleteJob
    | RecordRun
    | Promote
    | Reject
    | Rollback
    | RecordAnalysis
    | RollServe
    | StopServe
    | PruneReleases
    | Event
)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    status: PolicyStatus
    wake_at: datetime | None = None  # reconcile again by then, even if nothing changes

    def status_patch(self) -> dict[str, Any]:
        """The status as a JSON merge patch body (camelCase; None clears a field)."""
        return self.status.model_dump(mode="json", by_alias=True)

    def of(self, kind: type[Any]) -> list[Any]:
        """The actions of one type, e.g. plan.of(LaunchRun)."""
        return [a for a in self.actions if isinstance(a, kind)]
