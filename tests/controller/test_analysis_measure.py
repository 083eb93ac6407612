"""The operator's SQL measure of an analysis on live events (registry.measure_analysis) on the embedded store,
against a reference computed with the workloads' own triples (data/sequences.py) and hit rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

from recupdate_operator.api import AnalysisMode, AnalysisPhase, AnalysisStatus, PolicySpec
from recupdate_operator.backends import PolicyRef
from recupdate_operator.registry import Registry, StoreSettings
from recupdate_workloads.contract.analysis import BUCKETS, CANARY_BUCKET_SQL, HIT_K, canary_bucket, in_canary
from recupdate_workloads.data.sequences import triples_from_arrays
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store  # tests only
from recupdate_workloads.store.tables import publish_table

N_CLUSTERS, N_ITEMS, N_USERS = 8, 40, 300
SINCE = 1_000_000  # analysis start (unix seconds); events span [SINCE - 1000, SINCE + 1000)
STARTED = datetime.fromtimestamp(SINCE, UTC)


@pytest.fixture
def registry(pg_dsn: str) -> Any:
    r = Registry(None, StoreSettings(default_dsn=pg_dsn))
    yield r
    r.close()


def _world(store: Store) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    item_cluster = np.arange(N_ITEMS) % N_CLUSTERS
    n = 6000
    user = rng.integers(0, N_USERS, n)
    item = rng.integers(0, N_ITEMS, n)
    ts = rng.integers(SINCE - 1000, SINCE + 1000, n)
    weight = rng.choice([2.0, 4.0, 5.0], n)
    with store.tx() as c:
        for k in range(N_CLUSTERS):
            c.execute("INSERT INTO clusters (cluster, name, external) VALUES (%s, %s, %s)", (k, f"c{k}", f"c{k}"))
        for i in range(N_ITEMS):
            c.execute(
                "INSERT INTO items (item_id, cluster, external) VALUES (%s, %s, %s)", (i, int(item_cluster[i]), str(i))
            )
        for u in range(0, N_USERS, 3):  # a third of the users came in with external ids
            c.execute("INSERT INTO user_ids (user_id, external) VALUES (%s, %s)", (u, f"user-{u}"))
        with c.cursor().copy("COPY interactions (user_id, item_id, ts, weight) FROM STDIN") as cp:
            for row in zip(user.tolist(), item.tolist(), ts.tolist(), weight.tolist(), strict=True):
                cp.write_row(row)
    pairs = [(a, b) for a in range(N_CLUSTERS) for b in range(N_CLUSTERS) if a != b]
    c1 = np.array([p[0] for p in pairs], np.int32)
    c2 = np.array([p[1] for p in pairs], np.int32)
    tables = {}
    for name, seed in (("good", 1), ("bad", 2)):
        r = np.random.default_rng(seed)
        ids = np.stack([r.permutation(N_CLUSTERS)[:6] for _ in pairs]).astype(np.int32)
        version = publish_table(
            store, c1, c2, ids, np.ones(ids.shape, np.float32), np.zeros(len(pairs), np.int8), None, None
        )
        tables[name] = (version, {p: ids[i, :HIT_K].tolist() for i, p in enumerate(pairs)})
    with store.tx() as c:
        c.execute("INSERT INTO runs (run_id, kind, status) VALUES ('r', 'refresh', 'succeeded')")
    for rid, name, state in (("rel-a", "good", "active"), ("rel-c", "bad", "candidate")):
        reg.register_release(store, reg.Release(rid, "b", None, None, tables[name][0], None, run_id="r"))
        if state == "active":
            reg.activate(store, rid)
    t = triples_from_arrays(user, item, ts, weight, item_cluster, 4.0)
    after = t.ts > SINCE
    return {"triples": (t.user[after], t.c1[after], t.c2[after], t.c_next[after]), "tables": tables}


def _reference(world: dict[str, Any], percent: int) -> tuple[int, int, int, int]:
    users, c1, c2, nxt = world["triples"]
    cand, base = world["tables"]["bad"][1], world["tables"]["good"][1]
    out = [0, 0, 0, 0]
    for u, a, b, n in zip(users.tolist(), c1.tolist(), c2.tolist(), nxt.tolist(), strict=True):
        ext = f"user-{u}" if u % 3 == 0 else str(u)
        arm_c = in_canary(ext, percent) if percent else True
        arm_b = not in_canary(ext, percent) if percent else True
        if arm_c:
            out[0] += 1
            out[1] += n in cand[(a, b)]
        if arm_b:
            out[2] += 1
            out[3] += n in base[(a, b)]
    return tuple(out)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", [AnalysisMode.SHADOW, AnalysisMode.CANARY])
def test_measure_matches_the_workloads_triples(registry: Registry, store: Store, mode: AnalysisMode) -> None:
    world = _world(store)
    percent = 30 if mode == AnalysisMode.CANARY else 0
    spec = PolicySpec.model_validate({"store": {"schema": store.schema}, "gates": {"analysis": {"mode": mode.value}}})
    ref = PolicyRef("recs", "ml", "u", spec)
    view = registry.read(ref)
    status = AnalysisStatus(
        release_id="rel-c",
        baseline_release="rel-a",
        mode=mode,
        traffic_percent=percent,
        started_at=STARTED,
        ends_at=STARTED + timedelta(hours=1),
    )
    got = registry.with_analysis(ref, {"analysis": status.model_dump(mode="json", by_alias=True)}, view).analysis
    assert got is not None and got.error is None
    expected = _reference(world, percent)
    assert (got.candidate_events, got.candidate_hits, got.baseline_events, got.baseline_hits) == expected
    assert expected[0] > 100 and expected[2] > 100  # the test means something
    if mode == AnalysisMode.SHADOW:
        assert got.candidate_events == got.baseline_events
    else:
        share = got.candidate_events / (got.candidate_events + got.baseline_events)
        assert 0.15 < share < 0.45

    # Not running, or not configured: nothing is measured.
    done = status.model_copy(update={"phase": AnalysisPhase.PROMOTED})
    assert registry.with_analysis(ref, {"analysis": done.model_dump(mode="json", by_alias=True)}, view).analysis is None


def test_a_missing_table_is_an_error_not_a_crash(registry: Registry, store: Store) -> None:
    _world(store)
    spec = PolicySpec.model_validate({"store": {"schema": store.schema}, "gates": {"analysis": {}}})
    ref = PolicyRef("recs", "ml", "u", spec)
    with store.tx() as c:
        c.execute("DROP TABLE transitions_v2")
    a = AnalysisStatus(release_id="rel-c", baseline_release="rel-a", started_at=STARTED)
    got = registry.measure_analysis(ref, a, registry.read(ref))
    assert got.error and "transitions_v2" in got.error
    got = registry.measure_analysis(ref, a.model_copy(update={"release_id": "nope"}), registry.read(ref))
    assert got.error == "no transition table for nope"


def test_record_analysis_keeps_the_figures(registry: Registry, store: Store) -> None:
    _world(store)
    ref = PolicyRef("recs", "ml", "u", PolicySpec.model_validate({"store": {"schema": store.schema}}))
    registry.record_analysis(ref, "rel-c", "Aborted", {"candidateHitRate": 0.1, "baselineHitRate": 0.2})
    with store.tx() as c:
        gates = c.execute("SELECT gates FROM releases WHERE release_id = 'rel-c'").fetchone()[0]
    assert gates["analysis"] == {"candidateHitRate": 0.1, "baselineHitRate": 0.2, "verdict": "Aborted"}


@pytest.mark.parametrize("user", ["", "0", "42", "user-7", "Zoë", "a" * 256])
def test_the_canary_bucket_is_the_same_in_sql(pg_dsn: str, user: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(f"SELECT {CANARY_BUCKET_SQL.format(user='%s::text')}", (user,)).fetchone()
    assert row is not None and int(row[0]) == canary_bucket(user)
    assert 0 <= canary_bucket(user) < BUCKETS
    assert json.dumps(in_canary(None, 50)) == "false"


def test_the_canary_bucket_agrees_on_many_users(pg_dsn: str) -> None:
    users = [f"u{i}" for i in range(500)]  # about half of them have a SHA-256 whose top bit is set
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            f"SELECT u, {CANARY_BUCKET_SQL.format(user='u')} FROM unnest(%s::text[]) u", (users,)
        ).fetchall()
    assert {u: int(b) for u, b in rows} == {u: canary_bucket(u) for u in users}
    assert 35 <= sum(in_canary(u, 10) for u in users) <= 65
