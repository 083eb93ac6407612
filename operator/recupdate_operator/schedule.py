"""Time arithmetic for the planner: cron fires (in a time zone), interval fires, missed runs, backoff.

Every function is pure and takes `now` explicitly, so the same code runs on a simulated clock.
All datetimes in and out are timezone-aware; results are in UTC.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

from croniter import croniter

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BACKOFF_BASE = timedelta(seconds=60)
BACKOFF_CAP = timedelta(hours=1)
# Cron has minute resolution; one microsecond past `now` makes get_prev include a fire exactly at `now`.
_EPSILON = timedelta(microseconds=1)
# How far croniter searches for a fire (its default is 50). The calendar repeats every 400 years, so an
# expression that fires at all fires within this span of any time; one that never does raises
# CroniterBadDateError (a ValueError) at once. api._valid_cron rejects those with this same search.
CRON_SEARCH_YEARS = 400


def _aware(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: pass timezone-aware times")
    return t


def next_cron_fire(schedule: str, after: datetime, time_zone: str = "UTC") -> datetime:
    """The first fire strictly after `after`."""
    local = _aware(after).astimezone(zoneinfo.ZoneInfo(time_zone))
    fire: datetime = croniter(schedule, local, max_years_between_matches=CRON_SEARCH_YEARS).get_next(datetime)
    return fire.astimezone(UTC)


def prev_cron_fire(schedule: str, now: datetime, time_zone: str = "UTC") -> datetime:
    """The latest fire at or before `now`."""
    local = (_aware(now) + _EPSILON).astimezone(zoneinfo.ZoneInfo(time_zone))
    fire: datetime = croniter(schedule, local, max_years_between_matches=CRON_SEARCH_YEARS).get_prev(datetime)
    return fire.astimezone(UTC)


def prev_interval_fire(interval: timedelta, now: datetime) -> datetime:
    """The latest multiple of `interval` since the Unix epoch at or before `now`.

    Aligning to the epoch (not to the last run) keeps fire times, and so run ids, the same across restarts.
    """
    if interval <= timedelta(0):
        raise ValueError("interval must be positive")
    steps = (_aware(now) - EPOCH) // interval
    return EPOCH + steps * interval


def next_interval_fire(interval: timedelta, after: datetime) -> datetime:
    """The first multiple of `interval` since the epoch strictly after `after`."""
    return prev_interval_fire(interval, after) + interval


def missed_fire(
    latest_fire: datetime,
    handled: datetime | None,
    earliest: datetime | None,
) -> datetime | None:
    """`latest_fire` (the latest fire at or before now) if it still needs a decision, else None.

    A fire needs one when it is later than the last fire launched or skipped (`handled`) and not before the
    object existed (`earliest`), like a CronJob's lastScheduleTime and creationTimestamp. Only the most
    recent missed fire matters: older ones are superseded by it.
    """
    if handled is not None and latest_fire <= handled:
        return None
    if earliest is not None and latest_fire < earliest:
        return None
    return latest_fire


def within_deadline(fire: datetime, now: datetime, starting_deadline_seconds: int | None) -> bool:
    """Whether a fire may still start at `now` (CronJob startingDeadlineSeconds; None: no deadline)."""
    if starting_deadline_seconds is None:
        return True
    return now - fire <= timedelta(seconds=starting_deadline_seconds)


def backoff_delay(failures: int, base: timedelta = BACKOFF_BASE, cap: timedelta = BACKOFF_CAP) -> timedelta:
    """Delay before the next try after `failures` consecutive failures: base * 2^(failures-1), capped."""
    if failures <= 0:
        return timedelta(0)
    # Cap the exponent too, so a long failure streak cannot overflow timedelta.
    return min(cap, base * (2 ** min(failures - 1, 30)))


def not_before(last_finished: datetime | None, failures: int) -> datetime | None:
    """The earliest time a new run may start after a failure streak; None when there is no streak."""
    if failures <= 0 or last_finished is None:
        return None
    return last_finished + backoff_delay(failures)
