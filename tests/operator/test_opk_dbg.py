import asyncio, time, selectors
import pytest
from test_opk_schedule_sim import *  # noqa
from opk_world import World

@pytest.mark.looptime
@pytest.mark.timeout(180)
async def test_dbg(make_world):
    loop = asyncio.get_running_loop()
    sel = loop._selector
    orig = sel.__class__.select
    stats = {"blocked": 0.0, "n": 0, "long": 0}
    def select(self, timeout=None):
        t = time.perf_counter(); r = orig(self, timeout); d = time.perf_counter() - t
        stats["blocked"] += d; stats["n"] += 1
        if d > 0.05: stats["long"] += 1
        return r
    sel.__class__.select = select
    try:
        t=time.perf_counter()
        await test_three_weeks_of_schedules.__wrapped__(make_world) if hasattr(test_three_weeks_of_schedules, "__wrapped__") else await test_three_weeks_of_schedules(make_world)
    finally:
        sel.__class__.select = orig
        print("STATS", stats, time.perf_counter()-t)
