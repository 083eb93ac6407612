"""The sync step (store/sync.py) against the embedded store: file datasets ingested once per file, the catalogue
by external id, the inbox tables, bad rows counted, unreadable sources failing with the store unchanged."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.sources import DataConfig
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.sync import sync

T0 = 1_700_000_000
REPO = Path(__file__).resolve().parents[2]


def _events(n: int, first: int = 0, users: int = 40) -> pa.Table:
    i = np.arange(first, first + n)
    return pa.table(
        {
            "uid": pa.array([f"user-{k % users}" for k in i]),
            "movie": pa.array((i % 12).astype(np.int64)),  # integer item ids
            "when": pa.array((T0 + i * 60) * 1_000_000, pa.timestamp("us", tz="UTC")),
            "stars": pa.array((i % 5 + 1).astype(np.float32)),
        }
    )


def _dataset(root: Path) -> tuple[Path, Path]:
    events, items = root / "events", root / "items.csv"
    events.mkdir(parents=True)
    items.write_text("item,cluster\n" + "".join(f"{k},genre-{k % 3}\n" for k in range(12)))
    (root / "clusters.csv").write_text('cluster,name,keywords\ngenre-0,Noir,"dark;crime"\ngenre-1,Comedy,\n')
    return events, items


def _cfg(root: Path, **extra: object) -> DataConfig:
    return DataConfig.parse(
        {
            "interactions": str(root / "events"),
            "items": str(root / "items.csv"),
            "clusters": str(root / "clusters.csv"),
            "columns": {"user": "uid", "item": "movie", "ts": "when", "weight": "stars"},
            **extra,
        }
    )


def _count(store: Store, sql: str) -> int:
    with store.tx() as c:
        row = c.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_files_are_ingested_once_each(store: Store, tmp_path: Path) -> None:
    events, _ = _dataset(tmp_path)
    pq.write_table(_events(500), events / "part-0.parquet")
    pq.write_table(_events(300, 500), events / "part-1.parquet", row_group_size=100)
    (events / "_SUCCESS").write_text("")  # writers' markers are not data
    (events / ".part-0.parquet.crc").write_bytes(b"\x00\x01")
    r = sync(store, _cfg(tmp_path), run_id="r1", embed=False, batch_rows=128)
    assert (r.interactions.new, r.files, r.catalogue.clusters, r.catalogue.items) == (
        800,
        4,
        3,
        12,
    )  # 2 + items, clusters
    assert r.catalogue.clusters_new == 3 and not r.interactions.skipped
    names = [c.name for c in cat.load_catalogue(store)[0].clusters]
    assert sorted(names) == ["Comedy", "Noir", "genre-2"]  # genre-2 named by its id: no clusters row
    # Nothing new: nothing added, nothing read again.
    again = sync(store, _cfg(tmp_path), run_id="r2", embed=False)
    assert (again.interactions.rows, again.files) == (0, 0)
    # A new file: only it is read.
    pq.write_table(_events(200, 800), events / "part-2.parquet")
    third = sync(store, _cfg(tmp_path), run_id="r3", embed=False)
    assert (third.interactions.new, third.files) == (200, 1)
    assert _count(store, "SELECT count(*) FROM interactions") == 1000
    assert _count(store, "SELECT count(*) FROM user_ids") == 40
    with store.tx() as c:
        rows = c.execute(
            "SELECT uri, rows, new, run_id FROM ingest_files WHERE kind = 'interactions' ORDER BY uri"
        ).fetchall()
    assert [(Path(u).name, n, new, run) for u, n, new, run in rows] == [
        ("part-0.parquet", 500, 500, "r1"),
        ("part-1.parquet", 300, 300, "r1"),
        ("part-2.parquet", 200, 200, "r3"),
    ]
    # Timestamps by type (microseconds, tz-aware), weights as given, external ids kept.
    with store.tx() as c:
        first = c.execute(
            "SELECT u.external, i.external, ts, weight FROM interactions JOIN user_ids u USING (user_id)"
            " JOIN items i USING (item_id) ORDER BY ts LIMIT 1"
        ).fetchone()
    assert first == ("user-0", "0", T0, 1.0)


def test_a_changed_catalogue_is_read_again_and_updates_in_place(store: Store, tmp_path: Path) -> None:
    events, items = _dataset(tmp_path)
    pq.write_table(_events(100), events / "part-0.parquet")
    sync(store, _cfg(tmp_path), embed=False)
    before = {c.name: c.id for c in cat.load_catalogue(store)[0].clusters}
    # Rename a cluster, move an item, add a cluster and an item.
    (tmp_path / "clusters.csv").write_text("cluster,name,keywords\ngenre-0,Neo-noir,dark\ngenre-1,Comedy,\n")
    items.write_text(items.read_text().replace("4,genre-1", "4,genre-2") + "12,genre-9\n")
    r = sync(store, _cfg(tmp_path), embed=False)
    assert (r.catalogue.clusters_new, r.catalogue.clusters_changed, r.catalogue.items_new, r.catalogue.items_moved) == (
        1,
        1,
        1,
        1,
    )
    catalogue, item_cluster = cat.load_catalogue(store)
    after = {c.name: c.id for c in catalogue.clusters}
    assert after["Neo-noir"] == before["Noir"] and after["genre-9"] == 3 and len(after) == 4
    assert item_cluster[4] == after["genre-2"]


def test_bad_rows_are_counted_and_skipped(store: Store, tmp_path: Path) -> None:
    events, _ = _dataset(tmp_path)
    (events / "day1.csv").write_text(
        "uid,movie,when,stars\n"
        "a,1,1700000000,4\n"
        "b,1,2023-11-14T22:13:20,5\n"  # ISO text
        ",1,1700000000,4\n"  # missing_field
        "c,99,1700000000,4\n"  # unknown_item
        "c,1,soon,4\n"  # bad_timestamp
        "c,1,99999999999,4\n"  # timestamp_out_of_range
        "c,1,1700000000,-1\n"  # negative_weight
        "c,1,1700000000,nan\n"  # bad_weight
        "c,1,1700000000,1e9\n"  # weight_out_of_range
        "c,1,1700000000\n"  # too_few_fields
        "c,1,1700000000,4,x\n"  # too_many_fields
        'c,"1,1700000000,4\n' + "c,1,1700000000,4\n"  # bad_quoting
    )
    (events / "day2.csv").write_bytes(b"uid,movie,when,stars\nd,1,1700000000,4\n\xff\xfe,1,1700000000,4\n")
    (events / "day3.csv").write_text("uid,movie,when,stars\n" + "x" * 300 + ",1,1700000000,4\n")
    r = sync(store, _cfg(tmp_path), embed=False)
    assert r.interactions.new == 4
    assert dict(r.interactions.skipped) == {
        "missing_field": 1,
        "unknown_item": 1,
        "bad_timestamp": 1,
        "timestamp_out_of_range": 1,
        "negative_weight": 1,
        "bad_weight": 1,
        "weight_out_of_range": 1,
        "too_few_fields": 1,
        "too_many_fields": 1,
        "bad_quoting": 1,
        "bad_encoding": 1,
        "id_too_long": 1,
    }
    assert r.interactions.rows == 16 and r.as_dict()["skipped"] == dict(sorted(r.interactions.skipped.items()))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty file"),
        ("header.csv", b"uid,movie,when,stars\n", "only a header"),
        ("blob.csv", b"\x00\x01\x02binary\x00\n\x00", "binary content"),
        ("fake.parquet", b"not parquet at all", "not a Parquet file"),
        ("wrong.parquet", None, "missing column(s) 'when'"),
    ],
)
def test_an_unreadable_file_fails_the_sync_and_leaves_nothing(
    store: Store, tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    events, _ = _dataset(tmp_path)
    pq.write_table(_events(100), events / "a-good.parquet")  # sorted before the bad file: read first
    bad = events / name
    if content is None:
        pq.write_table(pa.table({"uid": ["u"], "movie": [1], "time": [T0]}), bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        sync(store, _cfg(tmp_path), embed=False)
    assert str(err.value).startswith(f"file://{bad}: ") and "\n" not in str(err.value)
    for table in ("interactions", "items", "clusters", "user_ids", "ingest_files"):
        assert _count(store, f"SELECT count(*) FROM {table}") == 0, table
    bad.unlink()
    assert sync(store, _cfg(tmp_path), embed=False).interactions.new == 100


def test_a_missing_source_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        sync(store, DataConfig.parse({"interactions": str(tmp_path / "nope")}), embed=False)
    with pytest.raises(DataError, match="unknown URI scheme 'gs'"):
        sync(store, DataConfig.parse({"interactions": "gs://bucket/x"}), embed=False)


def test_inbox_tables_are_moved_exactly_once(store: Store, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pipe:  # the user's pipeline
        pipe.execute(f"SET search_path TO {store.schema}")
        pipe.execute(
            "INSERT INTO inbox_clusters (external_cluster, name, keywords) VALUES ('c1', 'Space opera', '{space,opera}')"
        )
        pipe.execute("INSERT INTO inbox_items (external_item, external_cluster) VALUES ('i1', 'c1'), ('i2', 'c2')")
        pipe.execute(
            "INSERT INTO inbox_interactions (external_user, external_item, ts, weight, event_id) VALUES"
            " ('u1', 'i1', to_timestamp(1700000000), 4, 'e1'), ('u1', 'i2', to_timestamp(1700000060), 1, 'e2'),"
            " ('u2', 'zz', to_timestamp(1700000000), 1, NULL), ('u2', 'i1', '-infinity', 1, NULL),"
            " ('u2', 'i1', '1960-01-01', 1, NULL)"
        )
    r = sync(store, DataConfig.parse({"interactions": "postgres"}), embed=False)
    assert (r.interactions.new, r.catalogue.clusters, r.catalogue.items) == (2, 2, 2)
    assert dict(r.interactions.skipped) == {"unknown_item": 1, "bad_timestamp": 1, "timestamp_out_of_range": 1}
    for table in ("inbox_interactions", "inbox_items", "inbox_clusters"):
        assert _count(store, f"SELECT count(*) FROM {table}") == 0
    assert sync(store, DataConfig.parse({"interactions": "postgres"}), embed=False).interactions.rows == 0
    assert cat.load_catalogue(store)[0].clusters[0].keywords == ("space", "opera")


def test_ingest_cli_json_and_idempotence(pg_dsn: str, store: Store, tmp_path: Path) -> None:
    events, _ = _dataset(tmp_path)
    pq.write_table(_events(250), events / "part-0.parquet")
    (events / "part-1.csv").write_text("uid,movie,when,stars\nz,1,1700000000,4\nz,77,1700000000,4\nz,1,x,4\n")
    argv = [
        sys.executable, "-m", "recupdate_operator.cli", "ingest", str(events), "--schema", store.schema,
        "--dsn", pg_dsn, "--items", str(tmp_path / "items.csv"), "--clusters", str(tmp_path / "clusters.csv"),
        "--columns", "user=uid,item=movie,ts=when,weight=stars", "--no-embed", "--json",
    ]  # fmt: skip
    env = {"PYTHONPATH": f"{REPO}/operator:{REPO}/workloads", "PATH": "/usr/bin:/bin"}
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out == {
        "new": 251,
        "duplicate": 0,
        "skipped": {"bad_timestamp": 1, "unknown_item": 1},
        "clusters": 3,
        "items": 12,
    }
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(second.stdout) == {"new": 0, "duplicate": 0, "skipped": {}, "clusters": 3, "items": 12}
    # Without --json: a human summary. A bad file: exit 2, one line, nothing written.
    (events / "part-2.parquet").write_bytes(b"PAR1 truncated")
    human = subprocess.run(argv[:-1], capture_output=True, text=True, env=env, timeout=120)
    assert human.returncode == 2 and "part-2.parquet: not a readable Parquet file" in human.stderr
    assert "nothing was ingested" in human.stderr and human.stdout == ""
    assert _count(store, "SELECT count(*) FROM interactions") == 251


def test_the_demo_policy_brings_its_own_data(store: Store) -> None:
    """manifests/examples/demo-policy.yaml on a fresh store: the fine-tune config the planner builds syncs the
    synthetic stream up to the run's time, enough to train on; a week later the next run adds only that week."""
    from datetime import UTC, datetime

    from recupdate_operator.api import RunKind
    from recupdate_operator.local_driver import load_policy
    from recupdate_operator.planner import run_config
    from recupdate_workloads.jobs.config import RunConfig
    from recupdate_workloads.jobs.run import load_triples

    name, ns, spec, _ = load_policy(REPO / "manifests" / "examples" / "demo-policy.yaml")
    when = datetime(2031, 5, 4, 3, 0, tzinfo=UTC)
    cfg = RunConfig.parse(json.dumps(run_config(name, ns, spec, RunKind.FINETUNE, "demo-ft-1", when, None)))
    first = sync(store, cfg.data, until=cfg.window_end, embed=False)
    assert first.interactions.new > 40_000 and first.catalogue.clusters == 30
    _, train = load_triples(store, cfg.window_start, cfg.holdout_start, cfg.positive_threshold)
    assert len(train) > 1_000
    week = sync(store, cfg.data, until=cfg.window_end + 7 * 86_400, embed=False)
    assert 0 < week.interactions.new < first.interactions.new / 20 and week.catalogue.clusters_new == 0
    assert sync(store, cfg.data, until=cfg.window_end + 7 * 86_400, embed=False).interactions.rows == 0
    with store.tx() as c:
        assert c.execute("SELECT max(ts) < %s FROM interactions", (cfg.window_end + 7 * 86_400,)).fetchone() == (True,)
