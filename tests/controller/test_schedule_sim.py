"""Three simulated weeks of a weekly fine-tune and a daily refresh, in a few seconds (looptime).

The real operator (kopf, handlers, planner, registry) runs against the emulated API and PostgreSQL; a fake
KubeRay runs every RayJob for a while and a stand-in workload registers a passing candidate for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from fixtures.operator_world import World

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(180)]
DAY = 86400.0
START = datetime(2030, 1, 7, 0, 30, tzinfo=UTC)  # a Monday, 00:30


async def fake_kuberay(w: World, created: list[str]) -> None:
    """Every new RayJob runs (fine-tunes 30 min, refreshes 10 min), registers a candidate and succeeds."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(name: str) -> None:
        await w.set_job(name, "Running", "RUNNING")
        await asyncio.sleep(1800 if "-ft-" in name else 600)
        await w.register(name)
        await w.set_job(name, "Complete", "SUCCEEDED")

    try:
        while True:
            # Woken by every change in the cluster; a long poll keeps the loop from ticking for nothing.
            new = await w.cluster.wait_for(
                lambda: [n for n in w.job_names() if n not in created], timeout=365 * DAY, poll=7 * DAY
            )
            for name in new:
                created.append(name)
                task = asyncio.create_task(run(name))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()


async def test_three_weeks_of_schedules(make_world: Callable[..., Awaitable[World]]) -> None:
    w = await make_world(START)
    created: list[str] = []
    real = time.monotonic()
    async with w.operator(resync_seconds=6 * 3600) as controller:
        await w.create_policy(
            "recs",
            w.spec(fineTune={"schedule": "0 3 * * 1"}, retrieval={"refreshInterval": "1d", "maxStaleness": "2d"}),
        )
        kuberay = asyncio.create_task(fake_kuberay(w, created))
        await asyncio.sleep(21 * DAY)
        kuberay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kuberay
    elapsed = time.monotonic() - real

    fine_tunes = [n for n in created if "-ft-" in n]
    refreshes = [n for n in created if "-rf-" in n]
    assert fine_tunes == [
        "recs-ft-203001070030",  # initial: no release yet
        "recs-ft-203001070300",  # Mondays 03:00
        "recs-ft-203001140300",
        "recs-ft-203001210300",
    ]
    days = [START.replace(hour=0, minute=0) + timedelta(days=d) for d in range(1, 22)]
    assert refreshes == [f"recs-rf-{d:%Y%m%d%H%M}" for d in days]  # daily 00:00, from the first day after
    assert len(created) == len(set(created)) == 25  # each run launched once

    # History: finished jobs beyond the limits (3 successful per kind) are deleted; releases beyond 10 pruned.
    left = w.job_names()
    assert left == sorted(fine_tunes[-3:] + refreshes[-3:])
    releases = w.releases()
    assert len(releases) <= 10 + 1  # releasesLimit retired ones, plus the active one
    assert releases[refreshes[-1]] == "active"
    status = w.status("recs")
    assert status["activeRelease"] == status["servedRelease"] == refreshes[-1]
    assert (w.served_user_config() or {}).get("release_id") == refreshes[-1]
    assert w.condition("recs", "Fresh")["status"] == "True"
    assert w.condition("recs", "Ready")["status"] == "True"
    assert status["nextRefreshAt"] == "2030-01-29T00:00:00Z"
    assert status["nextFineTuneAt"] == "2030-01-28T03:00:00Z"
    # Reconciles follow the schedule (a few per run), not a polling interval.
    assert controller.reconciles < 400, controller.reconciles
    assert elapsed < 60, f"three simulated weeks took {elapsed:.1f} s"
