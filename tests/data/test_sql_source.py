"""The `sql` source: a query against the user's own PostgreSQL (here a second database on the embedded server),
read incrementally by a watermark column, the watermark moving in the sync's transaction."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from recupdate_workloads.contract.env import SOURCE_DSN_ENV
from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.sources import DataConfig
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.sync import sync

CFG = {
    "interactions": "sql",
    "items": "sql",
    "columns": {"user": "customer", "item": "sku", "ts": "happened_at", "weight": "qty"},
    "sql": {
        "interactions": {
            "query": "SELECT id, customer, sku, happened_at, qty FROM shop.orders WHERE NOT test_order AND id % 1 = 0",
            "watermark": "id",
        },
        "items": {"query": "SELECT sku AS item, category AS cluster FROM shop.products"},
    },
}


@pytest.fixture
def user_db(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS recupdate_user_src")
        admin.execute("CREATE DATABASE recupdate_user_src")
    dsn = make_conninfo(pg_dsn, dbname="recupdate_user_src")
    monkeypatch.setenv(SOURCE_DSN_ENV, dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA shop;"
            " CREATE TABLE shop.products (sku bigint PRIMARY KEY, category text NOT NULL);"
            " CREATE TABLE shop.orders (id bigserial PRIMARY KEY, customer bigint, sku bigint,"
            "  happened_at timestamptz NOT NULL, qty numeric, test_order boolean NOT NULL DEFAULT false);"
            " INSERT INTO shop.products SELECT g, 'cat-' || (g % 3) FROM generate_series(1, 9) g;"
        )
        yield conn
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE recupdate_user_src WITH (FORCE)")


def _orders(conn: psycopg.Connection, n: int, start: int = 0) -> None:
    conn.execute(
        "INSERT INTO shop.orders (customer, sku, happened_at, qty, test_order)"
        " SELECT 100 + g %% 4, 1 + g %% 10, to_timestamp(1700000000 + g * 60), (g %% 3)::numeric, g %% 50 = 7"
        " FROM generate_series(%s::int, %s::int) g",
        (start, start + n - 1),
    )


def _watermark(store: Store) -> str | None:
    with store.tx() as c:
        row = c.execute(
            "SELECT watermark FROM ingest_watermarks WHERE source = 'sql' AND kind = 'interactions'"
        ).fetchone()
    return row[0] if row else None


def test_sql_source_reads_after_its_watermark(store: Store, user_db: psycopg.Connection) -> None:
    _orders(user_db, 200)
    cfg = DataConfig.parse(CFG)
    r = sync(store, cfg, embed=False)
    # 4 test orders are not selected; sku 10 (every tenth row) is not a product
    assert (r.interactions.new, dict(r.interactions.skipped)) == (176, {"unknown_item": 20})
    assert (r.catalogue.items, r.catalogue.clusters) == (9, 3)
    assert _watermark(store) == '["200", "int8"]'
    # Nothing new: nothing read.
    assert sync(store, cfg, embed=False).interactions.rows == 0
    # New rows: only those.
    _orders(user_db, 50, 200)
    r = sync(store, cfg, embed=False)
    assert (r.interactions.new, dict(r.interactions.skipped)) == (44, {"unknown_item": 5})  # 207: a test order
    assert _watermark(store) == '["250", "int8"]'
    with store.tx() as c:
        assert c.execute("SELECT count(*) FROM interactions").fetchone() == (176 + 44,)


def test_a_failing_query_changes_nothing(store: Store, user_db: psycopg.Connection) -> None:
    _orders(user_db, 20)
    broken = DataConfig.parse(
        {**CFG, "sql": {**CFG["sql"], "interactions": {"query": "SELECT * FROM shop.nope", "watermark": "id"}}}
    )
    with pytest.raises(DataError, match=r'^sql: the query failed: relation "shop\.nope" does not exist'):
        sync(store, broken, embed=False)
    with store.tx() as c:
        assert c.execute("SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM interactions)").fetchone() == (
            0,
            0,
        )
    assert _watermark(store) is None
    no_mark = DataConfig.parse(
        {**CFG, "sql": {**CFG["sql"], "interactions": {"query": "SELECT 1 AS x", "watermark": "id"}}}
    )
    with pytest.raises(DataError, match=r"column q\.id does not exist"):
        sync(store, no_mark, embed=False)
