import threading
import time

import numpy as np
import psycopg
import pytest

from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store, connect, migrate


def _counts(rows: list[tuple[int, int, int, int]]) -> ev.Counts:
    a = np.array(rows, dtype=np.int64)
    return ev.Counts(
        a[:, 0].astype(np.int32), a[:, 1].astype(np.int32), a[:, 2].astype(np.int32), a[:, 3], int(a[:, 3].sum())
    )


def _catalogue(store: Store, n: int = 6) -> Catalogue:
    words = ["space opera", "romantic comedy", "war drama", "horror", "musical", "documentary"]
    c = Catalogue([Cluster(i, words[i], tuple(words[i].split())) for i in range(n)])
    cat.save_catalogue(store, c, np.arange(n, dtype=np.int32))
    return c


def test_migrations_are_idempotent(store: Store) -> None:
    assert migrate(store.conn, store.schema) == []
    with store.tx() as c:
        tables_ = {r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (store.schema,))}
    assert {"runs", "releases", "snapshots", "transition_tables", "interactions", "clusters"} <= tables_


def test_copy_round_trip(store: Store) -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=30_000, n_clusters=8))
    log = s.generate()
    cat.save_catalogue(store, s.catalogue, s.item_cluster, embed=False)
    assert cat.append_interactions(store, log) == 30_000
    assert cat.count_interactions(store) == 30_000
    chunks = list(
        cat.iter_interactions(store, None, None, s.item_cluster, s.catalogue, rows_per_chunk=5_000, users_per_block=100)
    )
    assert sum(len(c) for c in chunks) == 30_000 and len(chunks) > 1
    # whole users per chunk, so triples from chunks equal triples from the whole log
    per_chunk = sum(len(triples(c, 3.5)) for c in chunks)
    assert per_chunk == len(triples(log, 3.5))
    catalogue, item_cluster = cat.load_catalogue(store)
    assert [c.name for c in catalogue.clusters] == [c.name for c in s.catalogue.clusters]
    assert np.array_equal(item_cluster, s.item_cluster)


def test_streamed_rows_are_the_window_in_user_time_item_order(store: Store) -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=20_000, n_clusters=8))
    log = s.generate()
    log = InteractionLog(log.user - 700, log.item, log.ts, log.weight, log.item_cluster, log.catalogue)  # ids < 0 too
    cat.save_catalogue(store, s.catalogue, s.item_cluster, embed=False)
    cat.append_interactions(store, log)
    lo, hi = int(np.quantile(log.ts, 0.2)), int(np.quantile(log.ts, 0.9))
    chunks = list(
        cat.iter_interactions(store, lo, hi, s.item_cluster, s.catalogue, rows_per_chunk=3_000, users_per_block=50)
    )
    got = {f: np.concatenate([getattr(c, f) for c in chunks]) for f in ("user", "item", "ts", "weight")}
    m = (log.ts >= lo) & (log.ts < hi)
    order = np.lexsort((log.item[m], log.ts[m], log.user[m]))
    for f in ("user", "item", "ts", "weight"):
        assert np.array_equal(got[f], getattr(log, f)[m][order]), f
    firsts, lasts = [c.user[0] for c in chunks], [c.user[-1] for c in chunks]
    assert len(chunks) > 2 and all(a < b for a, b in zip(lasts[:-1], firsts[1:], strict=True))  # whole users


def test_block_size_follows_history_length(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=20_000, n_clusters=8))
    log = s.generate()
    cat.save_catalogue(store, s.catalogue, s.item_cluster, embed=False)
    cat.append_interactions(store, log)
    assert cat.block_size(store) == cat.USERS_PER_BLOCK  # no statistics yet
    store.conn.execute(f'ANALYZE "{store.schema}".interactions')
    per_user = len(log) / len(np.unique(log.user))
    monkeypatch.setattr(cat, "ROWS_PER_BLOCK", int(per_user * 40))  # as if users had 25x longer histories
    assert 20 <= cat.block_size(store) <= 80  # about 40 users per block (n_distinct is an estimate)
    chunks = list(cat.iter_interactions(store, None, None, s.item_cluster, s.catalogue, rows_per_chunk=1))
    assert sum(len(c) for c in chunks) == len(log) and len(chunks) > 5  # one chunk per block here


def test_evidence_frequency_and_trend(store: Store) -> None:
    _catalogue(store)
    now = _counts([(0, 1, 2, 6), (0, 1, 3, 3), (0, 1, 4, 1), (2, 3, 4, 1)])
    prev = _counts([(0, 1, 2, 10), (0, 1, 3, 1)])
    p = ev.EvidenceParams(top_r=2, min_support=5, scoring="frequency")
    ev.build_snapshot(store, now, (100, 200), p)
    e = ev.load_evidence(store)
    top = e[(0, 1)]
    assert top.support == 10 and not top.borrowed
    assert [(s.cluster, s.count, round(s.share, 2)) for s in top.successors] == [(2, 6, 0.6), (3, 3, 0.3)]
    ev.build_snapshot(store, now, (100, 200), ev.EvidenceParams(top_r=2, min_support=5, scoring="trend"), prev=prev)
    trend = ev.load_evidence(store)[(0, 1)]
    # cluster 3 rose from 1/11 to 0.3; cluster 2 fell from 10/11 to 0.6
    assert [s.cluster for s in trend.successors] == [3, 4]


def test_neighbour_fallback(store: Store) -> None:
    _catalogue(store)
    now = _counts([(0, 1, 2, 9), (0, 1, 3, 1), (3, 1, 5, 7), (4, 2, 0, 8), (5, 1, 2, 1)])
    snap = ev.build_snapshot(store, now, (0, 1), ev.EvidenceParams(top_r=3, min_support=5, neighbours=2))
    e = ev.load_evidence(store)
    assert snap.pairs == 4 and snap.borrowed_pairs == 1
    weak = e[(5, 1)]  # one observation only: below min support, so borrowed
    assert weak.borrowed and weak.support == 1
    assert all(s.borrowed for s in weak.successors)
    assert all(s.cluster not in (5, 1) for s in weak.successors)  # never its own clusters
    assert (0, 1) in weak.borrowed_from  # a donor sharing the newest cluster is nearest
    assert abs(sum(s.share for s in weak.successors) - 1.0) < 1e-5
    near = ev.nearest_pairs(store, 5, 1, k=3)
    assert near[0][:2] in {(0, 1), (3, 1)} and near[0][2] >= near[-1][2]
    borrowed = ev.borrow_for(store, [(2, 1)], ev.EvidenceParams(top_r=3, neighbours=2))
    assert borrowed[(2, 1)].borrowed and 2 not in [s.cluster for s in borrowed[(2, 1)].successors]


def test_nearest_pairs_is_one_round_trip_and_agrees_with_the_transaction_path(store: Store) -> None:
    _catalogue(store)
    now = _counts([(0, 1, 2, 9), (3, 1, 5, 7), (4, 2, 0, 8), (2, 4, 1, 6), (1, 0, 3, 5)])
    ev.build_snapshot(store, now, (0, 1), ev.EvidenceParams(top_r=3, min_support=5))
    first = ev.nearest_pairs(store, 5, 1, k=3, ef_search=60)
    statements: list[object] = []
    execute = store.conn.execute

    def counting(query: object, *args: object, **kwargs: object) -> object:
        statements.append(query)
        return execute(query, *args, **kwargs)  # type: ignore[arg-type]

    store.conn.execute = counting  # type: ignore[method-assign]
    try:
        again = ev.nearest_pairs(store, 5, 1, k=3, ef_search=60)
    finally:
        del store.conn.execute
    assert len(statements) == 1 and again == first  # ef_search already set on the session
    assert store.conn.execute("SHOW hnsw.ef_search").fetchone() == ("60",)
    store.conn.autocommit = False
    try:
        in_tx = ev.nearest_pairs(store, 5, 1, k=3, ef_search=60)
        store.conn.commit()
    finally:
        store.conn.autocommit = True
    assert in_tx == first and len(first) == 3
    assert ev.nearest_pairs(store, 99, 1) == []  # an unknown cluster: nothing


def test_snapshots_are_pruned(store: Store) -> None:
    _catalogue(store)
    now = _counts([(0, 1, 2, 9)])
    ids = [
        ev.build_snapshot(store, now, (0, 1), ev.EvidenceParams(min_support=1), keep=2).snapshot_id for _ in range(4)
    ]
    with store.tx() as c:
        states = dict(c.execute("SELECT snapshot_id, state FROM snapshots").fetchall())
        live = {r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (store.schema,))}
    assert [states[i] for i in ids] == ["dropped", "dropped", "retired", "current"]
    assert f"evidence_s{ids[0]}" not in live and f"evidence_s{ids[-1]}" in live


def test_atomic_publication_under_concurrent_reader(store: Store, pg_dsn: str) -> None:
    """A reader looping over the current evidence sees only whole snapshots and never errors."""
    _catalogue(store)
    n_pairs = 30
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    reader_store = Store(dsn=pg_dsn, schema=store.schema, conn=connect(pg_dsn))

    def reader() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    with conn.transaction():
                        conn.execute(f'SET LOCAL search_path TO "{store.schema}", public')
                        row = conn.execute(
                            "SELECT count(DISTINCT (c1, c2)), min(count), max(count) FROM evidence"
                        ).fetchone()
                    if row and row[0]:
                        seen.append((row[1], row[2]))
                        if row[0] != n_pairs:
                            raise AssertionError(f"partial snapshot: {row[0]} pairs")
                        near = reader_store.conn.execute(
                            f'SELECT count(*) FROM "{store.schema}".evidence_pairs'
                        ).fetchone()  # the other view, swapped in the same transaction
                        assert near is not None and near[0] == n_pairs, near
                        assert len(ev.nearest_pairs(reader_store, 0, 1, k=3)) == 3
                except psycopg.errors.UndefinedTable as exc:
                    if seen:  # only before the first publication; never while views are swapped
                        errors.append(exc)
                except BaseException as exc:
                    errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for version in range(1, 7):
            rows = [(a, (a + 1) % 6, (a + 2) % 6, version) for a in range(6)]
            rows += [(a, (a + k) % 6, (a + k + 1) % 6, version) for a in range(6) for k in (2, 3, 4, 5)]
            ev.build_snapshot(store, _counts(rows), (0, 1), ev.EvidenceParams(min_support=1), keep=2)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
        reader_store.close()
    assert not errors, errors[:3]
    assert len(seen) > 10
    assert all(lo == hi for lo, hi in seen)  # every row of one read came from one snapshot
    assert {lo for lo, _ in seen} >= {6}


def test_registry_runs_releases_and_activation(store: Store) -> None:
    reg.start_run(store, "r1", "finetune")
    reg.finish_run(store, "r1", "succeeded", cost={"cpu_seconds": 1.5})
    assert reg.get_run(store, "r1").cost == {"cpu_seconds": 1.5}  # type: ignore[union-attr]
    for rid in ("a", "b"):
        reg.register_release(store, reg.Release(rid, "base", f"file:///{rid}", None, None, "h", run_id="r1"))
    reg.register_release(store, reg.Release("bad", "base", None, None, None, "h", state="rejected"))
    with pytest.raises(ValueError):
        reg.register_release(store, reg.Release("x", "base", None, None, None, "h", state="active"))
    reg.activate(store, "a")
    reg.activate(store, "b")
    assert reg.active_release(store).release_id == "b"  # type: ignore[union-attr]
    assert reg.get_release(store, "a").state == "retired"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="rejected"):
        reg.activate(store, "bad")
    with pytest.raises(LookupError):
        reg.activate(store, "nope")
    assert reg.active_release(store).release_id == "b"  # type: ignore[union-attr]
    # the partial unique index forbids two active releases even when the code is bypassed
    with pytest.raises(psycopg.errors.UniqueViolation), store.tx() as c:
        c.execute("UPDATE releases SET state = 'active' WHERE release_id = 'a'")


def test_transition_tables(store: Store) -> None:
    ids = np.array([[2, 3, -1], [0, 4, 5]], dtype=np.int32)
    scores = np.array([[0.5, 0.2, 0], [0.4, 0.3, 0.1]], dtype=np.float32)
    v = tables.publish_table(store, np.array([0, 1]), np.array([1, 2]), ids, scores, np.array([0, 1]), None, "a")
    t = tables.load_table(store, v)
    assert t.as_dict() == {
        (0, 1): [(2, 0.5, "model"), (3, pytest.approx(0.2), "model")],
        (1, 2): [
            (0, pytest.approx(0.4), "evidence"),
            (4, pytest.approx(0.3), "evidence"),
            (5, pytest.approx(0.1), "evidence"),
        ],
    }
    with pytest.raises(LookupError):
        tables.load_table(store, v + 100)


def test_a_rate_bounded_load_gives_the_same_table(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    pairs = sorted({(int(a), int(b)) for a, b in rng.integers(0, 60, (900, 2)) if a != b})
    c1, c2 = (np.array(x) for x in zip(*pairs, strict=True))
    ids = rng.integers(0, 60, (len(pairs), 4)).astype(np.int32)
    ids[::7, 3] = -1  # short rows too
    scores = rng.random((len(pairs), 4)).astype(np.float32)
    source = rng.integers(0, 2, len(pairs))
    v = tables.publish_table(store, c1, c2, ids, scores, source, None, "r")
    whole = tables.load_table(store, v)
    monkeypatch.setattr(tables, "LOAD_CHUNK_ROWS", 500)  # ~3,300 rows: several chunks, split by c1
    slept: list[float] = []
    bounded = tables.load_table(store, v, duty=0.25, sleep=slept.append)
    assert len(slept) >= 6 and all(s >= 0 for s in slept)
    for a, b in zip(
        (whole.c1, whole.c2, whole.ids, whole.scores, whole.source),
        (bounded.c1, bounded.c2, bounded.ids, bounded.scores, bounded.source),
        strict=True,
    ):
        assert np.array_equal(a, b)
    assert len(whole.c1) == len(pairs)
    with pytest.raises(ValueError, match="duty"):
        tables.load_table(store, v, duty=0)
