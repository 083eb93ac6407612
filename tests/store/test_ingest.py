"""The store's write path for real data (store/ingest.py): external ids, event-id idempotence, bad rows,
the catalogue by external id (renames, moves, new clusters), atomicity."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pyarrow as pa
import pytest

from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import ingest
from recupdate_workloads.store.db import Store, connect

T0 = 1_700_000_000


def _catalogue(store: Store) -> ingest.CatalogueResult:
    return ingest.write_catalogue(
        store,
        items={"item": ["m1", "m2", 3, "m4"], "cluster": ["drama", "comedy", "drama", "noir"]},
        clusters={"cluster": ["drama", "comedy"], "name": ["Drama", "Comedy"], "keywords": ["tears; family", None]},
        embed=False,
    )


def _count(store: Store, sql: str) -> int:
    with store.tx() as c:
        row = c.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_catalogue_by_external_id(store: Store) -> None:
    r = _catalogue(store)
    assert (r.clusters_new, r.items_new, r.clusters, r.items) == (3, 4, 3, 4)  # noir comes from the items rows
    catalogue, item_cluster = cat.load_catalogue(store)
    assert [c.name for c in catalogue.clusters] == ["Drama", "Comedy", "noir"]
    assert catalogue.clusters[0].keywords == ("tears", "family") and catalogue.clusters[1].keywords == ("Comedy",)
    assert item_cluster.tolist() == [0, 1, 0, 2]
    # The same input again changes nothing.
    again = _catalogue(store)
    assert (again.clusters_new, again.clusters_changed, again.items_new, again.items_moved) == (0, 0, 0, 0)
    # A rename keeps the id; a moved item keeps its id; a new cluster takes the next dense id.
    r2 = ingest.write_catalogue(
        store,
        items={"item": ["m2", "m9"], "cluster": ["noir", "scifi"]},
        clusters={"cluster": ["drama", "comedy"], "name": ["Comedy", "Drama"]},  # a swap inside one write
        embed=False,
    )
    assert (r2.clusters_new, r2.clusters_changed, r2.items_new, r2.items_moved) == (1, 2, 1, 1)
    catalogue, item_cluster = cat.load_catalogue(store)
    assert [c.name for c in catalogue.clusters] == ["Comedy", "Drama", "noir", "scifi"]
    assert item_cluster.tolist() == [0, 2, 0, 2, 3]


def test_catalogue_bad_rows_are_counted(store: Store) -> None:
    _catalogue(store)
    r = ingest.write_catalogue(
        store,
        items={"item": ["a", None, "x" * 300, "b", "c"], "cluster": ["drama", "drama", "drama", "DRAMA!", "???"]},
        clusters={"cluster": ["comedy", None], "name": ["drama", "x"]},
        embed=False,
    )
    # comedy -> "drama" collides with Drama; "DRAMA!" is a new cluster whose name collides; "???" has no letters
    assert dict(r.skipped) == {"missing_field": 2, "id_too_long": 1, "duplicate_name": 2, "bad_cluster": 3}
    assert (r.items_new, r.clusters_new) == (1, 0)
    assert cat.load_catalogue(store)[0].clusters[1].name == "Comedy"  # the refused rename kept the old name


def test_write_interactions_maps_ids_and_counts(store: Store) -> None:
    _catalogue(store)
    rows = {
        "user": ["u1", 7, "u1", "", "u2", "u2", "u3"],
        "item": ["m1", "m2", 3, "m1", "nope", "m4", "m1"],
        "ts": [T0, T0 + 1, T0 + 2, T0, T0, -5, T0 + 3],
        "weight": [4.0, 1.0, 2.5, 1.0, 1.0, 1.0, -1.0],
    }
    r = ingest.write_interactions(store, rows)
    assert (r.new, r.duplicate) == (3, 0)
    assert dict(r.skipped) == {
        "missing_field": 1,
        "unknown_item": 1,
        "timestamp_out_of_range": 1,
        "negative_weight": 1,
    }
    assert r.rows == 7
    with store.tx() as c:
        got = c.execute(
            "SELECT u.external, i.external, ts, weight FROM interactions JOIN user_ids u USING (user_id)"
            " JOIN items i USING (item_id) ORDER BY ts"
        ).fetchall()
    assert got == [("u1", "m1", T0, 4.0), ("7", "m2", T0 + 1, 1.0), ("u1", "3", T0 + 2, 2.5)]
    # integers and their text are the same user: no new user
    ingest.write_interactions(store, {"user": [7], "item": ["m1"], "ts": [T0 + 9]})
    assert _count(store, "SELECT count(*) FROM user_ids") == 2


def test_event_ids_make_writes_idempotent(store: Store) -> None:
    _catalogue(store)
    rows = {
        "user": ["u1", "u1", "u2", "u2"],
        "item": ["m1", "m2", "m1", "m1"],
        "ts": [T0, T0 + 1, T0 + 2, T0 + 3],
        "event_id": ["e1", "e2", "e3", "e3"],  # e3 twice in one batch
    }
    r = ingest.write_interactions(store, rows)
    assert (r.new, r.duplicate) == (3, 1)
    r = ingest.write_interactions(store, rows)
    assert (r.new, r.duplicate) == (0, 4)
    # rows without an id are always new; a null/empty id is no id
    r = ingest.write_interactions(store, {**rows, "event_id": [None, "", "e4", "e1"]})
    assert (r.new, r.duplicate) == (3, 1)
    assert _count(store, "SELECT count(*) FROM interactions") == 6


def test_concurrent_writers_insert_each_event_once(store: Store, pg_dsn: str) -> None:
    _catalogue(store)
    n = 2000
    rows = pa.table(
        {
            "user": [f"u{i % 50}" for i in range(n)],
            "item": ["m1", "m2", "3", "m4"] * (n // 4),
            "ts": np.arange(n) + T0,
            "event_id": [f"e{i}" for i in range(n)],
        }
    )
    results: list[ingest.IngestResult] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with connect(pg_dsn) as conn:
                results.append(ingest.write_interactions(Store(pg_dsn, store.schema, conn), rows))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.new for r in results) == n and sum(r.duplicate for r in results) == 2 * n
    assert _count(store, "SELECT count(*) FROM interactions") == n
    assert _count(store, "SELECT count(*) FROM user_ids") == 50


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    _catalogue(store)
    with pytest.raises(psycopg.errors.DivisionByZero), store.tx() as c:
        ingest.write_interactions(store, {"user": ["new"], "item": ["m1"], "ts": [T0], "event_id": ["x"]})
        ingest.write_catalogue(store, items={"item": ["m99"], "cluster": ["westerns"]}, embed=False)
        c.execute("SELECT 1 / 0")
    assert _count(store, "SELECT count(*) FROM interactions") == 0
    assert _count(store, "SELECT count(*) FROM user_ids") == 0
    assert _count(store, "SELECT count(*) FROM items") == 4
    # and the event id is free again
    r = ingest.write_interactions(store, {"user": ["new"], "item": ["m1"], "ts": [T0], "event_id": ["x"]})
    assert r.new == 1


def test_unusable_column_type_is_one_clear_error(store: Store) -> None:
    _catalogue(store)
    from recupdate_workloads.data.errors import DataError

    with pytest.raises(DataError, match="column 'ts' has type list"):
        ingest.write_interactions(
            store, pa.table({"user": ["a"], "item": ["m1"], "ts": pa.array([[1]])}), source="events.parquet"
        )
    with pytest.raises(DataError, match=r"missing column.*'ts'"):
        ingest.write_interactions(store, {"user": ["a"], "item": ["m1"]}, source="intake")
