"""Snapshots on the shared pair index: ranking in numpy equals the SQL it replaced, the index is built once per
catalogue version and reused, and its neighbours are those of a fresh index over the snapshot's donors."""

from __future__ import annotations

import numpy as np
import pytest
from psycopg import sql

from recupdate_workloads.data.types import Catalogue, Cluster
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store.db import Store


def _catalogue(store: Store, n: int, seed: int = 3) -> None:
    """n clusters with pseudo-random unit embeddings (what borrowing needs; no model load)."""
    c = Catalogue([Cluster(i, f"cluster {i}", (f"k{i}",)) for i in range(n)])
    cat.save_catalogue(store, c, np.arange(n, dtype=np.int32), embed=False)
    vec = np.random.default_rng(seed).normal(size=(n, 384)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    with store.tx() as tx:
        for i in range(n):
            tx.execute("UPDATE clusters SET embedding = %s WHERE cluster = %s", (vec[i], i))


def _random_counts(n: int, seed: int, density: float = 0.8, hi: int = 6) -> ev.Counts:
    """Counts over a share `density` of the n*(n-1) pairs, each with a few successors and small counts (many
    ties, and pairs on both sides of min_support), sorted and unique like Counts.of."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(n):
        for b in range(n):
            if a == b or rng.random() > density:
                continue
            others = [c for c in range(n) if c not in (a, b)]
            m = min(int(rng.geometric(0.35)), len(others))
            for c in sorted(rng.choice(others, size=m, replace=False).tolist()):
                rows.append((a, b, c, int(rng.integers(1, hi))))
    x = np.array(rows, dtype=np.int64)
    return ev.Counts(
        x[:, 0].astype(np.int32), x[:, 1].astype(np.int32), x[:, 2].astype(np.int32), x[:, 3], int(x[:, 3].sum())
    )


# The SQL ranking that rank_evidence replaced (store/evidence.py before the shared pair index), the reference.
_RANKED_SQL = """
WITH c AS (
    SELECT c1, c2, cn, cnt, sum(cnt) OVER (PARTITION BY c1, c2) AS support FROM _now
), prev AS (
    SELECT c1, c2, cn, cnt::real / sum(cnt) OVER (PARTITION BY c1, c2) AS share FROM _prev
), scored AS (
    SELECT c.c1, c.c2, c.cn, c.cnt, c.support, c.cnt::real / c.support AS share,
           CASE WHEN %(trend)s THEN c.cnt::real / c.support - coalesce(prev.share, 0)
                ELSE c.cnt::real / c.support END AS score
    FROM c LEFT JOIN prev USING (c1, c2, cn)
    WHERE c.support >= %(min_support)s
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY c1, c2 ORDER BY score DESC, cnt DESC, cn) AS rank FROM scored
)
SELECT c1, c2, support::int, rank::smallint, cn, cnt::int, share::real, score::real
FROM ranked WHERE rank <= %(top_r)s ORDER BY c1, c2, rank
"""


def _sql_ranking(store: Store, now: ev.Counts, prev: ev.Counts, params: ev.EvidenceParams) -> list[tuple]:
    with store.tx() as c:
        for name, counts in (("_now", now), ("_prev", prev)):
            c.execute(f"CREATE TEMP TABLE {name} (c1 int, c2 int, cn int, cnt bigint) ON COMMIT DROP")
            with c.cursor().copy(f"COPY {name} FROM STDIN") as cp:
                cols = (counts.c1, counts.c2, counts.c_next, counts.count)
                for row in zip(*(a.tolist() for a in cols), strict=True):
                    cp.write_row(row)
        args = {"trend": params.scoring == "trend", "min_support": params.min_support, "top_r": params.top_r}
        return c.execute(_RANKED_SQL, args).fetchall()


@pytest.mark.parametrize("scoring", ["frequency", "trend"])
def test_numpy_ranking_equals_the_sql_it_replaced(store: Store, scoring: str) -> None:
    now, prev = _random_counts(14, seed=1), _random_counts(14, seed=2)
    params = ev.EvidenceParams(top_r=3, min_support=6, scoring=scoring)
    r = ev.rank_evidence(now, params, prev)
    got = list(
        zip(
            r.c1.tolist(),
            r.c2.tolist(),
            r.support.tolist(),
            r.rank.tolist(),
            r.successor.tolist(),
            r.count.tolist(),
            r.share.tolist(),
            r.score.tolist(),
            strict=True,
        )
    )
    want = [
        tuple(float(np.float32(x)) if isinstance(x, float) else x for x in row)
        for row in _sql_ranking(store, now, prev, params)
    ]
    assert len(want) > 100 and got == want
    # the weak pairs: every pair of the counts below min_support, once
    support: dict[tuple[int, int], int] = {}
    for a, b, n in zip(now.c1.tolist(), now.c2.tolist(), now.count.tolist(), strict=True):
        support[(a, b)] = support.get((a, b), 0) + n
    weak = {p for p, s in support.items() if s < params.min_support}
    assert set(zip(r.weak_c1.tolist(), r.weak_c2.tolist(), strict=True)) == weak and len(r.weak_c1) == len(weak) > 0


def test_ranking_sums_duplicate_rows_and_rejects_bad_ids() -> None:
    c = ev.Counts(
        np.array([1, 1, 1], np.int32),
        np.array([2, 2, 2], np.int32),
        np.array([3, 0, 3], np.int32),
        np.array([2, 4, 5]),
        11,
    )
    r = ev.rank_evidence(c, ev.EvidenceParams(top_r=2, min_support=1))
    assert r.successor.tolist() == [3, 0] and r.count.tolist() == [7, 4] and r.support.tolist() == [11, 11]
    with pytest.raises(ValueError, match="cluster ids"):
        ev.rank_evidence(
            ev.Counts(np.array([-1], np.int32), c.c2[:1], c.c_next[:1], c.count[:1], 2), ev.EvidenceParams()
        )


def _donors(store: Store, sid: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    return {k: list(v.borrowed_from) for k, v in ev.load_evidence(store, sid).items() if v.borrowed}


def _fresh_index_donors(store: Store, sid: int, k: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The k nearest donors of each weak pair from a fresh HNSW index over this snapshot's donors only (what
    every snapshot built before the shared index), ties broken like borrow_evidence."""
    with store.tx() as c:
        c.execute(
            sql.SQL("CREATE TEMP TABLE _fresh ON COMMIT DROP AS SELECT c1, c2, embedding FROM {}").format(
                store.ident(f"evidence_pairs_s{sid}")
            )
        )
        c.execute("CREATE INDEX ON _fresh USING hnsw (embedding public.halfvec_cosine_ops)")
        c.execute("SET LOCAL hnsw.ef_search = 100")
        rows = c.execute(
            sql.SQL(
                "SELECT w.c1, w.c2, n.c1, n.c2 FROM (SELECT DISTINCT c1, c2 FROM {ev} WHERE borrowed) w"
                " JOIN {pv} q ON q.c1 = w.c1 AND q.c2 = w.c2 CROSS JOIN LATERAL ("
                "  SELECT f.c1, f.c2, 1 - (f.embedding OPERATOR(public.<=>) q.embedding) AS sim FROM _fresh f"
                "  ORDER BY f.embedding OPERATOR(public.<=>) q.embedding LIMIT %s) n"
                " ORDER BY w.c1, w.c2, greatest(n.sim, 0) DESC, n.c1, n.c2"
            ).format(ev=store.ident(f"evidence_s{sid}"), pv=store.ident(ev.pair_index(store).vectors)),
            (k,),
        ).fetchall()
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for a, b, d1, d2 in rows:
        out.setdefault((a, b), []).append((d1, d2))
    return out


def _pair_index_tables(store: Store) -> dict[str, int]:
    with store.tx() as c:
        rows = c.execute(
            "SELECT relname, oid::int FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind = 'r'"
            " AND relname LIKE 'pair\\_%%'",
            (store.schema,),
        ).fetchall()
    return dict(rows)


def test_pair_index_is_built_once_and_reused_with_the_neighbours_of_a_fresh_index(store: Store) -> None:
    _catalogue(store, 24)
    params = ev.EvidenceParams(top_r=3, min_support=5, neighbours=4)
    first = ev.build_snapshot(store, _random_counts(24, seed=5), (0, 1), params)
    tables = _pair_index_tables(store)
    assert first.parts["pair_index_built"] == 1.0 and len(tables) == 2  # vectors + lists of this catalogue
    # another window: other donors, other weak pairs; the same index
    second = ev.build_snapshot(store, _random_counts(24, seed=6, density=0.6), (1, 2), params)
    assert second.parts["pair_index_built"] == 0.0 and _pair_index_tables(store) == tables
    assert second.parts["lists_searched"] < second.borrowed_pairs  # the first snapshot's lists were kept
    for snap in (first, second):
        assert snap.borrowed_pairs > 50
        got, fresh = _donors(store, snap.snapshot_id), _fresh_index_donors(store, snap.snapshot_id, 4)
        assert set(got) <= set(fresh) and all(len(got[p]) == len(fresh[p]) == 4 for p in got)
        same = sum(len(set(got[p]) & set(fresh[p])) for p in got) / sum(len(fresh[p]) for p in got)
        assert same >= 0.98, same  # within HNSW's recall (here, on 552 pairs, it is exact)
        # the snapshot's donor view is its donors, with the shared index's vectors
        with store.tx() as c:
            n = c.execute(sql.SQL("SELECT count(*) FROM {}").format(store.ident(f"evidence_pairs_s{snap.snapshot_id}")))
            assert n.fetchone() == (snap.pairs - snap.borrowed_pairs,)


def test_borrowing_in_numpy_equals_borrow_for_in_sql(store: Store) -> None:
    """The snapshot borrows in numpy from cached lists; serving's borrow_for runs the same rule in SQL over the
    donor view. They agree on the snapshot's weak pairs."""
    _catalogue(store, 20)
    params = ev.EvidenceParams(top_r=4, min_support=5, neighbours=3)
    snap = ev.build_snapshot(store, _random_counts(20, seed=8), (0, 1), params)
    built = {k: v for k, v in ev.load_evidence(store, snap.snapshot_id).items() if v.borrowed}
    asked = ev.borrow_for(store, sorted(built), params)
    assert len(built) > 30 and set(asked) == set(built)
    for pair, e in built.items():
        a = asked[pair]
        assert a.borrowed_from == e.borrowed_from
        assert [s.cluster for s in a.successors] == [s.cluster for s in e.successors]
        assert [s.share for s in a.successors] == pytest.approx([s.share for s in e.successors], rel=1e-5)
        assert all(s.cluster not in pair for s in e.successors)


def test_short_lists_grow_or_are_searched_in_the_view(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _catalogue(store, 20)
    params = ev.EvidenceParams(top_r=4, min_support=5, neighbours=3)
    counts = _random_counts(20, seed=9)
    with monkeypatch.context() as m:  # lists of 2: every one is cut before `neighbours` donors
        m.setattr(ev, "NEIGHBOUR_LIST", 2)
        m.setattr(ev, "MAX_NEIGHBOUR_LIST", 2)
        searched = ev.build_snapshot(store, counts, (0, 1), params)
    assert searched.parts["searched_in_view"] == searched.borrowed_pairs > 30
    # lists of 2 are kept; the next snapshot, allowed longer lists, grows them and needs no search in the view
    grown = ev.build_snapshot(store, counts, (0, 1), params)
    assert grown.parts["lists_grown"] == grown.borrowed_pairs and grown.parts.get("searched_in_view") == 0
    assert ev.list_length(10, 100, 3) == 60 and ev.list_length(90, 100, 3) == ev.NEIGHBOUR_LIST
    assert ev.list_length(1, 10**6, 5) == ev.MAX_NEIGHBOUR_LIST and ev.list_length(5, 6, 5) == 5
    with store.tx() as c:  # a fresh index, never told about lists: the reference
        c.execute(sql.SQL("TRUNCATE {}").format(store.ident(ev.pair_index(store).lists)))
    fresh = ev.build_snapshot(store, counts, (0, 1), params)
    want = ev.load_evidence(store, fresh.snapshot_id)
    assert ev.load_evidence(store, searched.snapshot_id) == want == ev.load_evidence(store, grown.snapshot_id)


def test_large_catalogues_index_each_snapshot_and_agree(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _catalogue(store, 16)
    params = ev.EvidenceParams(top_r=3, min_support=5, neighbours=3)
    counts = _random_counts(16, seed=10)
    shared = ev.build_snapshot(store, counts, (0, 1), params, keep=5)
    monkeypatch.setattr(ev, "MAX_SHARED_PAIRS", 10)  # 16 clusters make 240 ordered pairs
    private = ev.build_snapshot(store, counts, (0, 1), params, keep=5)
    assert f"pair_vectors_s{private.snapshot_id}" in _pair_index_tables(store)
    assert ev.load_evidence(store, private.snapshot_id) == ev.load_evidence(store, shared.snapshot_id)
    for _ in range(2):  # the private index goes with its snapshot
        ev.build_snapshot(store, counts, (0, 1), params, keep=1)
    assert not any(t.endswith(f"_s{private.snapshot_id}") for t in _pair_index_tables(store))


def test_a_new_catalogue_version_gets_its_own_index_and_the_old_one_is_dropped(store: Store) -> None:
    _catalogue(store, 12, seed=1)
    params = ev.EvidenceParams(top_r=3, min_support=3, neighbours=2)
    counts = _random_counts(12, seed=11)
    ev.build_snapshot(store, counts, (0, 1), params, keep=1)
    old = ev.pair_index(store)
    _catalogue(store, 12, seed=2)  # new embeddings: new pair vectors
    new = ev.pair_index(store)
    assert new.version != old.version and new.built_s > 0
    ev.build_snapshot(store, counts, (0, 1), params, keep=1)
    assert set(_pair_index_tables(store)) == {new.vectors, new.lists}


def test_snapshots_of_the_earlier_layout_are_pruned(store: Store) -> None:
    """Before the shared index a snapshot's donor pairs were a table; pruning drops those too."""
    _catalogue(store, 8)
    with store.tx() as c:
        c.execute(
            "INSERT INTO snapshots (snapshot_id, window_start, window_end, scoring, top_r, min_support, state)"
            " VALUES (900, 0, 1, 'frequency', 5, 5, 'retired')"
        )
        c.execute("CREATE TABLE evidence_s900 (c1 int)")
        c.execute("CREATE TABLE evidence_pairs_s900 (c1 int, c2 int, support int, embedding public.halfvec(384))")
        c.execute("SELECT setval('snapshots_snapshot_id_seq', 900)")
    counts = _random_counts(8, seed=12)
    ev.build_snapshot(store, counts, (0, 1), ev.EvidenceParams(min_support=1), keep=1)
    with store.tx() as c:
        left = c.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = %s::regnamespace AND relname LIKE '%%\\_s900'",
            (store.schema,),
        ).fetchone()
        state = c.execute("SELECT state FROM snapshots WHERE snapshot_id = 900").fetchone()
    assert left == (0,) and state == ("dropped",)


def test_sparse_donors_get_long_lists(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Few donors among many pairs: long lists, searched with a candidate queue pgvector accepts (ef_search
    at most 1000, here for lists of 600), and the same borrowing as borrow_for's search in the donor view."""
    _catalogue(store, 40)
    params = ev.EvidenceParams(top_r=3, min_support=4, neighbours=3)
    counts = _random_counts(40, seed=13, density=0.03)
    assert ev.build_snapshot(store, counts, (0, 1), params).parts["lists_length"] > 150  # 2k / donor share
    monkeypatch.setattr(ev, "NEIGHBOUR_LIST", 600)
    monkeypatch.setattr(ev, "MAX_NEIGHBOUR_LIST", 600)
    with store.tx() as c:
        c.execute(sql.SQL("TRUNCATE {}").format(store.ident(ev.pair_index(store).lists)))
    snap = ev.build_snapshot(store, counts, (0, 1), params)
    assert snap.parts["lists_length"] == 600 and snap.parts["lists_searched"] == snap.borrowed_pairs > 5
    built = {k: v for k, v in ev.load_evidence(store, snap.snapshot_id).items() if v.borrowed}
    asked = ev.borrow_for(store, sorted(built), params)
    assert {p: e.borrowed_from for p, e in asked.items()} == {p: e.borrowed_from for p, e in built.items()}
