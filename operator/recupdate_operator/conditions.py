"""Kubernetes-style conditions: set one, keeping lastTransitionTime unless its status really changes."""

from __future__ import annotations

from datetime import datetime

from .api import Condition, ConditionStatus, ConditionType

# The order conditions are listed in status, for stable output.
ORDER = [
    ConditionType.READY,
    ConditionType.FRESH,
    ConditionType.FINE_TUNING,
    ConditionType.REFRESHING,
    ConditionType.ANALYZING,
    ConditionType.DEGRADED,
    ConditionType.SPEC_VALID,
]


def get_condition(conditions: list[Condition], type_: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: ConditionType) -> bool:
    c = get_condition(conditions, type_)
    return c is not None and c.status == ConditionStatus.TRUE


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: ConditionStatus | bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime moves only when the status changes."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    old = get_condition(conditions, type_)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    rest = [c for c in conditions if c.type != type_]
    merged = [*rest, new]
    return sorted(merged, key=lambda c: ORDER.index(c.type) if c.type in ORDER else len(ORDER))
