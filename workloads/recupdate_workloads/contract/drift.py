"""The drift rule: when measured drift calls for a fine-tune (spec.fineTune.onDrift, docs/spec.md).

One pure function, shared by the operator's planner and the replay's `adaptive` strategy, so that what is
evaluated offline is what runs. Times are seconds since the epoch (any common origin works).

A refresh measures drift of its evidence window against the window the active adapter was trained on
(data/drift.py): `excess`, the drift beyond the noise floor (shuffled minus observed mean Jaccard of the
top-5 successor sets). The rule:

- drift: a measurement taken after the last fine-tune with `excess >= threshold` fires at its own time,
  but never before `last + minInterval` (the cost bound): then at `last + minInterval`;
- cap: whatever the drift, a fine-tune fires at `last + maxInterval` when a cap is set;
- the earlier of the two is the fire time. None: nothing fires (no cap, and no drift over the threshold).

`last` is the scheduled time of the last fine-tune (scheduled, drift-triggered or capped alike). With no
last fine-tune there is nothing to bound or cap: the initial fine-tune is the planner's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DriftReason = Literal["drift", "maxInterval"]


@dataclass(frozen=True)
class DriftRule:
    """fineTune.onDrift in seconds: threshold on the excess drift, the minimum and maximum intervals."""

    threshold: float
    min_interval: int
    max_interval: int | None = None

    def __post_init__(self) -> None:
        if self.min_interval < 0:
            raise ValueError("min_interval must not be negative")
        if self.max_interval is not None and self.max_interval < self.min_interval:
            raise ValueError("max_interval must be at least min_interval")


@dataclass(frozen=True)
class DriftFire:
    """When the rule fires and why."""

    at: int
    reason: DriftReason


def drift_fire(
    rule: DriftRule, last_fine_tune: int | None, measured_at: int | None, excess: float | None
) -> DriftFire | None:
    """The time the drift rule wants a fine-tune, or None. A fire time after `now` is a wait, not a launch:
    the caller compares it with its clock."""
    if last_fine_tune is None:
        return None
    fires: list[DriftFire] = []
    if rule.max_interval is not None:
        fires.append(DriftFire(last_fine_tune + rule.max_interval, "maxInterval"))
    # Only a measurement taken after the last fine-tune counts: the one that triggered it must not again.
    if excess is not None and measured_at is not None and measured_at > last_fine_tune and excess >= rule.threshold:
        fires.append(DriftFire(max(measured_at, last_fine_tune + rule.min_interval), "drift"))
    return min(fires, key=lambda f: (f.at, f.reason != "drift")) if fires else None
