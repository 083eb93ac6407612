"""Counting a window split by user: every split gives the counts of one process, to the count; on a local Ray
too (the ray+slow test), and through the refresh's snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import DAY, SyntheticSpec, SyntheticStream
from recupdate_workloads.data.types import InteractionLog
from recupdate_workloads.jobs import counting
from recupdate_workloads.jobs.config import RunConfig
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store.db import Store

SPEC = SyntheticSpec(n_interactions=40_000, n_clusters=12, days=360, seed=4)


@pytest.fixture
def loaded(store: Store) -> Store:
    s = SyntheticStream(SPEC)
    log = s.generate()
    # user ids spread out and negative too, so that shards come from the hash, not from id ranges
    log = InteractionLog(log.user * 7919 - 10**9, log.item, log.ts, log.weight, log.item_cluster, log.catalogue)
    cat.save_catalogue(store, s.catalogue, s.item_cluster, embed=False)
    cat.append_interactions(store, log)
    return store


def _window() -> tuple[int, int]:
    return SPEC.start + 200 * DAY, SPEC.start + 300 * DAY


def _same(a: ev.Counts, b: ev.Counts) -> bool:
    return a.triples == b.triples and all(
        np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype
        for f in ("c1", "c2", "c_next", "count")
    )


def test_shards_partition_the_users(loaded: Store) -> None:
    catalogue, item_cluster = cat.load_catalogue(loaded)
    users = [
        np.concatenate(
            [c.user for c in cat.iter_interactions(loaded, None, None, item_cluster, catalogue, shard=(i, 3))]
        )
        for i in range(3)
    ]
    everyone = np.unique(np.concatenate(users))
    assert sum(len(np.unique(u)) for u in users) == len(everyone) == SPEC.n_users  # disjoint, and all of them
    assert min(len(u) for u in users) > 0.25 * SPEC.n_interactions  # even enough: about a third each
    with pytest.raises(ValueError, match="shard 3 of 3"):
        next(cat.iter_interactions(loaded, None, None, item_cluster, catalogue, shard=(3, 3)))


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_sharded_counts_equal_single_process_counts(loaded: Store, shards: int) -> None:
    start, end = _window()
    one = counting.count_window(loaded, start, end, 3.5, SPEC.n_clusters)
    split = counting.count_window(loaded, start, end, 3.5, SPEC.n_clusters, counting.CountPlan(shards, "inline", 0))
    assert len(one.counts.c1) > 200 and one.counts.triples > 1000
    assert _same(split.counts, one.counts)
    assert [s.shard for s in split.shards] == list(range(shards))
    assert sum(s.rows for s in split.shards) == one.shards[0].rows  # every row read once
    # and both are the counts of the whole log in memory
    s = SyntheticStream(SPEC)
    log = s.generate()
    log = InteractionLog(log.user * 7919 - 10**9, log.item, log.ts, log.weight, log.item_cluster, log.catalogue)
    lookback = start - (end - start)
    log = log.select((log.ts >= lookback) & (log.ts < end))
    assert _same(one.counts, ev.Counts.of(triples(log, 3.5).window(start, end), SPEC.n_clusters))


def test_merge_is_the_count_of_the_union_dense_or_sorted() -> None:
    rng = np.random.default_rng(0)

    def part(n: int, k: int) -> ev.Counts:
        key = np.unique(rng.integers(0, k**3, n))
        pair, cn = np.divmod(key, k)
        c1, c2 = np.divmod(pair, k)
        cnt = rng.integers(1, 50, len(key))
        return ev.Counts(c1.astype(np.int32), c2.astype(np.int32), cn.astype(np.int32), cnt, int(cnt.sum()))

    for k in (20, 300):  # 20^3 keys counted densely; 300^3 above DENSE_COUNT_LIMIT, by sorting
        parts = [part(5000, k) for _ in range(4)] + [ev.Counts.empty()]
        merged = ev.Counts.merge(parts, k)
        want: dict[tuple[int, int, int], int] = {}
        for p in parts:
            for row in zip(p.c1.tolist(), p.c2.tolist(), p.c_next.tolist(), p.count.tolist(), strict=True):
                want[row[:3]] = want.get(row[:3], 0) + row[3]
        got = dict(
            zip(
                zip(merged.c1.tolist(), merged.c2.tolist(), merged.c_next.tolist(), strict=True),
                merged.count.tolist(),
                strict=True,
            )
        )
        assert got == want and list(got) == sorted(want)
        assert merged.triples == sum(p.triples for p in parts) and merged.count.dtype == np.int64


@pytest.mark.parametrize(
    ("rows", "workers", "cpus", "executor", "want"),
    [
        (10_000, 1, 1.0, "ray", (1, "inline")),  # small window, one worker: this process
        (10_000, 3, 1.0, "ray", (3, "ray")),  # several workers: one shard per worker CPU
        (10_000, 2, 4.0, "ray", (8, "ray")),
        (250, 1, 1.0, "ray", (3, "ray")),  # above shard_rows (100): enough shards of at most 100
        (250, 4, 1.0, "ray", (4, "ray")),
        (10**9, 4, 1.0, "inline", (1, "inline")),  # no Ray: this process, whatever the size
    ],
)
def test_plan_counting(rows: int, workers: int, cpus: float, executor: str, want: tuple[int, str]) -> None:
    plan = counting.plan_counting(rows, workers, cpus, executor, shard_rows=100 if rows < 1000 else 10**6)
    assert (plan.shards, plan.executor) == want


def test_shard_rows_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(counting.SHARD_ROWS_ENV, raising=False)
    assert counting.shard_rows_setting() == counting.DEFAULT_SHARD_ROWS
    monkeypatch.setenv(counting.SHARD_ROWS_ENV, "20_000_000")
    assert counting.shard_rows_setting() == 20_000_000
    assert counting.plan_counting(30_000_000, 1, 1.0, "ray").shards == 2
    for bad in ("lots", "0"):
        monkeypatch.setenv(counting.SHARD_ROWS_ENV, bad)
        with pytest.raises(ValueError, match=counting.SHARD_ROWS_ENV):
            counting.shard_rows_setting()


def test_estimated_rows_follow_the_statistics(loaded: Store) -> None:
    loaded.conn.execute(f'ANALYZE "{loaded.schema}".interactions')
    start, end = _window()
    est = counting.estimated_rows(loaded, start - (end - start), end)
    with loaded.tx() as c:
        row = c.execute("SELECT count(*) FROM interactions WHERE ts >= %s AND ts < %s", (start - (end - start), end))
        true = row.fetchone()[0]  # type: ignore[index]
    assert 0.7 * true <= est <= 1.3 * true


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from recupdate_workloads.model.train_loop import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_shards_equal_single_process_and_the_refresh_uses_them(
    ray_session, loaded: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, end = _window()
    one = counting.count_window(loaded, start, end, 3.5, SPEC.n_clusters)
    on_ray = counting.count_window(loaded, start, end, 3.5, SPEC.n_clusters, counting.CountPlan(2, "ray", 0))
    assert _same(on_ray.counts, one.counts) and len(on_ray.shards) == 2
    assert all(s.rows > 0 for s in on_ray.shards)

    # The refresh's snapshot, counted on Ray because the window is above the configured size, is the snapshot
    # of the single-process count.
    from recupdate_workloads.jobs import run as jobs

    catalogue, _ = cat.load_catalogue(loaded)
    config = {
        "runId": "r1",
        "storeSchema": loaded.schema,
        "window": {"start": start, "end": end},
        "retrieval": {"window": "100d", "minSupport": 3, "neighbours": 2},
        "executor": "ray",
    }
    monkeypatch.setenv(counting.SHARD_ROWS_ENV, "5000")
    planned = counting.plan_counting(counting.estimated_rows(loaded, start - 100 * DAY, end), 1, 1.0, "ray")
    assert planned.executor == "ray" and planned.shards >= 2
    sharded = jobs.refresh_snapshot(loaded, RunConfig.parse(json.dumps(config)), end, catalogue)
    single = ev.build_snapshot(
        loaded, one.counts, (start, end), ev.EvidenceParams(top_r=5, min_support=3, neighbours=2)
    )
    assert sharded.triples == single.triples == one.counts.triples
    assert ev.load_evidence(loaded, sharded.snapshot_id) == ev.load_evidence(loaded, single.snapshot_id)
