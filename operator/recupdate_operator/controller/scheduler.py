"""One scheduler per operator: reconciles of one policy never overlap, and bursts of triggers coalesce."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

from .config import Key

log = logging.getLogger("recupdate.operator")


class Scheduler:
    """Runs `work(key)` for due keys, one at a time per key, at most `workers` at once. work returns the delay
    (seconds) to the key's next run, or None. Times are the event loop's (looptime fast-forwards them)."""

    def __init__(self, work: Callable[[Key], Any], workers: int, may_run: Callable[[Key], bool] | None = None) -> None:
        self._work = work
        self._may_run = may_run or (lambda key: True)
        self._sem = asyncio.Semaphore(workers)
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def trigger(self, key: Key, delay: float = 0.0, *, replace: bool = False) -> None:
        """Run `key` after `delay` seconds (earlier if it is already due sooner, unless `replace`)."""
        if key in self._running and delay <= 0:
            self._again.add(key)
            return
        when = self._loop.time() + max(0.0, delay)
        old = self._due.get(key)
        if old is not None and old <= when and not replace:
            return
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._wakeup.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)
        self._again.discard(key)

    def pending(self) -> int:
        return len(self._due) + len(self._running)

    def running(self, key: Key) -> bool:
        return key in self._running

    async def run(self) -> None:
        try:
            while True:
                # Due within a millisecond counts as due, and the wait is computed from the true time: float
                # rounding must never leave a timer that fires at once yet finds nothing due (under a fake
                # clock, time would then never move on).
                now = self._loop.time()
                while self._heap and self._heap[0][0] <= now + 1e-3:
                    when, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) != when:
                        continue  # superseded
                    del self._due[key]
                    if not self._may_run(key):
                        continue  # not ours to reconcile now (peering): activation triggers it again
                    if key in self._running:
                        self._again.add(key)
                        continue
                    self._running.add(key)
                    task = asyncio.create_task(self._run_one(key), name=f"reconcile {key[0]}/{key[1]}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                timeout = max(self._heap[0][0] - now, 1e-3) if self._heap else None
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_one(self, key: Key) -> None:
        delay: float | None = None
        try:
            async with self._sem:
                delay = await self._work(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile of %s/%s crashed", *key)
            delay = 60.0
        finally:
            self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.trigger(key, 0.0, replace=True)
        elif delay is not None:
            self.trigger(key, delay, replace=True)
