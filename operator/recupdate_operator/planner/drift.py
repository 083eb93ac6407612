"""Drift as the registry records it, for the planner's onDrift trigger and status.lastDrift (pure).

Jobs write into a release's metrics (jobs/run.py):
- `adapter`: {run, scheduledAt, trainStart, trainEnd} (seconds since the epoch), the fine-tune that trained
  the release's adapter: a fine-tune's own, copied by every refresh of it;
- `drift` (refreshes): {jaccard, floorJaccard, drift, floor, excess, contexts, measuredAt, adapterRun}, the
  refresh's evidence window against that adapter's training window (data/drift.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..api import DriftStatus
from .inputs import ReleaseView


@dataclass(frozen=True)
class DriftMeasure:
    release_id: str
    measured_at: datetime | None
    adapter_run: str | None
    jaccard: float | None
    floor_jaccard: float | None
    excess: float | None
    contexts: int

    def status(self) -> DriftStatus:
        return DriftStatus(
            release_id=self.release_id,
            measured_at=self.measured_at,
            adapter_run=self.adapter_run,
            jaccard=self.jaccard,
            floor_jaccard=self.floor_jaccard,
            excess=self.excess,
            contexts=self.contexts,
        )


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def adapter_of(release: ReleaseView | None) -> tuple[str | None, datetime | None]:
    """(the fine-tune run that trained the release's adapter, its scheduled time), as far as known. A release
    from before adapters were recorded: a fine-tune's (no refreshOf) is its own run, its time unknown."""
    if release is None:
        return None, None
    block = release.metrics.get("adapter")
    if isinstance(block, Mapping) and isinstance(block.get("run"), str):
        return block["run"], _time(block.get("scheduledAt"))
    if "refreshOf" not in release.metrics:
        return release.run_id or release.release_id, None
    return None, None


def measure_of(release: ReleaseView) -> DriftMeasure | None:
    block = release.metrics.get("drift")
    if not isinstance(block, Mapping):
        return None
    contexts = block.get("contexts")
    return DriftMeasure(
        release_id=release.release_id,
        measured_at=_time(block.get("measuredAt")) or release.evidence_at,
        adapter_run=block.get("adapterRun") if isinstance(block.get("adapterRun"), str) else None,
        jaccard=_num(block.get("jaccard")),
        floor_jaccard=_num(block.get("floorJaccard")),
        excess=_num(block.get("excess")),
        contexts=contexts if isinstance(contexts, int) and not isinstance(contexts, bool) and contexts >= 0 else 0,
    )


def newest_drift(releases: Sequence[ReleaseView], adapter_run: str | None = None) -> DriftMeasure | None:
    """The newest measurement (by the end of the window it measured), against `adapter_run` when given."""
    found = [m for r in releases if (m := measure_of(r)) is not None]
    if adapter_run is not None:
        found = [m for m in found if m.adapter_run == adapter_run]
    oldest = datetime.min.replace(tzinfo=UTC)
    return max(found, key=lambda m: (m.measured_at or oldest, m.release_id), default=None)
