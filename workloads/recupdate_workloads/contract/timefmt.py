"""How times cross the boundary: RFC 3339 in UTC with a ``Z`` suffix (Kubernetes status, job configs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(t: datetime) -> str:
    """An aware datetime as RFC 3339 UTC: ``2030-01-08T00:30:00Z``."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 / ISO 8601 text (``Z`` or an offset) as a datetime; None for empty or unreadable values."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def epoch_seconds(value: Any) -> int:
    """Seconds since the epoch, from a number or an ISO 8601 text. ValueError for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    t = parse_time(value)
    if t is None:
        raise ValueError(f"not a time: {value!r}")
    return int(t.timestamp())
