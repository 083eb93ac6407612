"""Applying a plan: the planner's actions, in order, through a backend and the registry.

Shared by the kopf controller and local mode, so both carry out the same decisions the same way. The first
failure raises and stops the rest; the caller then writes no status, and the next reconcile recomputes the
same decisions (planner.py's contract).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from .backends.base import Backend, PolicyRef
from .planner import (
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


class RegistryWriter(Protocol):
    def record_run(self, policy: PolicyRef, action: RecordRun, now: datetime) -> None: ...
    def activate(self, policy: PolicyRef, release_id: str, now: datetime) -> None: ...
    def reject(self, policy: PolicyRef, release_id: str, reasons: Any) -> None: ...
    def prune(self, policy: PolicyRef, release_ids: Any) -> None: ...
    def record_analysis(self, policy: PolicyRef, release_id: str, verdict: str, figures: Any) -> None: ...


def apply_plan(
    p: Plan,
    ref: PolicyRef | None,
    backend: Backend,
    registry: RegistryWriter,
    now: datetime,
    on_event: Callable[[Event], None],
    on_action: Callable[[Any], None] = lambda _: None,
) -> None:
    """Carry out p.actions in order. `on_event` posts an Event; `on_action` sees every other action after it
    succeeded (metrics, timelines). Only Events are allowed without a valid spec (ref is None)."""
    for action in p.actions:
        if isinstance(action, Event):
            on_event(action)
            continue
        assert ref is not None, f"{type(action).__name__} for an invalid spec"
        if isinstance(action, LaunchRun):
            backend.launch_run(ref, action)
        elif isinstance(action, DeleteJob):
            backend.delete_job(ref, action.name)
        elif isinstance(action, RecordRun):
            registry.record_run(ref, action, now)
        elif isinstance(action, Promote | Rollback):
            registry.activate(ref, action.release_id, now)
        elif isinstance(action, Reject):
            registry.reject(ref, action.release_id, action.reasons)
        elif isinstance(action, RecordAnalysis):
            registry.record_analysis(ref, action.release_id, action.verdict, action.figures)
        elif isinstance(action, RollServe):
            backend.roll_serving(ref, action.user_config)
        elif isinstance(action, StopServe):
            backend.stop_serving(ref)
        elif isinstance(action, PruneReleases):
            registry.prune(ref, action.release_ids)
        on_action(action)
