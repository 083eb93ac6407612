"""The state of one replica: the current release, reconfigure() beside it and an atomic swap, and the ranking
of one request (table hit, online generation, evidence, popularity)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from fastapi import HTTPException

from recupdate_workloads.contract.analysis import in_canary
from recupdate_workloads.contract.redact import redact, redact_logs
from recupdate_workloads.contract.serve import UserConfig
from recupdate_workloads.data.types import PairEvidence
from recupdate_workloads.serving.intake import Intake
from recupdate_workloads.serving.metrics import ServingMetrics, gauge_refresh_s
from recupdate_workloads.serving.release import (
    Loaded,
    _bounded_put,
    canary_config,
    last_two_distinct,
    load_release,
    rank_online,
    swap_duty,
)
from recupdate_workloads.serving.schema import RecommendRequest, UnknownClusters

log = logging.getLogger("recupdate.serving")
redact_logs(log)  # a load error may quote the DSN (libpq does), and tracebacks repeat it


@contextlib.contextmanager
def _short_gil_slices(seconds: float = 0.0005) -> Iterator[None]:
    """Let the event loop thread take the GIL back sooner from a loader thread (5 ms slices by default; measured
    with a 173-cluster table: event-loop lag p99 during a load 48-59 ms -> 21-22 ms). Process-wide, restored
    after; C calls that hold the GIL throughout (psycopg's fetchall, numpy conversions) are not shortened."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


RankFn = Callable[[Loaded, int, int, PairEvidence | None], tuple[tuple[int, float], ...]]
Loader = Callable[[UserConfig], Loaded]


class RecommenderService:
    """The state of one replica: the current bundle, the last reconfigure's outcome, and the worker threads
    for the store and the model (one model thread: calls queue instead of oversubscribing the CPU, and at most
    ``max_pending_model_calls`` wait; beyond that a miss is answered from evidence at once)."""

    def __init__(
        self,
        *,
        loader: Loader | None = None,
        rank_fn: RankFn = rank_online,
        max_pending_model_calls: int = 4,
        retry_delays_s: Sequence[float] = (2.0, 5.0, 15.0, 30.0, 60.0),
        environ: Mapping[str, str] | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.loaded: Loaded | None = None
        self.metrics = metrics or ServingMetrics()
        # The second slot: a canary candidate and the percentage of users it answers (docs/analysis.md). Set
        # together with `loaded`, in one step of the event loop, so a request never sees half a rollout.
        self.canary: tuple[Loaded, float] | None = None
        self.loader: Loader = loader or (lambda cfg: load_release(cfg))
        # A background swap loads at a bounded rate (release.swap_duty); a custom loader is called as it is.
        self._swap_loader: Loader = (
            self.loader if loader is not None else (lambda cfg: load_release(cfg, duty=swap_duty(environ)))
        )
        self.rank_fn = rank_fn
        self.last_error: str | None = None
        self.last_attempt: dict[str, Any] | None = None
        self.last_attempt_at: float | None = None
        self.reconfigures = 0
        self._lock = asyncio.Lock()
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="recupdate-model")
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="recupdate-store")
        self._model_slots = threading.BoundedSemaphore(max(1, max_pending_model_calls))
        self._retry_delays = tuple(retry_delays_s)
        self._retry: asyncio.Task | None = None
        self._gauges: asyncio.Task | None = None
        self._generation = 0
        self.loading: str | None = None
        self._replica = os.environ.get("RAY_SERVE_REPLICA_ID") or f"pid-{os.getpid()}"
        self.target: UserConfig | None = None  # the latest valid user_config, loaded or not
        # The event intake writes to the served release's schema (or, before one loads, the target's); it reads
        # the DSN and its settings from ``environ`` (default: the process environment).
        self.intake: Intake | None = Intake(self.store_target, environ=environ)

    # -- releases --

    async def reconfigure(self, user_config: Mapping[str, Any]) -> bool:
        """Load the release beside the current one and swap it in. On failure keep the current one, record the
        error and retry in the background (with backoff) while this stays the target. Never raises: a raising
        reconfigure would make Serve restart the replica and drop the release that still works.

        With ``background_swap`` (and a release already serving) it returns at once and the load and swap
        happen in the background: Serve takes a replica out of routing while its reconfigure() runs, which
        with a single replica would queue every request for the whole load. Returns whether the release is
        (being) served; a later reconfigure supersedes a load still in flight."""
        self._generation += 1
        gen = self._generation
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
        cfg = dict(user_config)
        self.loading = str(cfg.get("release_id"))
        if cfg.get("background_swap") and self.loaded is not None:
            self._retry = asyncio.get_running_loop().create_task(self._attempt_then_retry(cfg, gen))
            return True
        ok = await self._attempt(cfg, gen)
        if not ok and self._retry_delays and gen == self._generation:
            self._retry = asyncio.get_running_loop().create_task(self._retry_loop(cfg, gen))
        return ok

    async def _attempt_then_retry(self, cfg: dict[str, Any], gen: int) -> None:
        if not await self._attempt(cfg, gen) and self._retry_delays:
            await self._retry_loop(cfg, gen)

    async def _retry_loop(self, cfg: dict[str, Any], gen: int) -> None:
        for delay in (*self._retry_delays, *([self._retry_delays[-1]] * 1000)):
            await asyncio.sleep(delay)
            if gen != self._generation or await self._attempt(cfg, gen):
                return

    async def _attempt(self, user_config: dict[str, Any], gen: int) -> bool:
        async with self._lock:
            if gen != self._generation:
                return False  # superseded while waiting for the lock
            self.last_attempt = user_config
            self.last_attempt_at = time.time()
            self.reconfigures += 1
            old = self.loaded
            old_canary = self.canary[0] if self.canary is not None else None
            new_canary: Loaded | None = None
            self.loading = str(user_config.get("release_id"))
            try:
                cfg = UserConfig.model_validate(user_config)
                self.target = cfg
                if old is not None and old.config.same_release(cfg):
                    new = replace(old, config=cfg)  # only tuning knobs changed: keep the data, share caches
                elif old is None:
                    new = await asyncio.to_thread(self.loader, cfg)
                else:
                    load = self._swap_loader if cfg.background_swap else self.loader
                    with _short_gil_slices():  # requests keep being answered while the loader thread runs
                        new = await asyncio.to_thread(load, cfg)
                # The canary slot: loaded beside the served release, or kept when it is the same candidate. A
                # candidate that fails to load fails the whole reconfigure (retried), so the canary arm is only
                # ever answered by the candidate it is scored as.
                ccfg = canary_config(cfg)
                if ccfg is not None and old_canary is not None and old_canary.config.same_release(ccfg):
                    new_canary = replace(old_canary, config=ccfg)
                elif ccfg is not None:
                    try:
                        with _short_gil_slices():
                            new_canary = await asyncio.to_thread(self.loader, ccfg)
                    except BaseException:
                        if new is not old and new.store is not (old.store if old else None):
                            new.close()
                        raise
            except Exception as exc:
                error = redact(f"{type(exc).__name__}: {exc}")  # shown by /release, /healthz and logs
                if gen == self._generation:
                    self.last_error = error
                log.error(
                    "reconfigure to %s failed; still serving %s: %s",
                    user_config.get("release_id"),
                    old.release_id if old else None,
                    error,
                    exc_info=not isinstance(exc, (LookupError, ValueError)),
                )
                return False
            finally:
                if gen == self._generation:
                    self.loading = None
            if gen != self._generation:  # a newer reconfigure arrived during the load: drop this one
                if new.store is not (old.store if old else None):
                    new.close()
                if new_canary is not None and new_canary.store is not (old_canary.store if old_canary else None):
                    new_canary.close()
                return False
            # The swap: two assignments with no await between them, so no request sees one without the other.
            self.loaded = new
            self.canary = (new_canary, float(cfg.canary.percent)) if new_canary is not None and cfg.canary else None
            self.last_error = None
            loop = asyncio.get_running_loop()
            self.metrics.served(new.config.table_version, new.load_seconds)
            if self._gauges is None:
                self._gauges = loop.create_task(self._keep_gauges())
            if old is not None and old is not new and old.store is not new.store:
                # Requests in flight hold their own reference; the old bundle's memory goes with the last one.
                loop.call_later(30.0, old.close)
            if old_canary is not None and (new_canary is None or old_canary.store is not new_canary.store):
                loop.call_later(30.0, old_canary.close)
            log.info(
                "serving release %s (table v%s, adapter %s) loaded in %.2fs",
                new.release_id,
                new.config.table_version,
                new.config.adapter_uri,
                new.load_seconds,
            )
            return True

    async def _keep_gauges(self) -> None:
        every = gauge_refresh_s()
        while True:
            await asyncio.sleep(every)
            self.metrics.refresh()

    def store_target(self) -> tuple[str, str] | None:
        """(store_schema, dsn_env) of the served release, else of the latest valid target; None before any."""
        cfg = self.loaded.config if self.loaded is not None else self.target
        return (cfg.store_schema, cfg.dsn_env) if cfg is not None else None

    def release_info(self) -> dict[str, Any]:
        b = self.loaded
        info: dict[str, Any] = {
            "release_id": b.release_id if b else None,
            "table_version": b.config.table_version if b else None,
            "adapter_uri": b.config.adapter_uri if b else None,
            "store_schema": b.config.store_schema if b else None,
            "base_model": b.base_model if b else None,
            "online_generation": bool(b and b.model is not None),
            "loaded_at": datetime.fromtimestamp(b.loaded_at, UTC).isoformat() if b else None,
            "load_seconds": round(b.load_seconds, 4) if b else None,
            "pairs": len(b.table_index) if b else 0,
            "clusters": len(b.catalogue) if b else 0,
            "warnings": list(b.warnings) if b else [],
            "loading": self.loading,
            "last_reconfigure_failed": self.last_error is not None,
            "last_reconfigure_error": redact(self.last_error) if self.last_error is not None else None,
            "last_reconfigure_target": (self.last_attempt or {}).get("release_id"),
            "last_reconfigure_at": (
                datetime.fromtimestamp(self.last_attempt_at, UTC).isoformat() if self.last_attempt_at else None
            ),
            "reconfigures": self.reconfigures,
            "replica": self._replica,
            "served": self.metrics.snapshot(),
            "canary": (
                {
                    "release_id": self.canary[0].release_id,
                    "table_version": self.canary[0].config.table_version,
                    "percent": self.canary[1],
                }
                if self.canary is not None
                else None
            ),
        }
        return info

    # -- requests --

    def bundle_for(self, user_id: str | None) -> Loaded | None:
        """The bundle that answers this user: the canary candidate for the users its hash selects
        (contract.analysis.in_canary, the split the operator scores by), else the served release."""
        b, canary = self.loaded, self.canary
        if canary is not None and in_canary(user_id, canary[1]):
            return canary[0]
        return b

    def _bundle(self, user_id: str | None = None) -> Loaded:
        b = self.bundle_for(user_id)
        if b is None:
            raise HTTPException(503, detail=f"no release loaded yet ({self.last_error or 'loading'})")
        return b

    async def recommend(self, req: RecommendRequest) -> bytes:
        """One context's answer, as /recommend's body."""
        b = self._bundle(req.user_id)  # read once: everything below uses this bundle only
        ctx = last_two_distinct(b.resolve(req.recent_clusters))
        quick = self._quick(b, ctx, req.n)
        body, outcome = quick if quick is not None else await self._slow(b, ctx, req.n)
        self.metrics.outcomes("recommend", {outcome: 1})
        return body

    async def recommend_batch(self, reqs: list[RecommendRequest]) -> bytes:
        """Many contexts from one bundle: ``{"results": [...], "release": ...}``, each result the body
        /recommend answers for that context. Every item is resolved first, so one bad item fails the batch
        with errors naming each bad item; misses are answered concurrently. A batch is one release's answer:
        the served one, also during a canary (which splits single requests by user; docs/analysis.md)."""
        b = self._bundle()
        ctxs: list[list[int]] = []
        errors: list[dict[str, Any]] = []
        for i, req in enumerate(reqs):
            try:
                ctxs.append(last_two_distinct(b.resolve(req.recent_clusters, ("body", "requests", i))))
            except UnknownClusters as exc:
                errors.extend(exc.errors)
        if errors:
            raise UnknownClusters(errors)
        bodies: list[bytes | None] = []
        counts = dict.fromkeys(("table_hit", "online", "evidence", "popular"), 0)
        misses: list[int] = []
        for i, (req, ctx) in enumerate(zip(reqs, ctxs, strict=True)):
            quick = self._quick(b, ctx, req.n)
            if quick is None:
                misses.append(i)
                bodies.append(None)
            else:
                bodies.append(quick[0])
                counts[quick[1]] += 1
        if misses:
            for i, (body, outcome) in zip(
                misses, await asyncio.gather(*(self._slow(b, ctxs[i], reqs[i].n) for i in misses)), strict=True
            ):
                bodies[i] = body
                counts[outcome] += 1
        self.metrics.outcomes("batch", counts)
        return b'{"results":[' + b",".join(x for x in bodies if x is not None) + b'],"release":' + b.release_json + b"}"

    @staticmethod
    def _quick(b: Loaded, ctx: list[int], n: int) -> tuple[bytes, str] | None:
        """The answer without waiting (a table hit, or popularity for a short context); None for a miss."""
        if len(ctx) < 2:
            return b.body(b.fill_popular([], set(ctx), n)), "popular"
        row = b.table_index.get((ctx[0], ctx[1]))
        if row is None:
            return None
        entries, used = b.table_entries(row, n)
        used.update(ctx)
        return b.body(b.fill_popular(entries, used, n)), "table_hit"

    async def _slow(self, b: Loaded, ctx: list[int], n: int) -> tuple[bytes, str]:
        entries, used, outcome = await self._miss(b, ctx[0], ctx[1], n)
        return b.body(b.fill_popular(entries, used, n)), outcome

    async def _miss(self, b: Loaded, c1: int, c2: int, n: int) -> tuple[list[str], set[int], str]:
        loop = asyncio.get_running_loop()
        key = (c1, c2)
        ev: PairEvidence | None = None
        if key in b.evidence_cache:
            ev = b.evidence_cache[key]
        elif b.store is not None and b.config.evidence_timeout_ms > 0:
            fut = loop.run_in_executor(self._io_pool, b.evidence_for, c1, c2)
            try:
                ev = await asyncio.wait_for(asyncio.shield(fut), b.config.evidence_timeout_ms / 1000)
            except TimeoutError:
                log.warning("evidence for %s past %.0f ms", key, b.config.evidence_timeout_ms)
            except Exception as exc:
                log.warning("evidence for %s failed: %s", key, exc)
        ranked = b.model_cache.get(key) if b.model is not None else None
        if ranked is None and b.model is not None and b.config.online_timeout_ms > 0:
            if self._model_slots.acquire(blocking=False):
                fut2 = loop.run_in_executor(self._model_pool, self._rank_and_cache, b, c1, c2, ev)
                try:
                    ranked = await asyncio.wait_for(asyncio.shield(fut2), b.config.online_timeout_ms / 1000)
                except TimeoutError:
                    pass  # the ranking goes on in its thread and lands in the cache for the next request
                except Exception as exc:
                    log.warning("online generation for %s failed: %s", key, exc)
            else:
                log.debug("model busy; answering %s from evidence", key)
        if ranked:
            return (*b.ranked_entries(ranked, "model", n, {c1, c2}), "online")
        if ev is not None and ev.successors:
            return (
                *b.ranked_entries([(s.cluster, s.share) for s in ev.successors], "evidence", n, {c1, c2}),
                "evidence",
            )
        return [], {c1, c2}, "popular"

    def _rank_and_cache(
        self, b: Loaded, c1: int, c2: int, ev: PairEvidence | None
    ) -> tuple[tuple[int, float], ...] | None:
        try:
            ranked = self.rank_fn(b, c1, c2, ev)
            _bounded_put(b.model_cache, (c1, c2), ranked)
            return ranked
        finally:
            self._model_slots.release()

    def shutdown(self) -> None:
        for task in (self._retry, self._gauges):
            if task is not None:
                task.cancel()
        self._model_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        if self.canary is not None:
            self.canary[0].close()
        if self.intake is not None:
            self.intake.close()
