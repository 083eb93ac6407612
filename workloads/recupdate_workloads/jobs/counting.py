"""Counting a window's successor triples: in this process, or split by user over the RayJob's cluster.

A user's triples depend only on that user's own history, so a window splits by a hash of the user id
(store.catalogue.USER_SHARD_SQL) into shards that are counted apart and then summed: the same Counts as one
process, to the count (tests/jobs/test_counting.py). Each shard is a Ray task on the job's cluster with its
own connection to the store: it streams its users' rows (iter_interactions with `shard`), derives the
triples chunk by chunk and returns the aggregated counts, at most one row per (c1, c2, c_next). Only those
counts travel back to the driver, which merges them; no shard ever holds more than one chunk of rows.

When to split (plan_counting): on the Ray executor, with more than one worker, or when the window holds more
than `shard_rows` interactions (RECUPDATE_EVIDENCE_SHARD_ROWS, default DEFAULT_SHARD_ROWS); then into at
least as many shards as the cluster has worker CPUs, and enough that none holds more than `shard_rows`.
Throughput, PostgreSQL's load and the projection to 1B interactions per window: docs/scaling.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from recupdate_workloads.contract.env import DSN_ENV, positive_int
from recupdate_workloads.data.sequences import triples
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store.db import Store, connect
from recupdate_workloads.store.evidence import Counts

log = logging.getLogger("recupdate.jobs.counting")

SHARD_ROWS_ENV = "RECUPDATE_EVIDENCE_SHARD_ROWS"
#: Above this many interactions in a window, its counting is split even on one worker, into shards of at
#: most this many (Ray tasks that an autoscaler can spread, and that retry alone): about 4 minutes of one
#: core. Kept large because every shard's query scans the whole window: an extra shard costs PostgreSQL
#: about a fifth of a single pass's CPU (docs/scaling.md).
DEFAULT_SHARD_ROWS = 200_000_000
#: A shard merges its chunks' counts every this many chunks, so its memory stays bounded by a few chunks.
_MERGE_EVERY = 16


@dataclass(frozen=True)
class CountPlan:
    """How a window is counted: in `shards` parts, on Ray or in this process ("inline")."""

    shards: int
    executor: str
    estimated_rows: int

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.executor not in ("inline", "ray"):
            raise ValueError("executor must be inline or ray")


@dataclass(frozen=True)
class ShardStats:
    """What one shard read and what it cost: rows streamed, triples counted, wall and CPU seconds of the
    process that counted it."""

    shard: int
    rows: int
    triples: int
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class WindowCounts:
    counts: Counts
    plan: CountPlan
    shards: list[ShardStats] = field(default_factory=list)
    wall_s: float = 0.0


def shard_rows_setting(default: int = DEFAULT_SHARD_ROWS) -> int:
    """The configured window size above which counting is split (RECUPDATE_EVIDENCE_SHARD_ROWS)."""
    return positive_int(SHARD_ROWS_ENV, default, unit="interactions")


def estimated_rows(store: Store, start: int | None, end: int | None) -> int:
    """The planner's estimate of the interactions with start <= ts < end, from the column statistics (no
    scan). A table never analysed gets ANALYZE first (a sample: about a second at any size): without
    statistics the planner guesses a fixed small share of the rows."""
    with store.tx() as c:
        has_stats = c.execute(
            "SELECT 1 FROM pg_stats WHERE schemaname = %s AND tablename = 'interactions' AND attname = 'ts'",
            (store.schema,),
        ).fetchone()
        if has_stats is None:
            c.execute("ANALYZE interactions")
        row = c.execute(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM interactions WHERE ts >= %s AND ts < %s",
            (start if start is not None else -(2**63), end if end is not None else 2**63 - 1),
        ).fetchone()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    return int(plan[0]["Plan"]["Plan Rows"])


def plan_counting(
    rows: int, workers: int = 1, cpus_per_worker: float = 1.0, executor: str = "ray", shard_rows: int | None = None
) -> CountPlan:
    """One shard in this process, unless the run is on Ray with more than one worker or the window holds more
    than shard_rows interactions: then max(worker CPUs, ceil(rows / shard_rows)) shards on Ray."""
    limit = shard_rows if shard_rows is not None else shard_rows_setting()
    if executor != "ray" or (workers <= 1 and rows <= limit):
        return CountPlan(1, "inline", rows)
    cpus = max(1, workers) * max(1, int(cpus_per_worker))
    return CountPlan(max(cpus, math.ceil(rows / limit)), "ray", rows)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def count_shard(
    store: Store,
    start: int,
    end: int,
    lookback: int,
    threshold: float,
    n_clusters: int,
    shard: tuple[int, int] | None = None,
    rows_per_chunk: int = 1_000_000,
) -> tuple[Counts, ShardStats]:
    """Counts of the triples with start <= ts < end of one shard's users (all users without `shard`), from
    their interactions since `lookback` (a user's state carries over from before the window)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    catalogue, item_cluster = cat.load_catalogue(store)
    parts: list[Counts] = []
    rows = 0
    for chunk in cat.iter_interactions(
        store, lookback, end, item_cluster, catalogue, rows_per_chunk=rows_per_chunk, shard=shard
    ):
        rows += len(chunk)
        parts.append(Counts.of(triples(chunk, threshold).window(start, end), n_clusters))
        if len(parts) >= _MERGE_EVERY:
            parts = [Counts.merge(parts, n_clusters)]
    counts = Counts.merge(parts, n_clusters)
    index = 0 if shard is None else shard[0]
    return counts, ShardStats(index, rows, counts.triples, time.perf_counter() - t0, _cpu_seconds() - c0)


def _count_shard_task(
    dsn: str | None, schema: str, args: tuple[int, int, int, float, int, tuple[int, int], int]
) -> tuple[Counts, ShardStats]:
    """The Ray task: its own connection (the DSN from the worker's environment unless given), one shard."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if not dsn:
        raise RuntimeError(f"a counting task needs the store DSN: set {DSN_ENV} on the workers")
    conn = connect(dsn)
    try:
        return count_shard(Store(dsn=dsn, schema=schema, conn=conn), *args)
    finally:
        conn.close()


def count_window(
    store: Store,
    start: int,
    end: int,
    threshold: float,
    n_clusters: int,
    plan: CountPlan | None = None,
    lookback: int | None = None,
    rows_per_chunk: int = 1_000_000,
) -> WindowCounts:
    """Counts of the window's triples (contexts reach back to `lookback`, by default one more window), by the
    plan: one shard in this process, several in this process one after another (inline), or on Ray."""
    t0 = time.perf_counter()
    plan = plan or CountPlan(1, "inline", 0)
    lookback = start - (end - start) if lookback is None else lookback
    if plan.shards == 1:
        counts, one = count_shard(store, start, end, lookback, threshold, n_clusters, None, rows_per_chunk)
        return WindowCounts(counts, plan, [one], time.perf_counter() - t0)
    shards = [(i, plan.shards) for i in range(plan.shards)]
    if plan.executor == "inline":
        results = [count_shard(store, start, end, lookback, threshold, n_clusters, s, rows_per_chunk) for s in shards]
    else:
        results = _on_ray(store, [(start, end, lookback, threshold, n_clusters, s, rows_per_chunk) for s in shards])
    counts = Counts.merge([c for c, _ in results], n_clusters)
    stats = [s for _, s in results]
    log.info(
        "counted %d interactions in %d shards (%s) in %.1f s: %d triples",
        sum(s.rows for s in stats),
        plan.shards,
        plan.executor,
        time.perf_counter() - t0,
        counts.triples,
    )
    return WindowCounts(counts, plan, stats, time.perf_counter() - t0)


def _on_ray(store: Store, shard_args: list[tuple[Any, ...]]) -> list[tuple[Counts, ShardStats]]:
    import ray

    from recupdate_workloads.model.train_loop import ensure_ray

    ensure_ray()
    # The workers read the DSN (and its password) from their own environment when the driver did too: it
    # never travels in a task's arguments then.
    dsn = None if os.environ.get(DSN_ENV) == store.dsn else store.dsn
    task = ray.remote(num_cpus=1, max_retries=2)(_count_shard_task)
    return ray.get([task.remote(dsn, store.schema, args) for args in shard_args])


def count_for_run(
    store: Store,
    start: int,
    end: int,
    threshold: float,
    n_clusters: int,
    *,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    executor: str = "inline",
) -> Counts:
    """A run's counting of [start, end): planned from the window's estimated size and the run's cluster."""
    lookback = start - (end - start)
    plan = plan_counting(estimated_rows(store, lookback, end), workers, cpus_per_worker, executor)
    return count_window(store, start, end, threshold, n_clusters, plan, lookback).counts
