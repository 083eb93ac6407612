"""schedule.py: cron and interval fires, missed runs, deadlines, backoff."""

from datetime import UTC, datetime, timedelta

import pytest

from recupdate_operator import schedule


def t(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "tz", "now", "prev", "nxt"),
    [
        ("0 3 1 * *", "UTC", t(2025, 3, 10, 12), t(2025, 3, 1, 3), t(2025, 4, 1, 3)),
        # A fire exactly at now counts as "at or before now"; the next one is strictly after.
        ("0 3 1 * *", "UTC", t(2025, 3, 1, 3), t(2025, 3, 1, 3), t(2025, 4, 1, 3)),
        ("*/15 * * * *", "UTC", t(2025, 3, 1, 3, 7), t(2025, 3, 1, 3, 0), t(2025, 3, 1, 3, 15)),
        ("@daily", "UTC", t(2025, 3, 1, 3), t(2025, 3, 1, 0), t(2025, 3, 2, 0)),
        # 03:00 in Berlin is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
        ("0 3 * * *", "Europe/Berlin", t(2025, 1, 15, 12), t(2025, 1, 15, 2), t(2025, 1, 16, 2)),
        ("0 3 * * *", "Europe/Berlin", t(2025, 7, 15, 12), t(2025, 7, 15, 1), t(2025, 7, 16, 1)),
        ("30 9 * * 1", "America/New_York", t(2025, 3, 12, 0), t(2025, 3, 10, 13, 30), t(2025, 3, 17, 13, 30)),
    ],
)
def test_cron_fires(expr: str, tz: str, now: datetime, prev: datetime, nxt: datetime) -> None:
    assert schedule.prev_cron_fire(expr, now, tz) == prev
    assert schedule.next_cron_fire(expr, now, tz) == nxt
    assert schedule.prev_cron_fire(expr, now, tz).tzinfo == UTC


@pytest.mark.parametrize(
    ("interval", "now", "prev", "nxt"),
    [
        (timedelta(hours=6), t(2025, 3, 10, 13), t(2025, 3, 10, 12), t(2025, 3, 10, 18)),
        (timedelta(hours=6), t(2025, 3, 10, 12), t(2025, 3, 10, 12), t(2025, 3, 10, 18)),
        (timedelta(minutes=1), t(2025, 3, 10, 12, 0, 59), t(2025, 3, 10, 12), t(2025, 3, 10, 12, 1)),
        (timedelta(days=7), t(1970, 1, 8, 1), t(1970, 1, 8), t(1970, 1, 15)),
    ],
)
def test_interval_fires(interval: timedelta, now: datetime, prev: datetime, nxt: datetime) -> None:
    assert schedule.prev_interval_fire(interval, now) == prev
    assert schedule.next_interval_fire(interval, now) == nxt


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        schedule.prev_interval_fire(timedelta(0), t(2025, 1, 1))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        schedule.prev_cron_fire("@daily", datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("latest", "handled", "earliest", "expected"),
    [
        (t(2025, 3, 1), None, None, t(2025, 3, 1)),
        (t(2025, 3, 1), t(2025, 2, 1), None, t(2025, 3, 1)),
        (t(2025, 3, 1), t(2025, 3, 1), None, None),  # already launched or skipped
        (t(2025, 3, 1), None, t(2025, 3, 5), None),  # before the object existed
        (t(2025, 3, 1), None, t(2025, 3, 1), t(2025, 3, 1)),
    ],
)
def test_missed_fire(
    latest: datetime, handled: datetime | None, earliest: datetime | None, expected: datetime | None
) -> None:
    assert schedule.missed_fire(latest, handled, earliest) == expected


@pytest.mark.parametrize(
    ("late", "deadline", "ok"),
    [(timedelta(hours=5), None, True), (timedelta(seconds=60), 60, True), (timedelta(seconds=61), 60, False)],
)
def test_within_deadline(late: timedelta, deadline: int | None, ok: bool) -> None:
    fire = t(2025, 3, 1, 3)
    assert schedule.within_deadline(fire, fire + late, deadline) is ok


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0), (1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (1000, 3600)],
)
def test_backoff_delay(failures: int, delay: int) -> None:
    assert schedule.backoff_delay(failures) == timedelta(seconds=delay)


def test_not_before() -> None:
    end = t(2025, 3, 1, 3)
    assert schedule.not_before(end, 0) is None
    assert schedule.not_before(None, 2) is None
    assert schedule.not_before(end, 2) == end + timedelta(minutes=2)
