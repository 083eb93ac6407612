#!/usr/bin/env python
"""Ingest throughput: rows/s from a Parquet dataset into the store, through the sync step a job runs first.

What is timed, for each size N, in a fresh child process (its peak RSS is its own VmHWM):

    sync(store, DataConfig(interactions=<parquet dir>, columns=...), embed=False)
        # list the files, skip those recorded; per file: read 1M-row batches, check_rows (the loaders'
        # validation), map external user/item ids to internal ids (user_ids created on first sight), binary
        # COPY into interactions, record the file -- all in one transaction

The dataset: N rows in files of 1M rows (row groups of 256k): user (text, "user-<n>", N/50 users), item
(int64, 10,000 items in 100 clusters), ts (timestamp[s]), rating (float32). The catalogue is loaded before
(untimed). Baseline in the same run and the same PostgreSQL (the "floor"): a bare binary COPY of the same rows,
already as internal ids, from a file written beforehand, into an identical `interactions` table of a fresh
schema (same indexes). Target: within 2x of the floor at 10M rows, client peak RSS under 1 GB.

    .venv/bin/python benchmarks/bench_ingest.py              # 1M rows (~1 min)
    .venv/bin/python benchmarks/bench_ingest.py --big        # 1M and 10M rows (~6 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILE_ROWS = 1_000_000
ITEMS, CLUSTERS = 10_000, 100
T0 = 1_700_000_000
_ROW = np.dtype(
    [("n", ">i2"), ("l1", ">i4"), ("user", ">i8"), ("l2", ">i4"), ("item", ">i8"), ("l3", ">i4"), ("ts", ">i8"),
     ("l4", ">i4"), ("weight", ">f4")]
)  # fmt: skip
_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
COLUMNS = {"user": "user", "item": "item", "ts": "ts", "weight": "rating"}


def vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def generate(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """The Parquet dataset and the floor's COPY file (internal ids: user n -> n + 1, item i -> i)."""
    events = root / f"events_{n}"
    events.mkdir()
    floor = root / f"floor_{n}.bin"
    users = max(1, n // 50)
    rng = np.random.default_rng(seed)
    with floor.open("wb") as f:
        f.write(_HEADER)
        for k, lo in enumerate(range(0, n, FILE_ROWS)):
            m = min(FILE_ROWS, n - lo)
            u = rng.integers(0, users, m)
            item = rng.integers(0, ITEMS, m)
            ts = T0 + np.sort(rng.integers(0, 365 * 86_400, m))
            w = rng.integers(1, 11, m).astype(np.float32) / 2
            table = pa.table(
                {
                    "user": pa.array(np.char.add("user-", u.astype(str))),
                    "item": pa.array(item),
                    "ts": pa.array(ts, pa.timestamp("s")),
                    "rating": pa.array(w),
                }
            )
            pq.write_table(table, events / f"part-{k:05d}.parquet", row_group_size=256 * 1024)
            rows = np.empty(m, dtype=_ROW)
            rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 8, 8, 8, 4
            rows["user"], rows["item"], rows["ts"], rows["weight"] = u + 1, item, ts, w
            f.write(rows.tobytes())
        f.write(b"\xff\xff")
    return events, floor


def child(cfg: dict) -> dict:
    """One timed sync in this fresh process."""
    from recupdate_workloads.data.sources import DataConfig
    from recupdate_workloads.store.db import Store, connect
    from recupdate_workloads.store.sync import sync

    conn = connect(cfg["dsn"])
    store = Store(cfg["dsn"], cfg["schema"], conn)
    data = DataConfig.parse({"interactions": cfg["events"], "columns": COLUMNS})
    t = time.perf_counter()
    report = sync(store, data, embed=False)
    seconds = time.perf_counter() - t
    conn.close()
    i = report.interactions
    return {"seconds": seconds, "new": i.new, "rows": i.rows, "skipped": dict(i.skipped), "rss_kb": vmhwm_kb()}


def floor_once(dsn: str, path: Path) -> float:
    from _common import fresh_store

    store = fresh_store(dsn, "bench_ingest_floor")
    data = path.read_bytes() if path.stat().st_size < 2**31 else None
    t = time.perf_counter()
    with (
        store.tx() as conn,
        conn.cursor().copy("COPY interactions (user_id, item_id, ts, weight) FROM STDIN (FORMAT BINARY)") as cp,
    ):
        if data is not None:
            view = memoryview(data)
            for i in range(0, len(view), 1 << 22):
                cp.write(view[i : i + (1 << 22)])
        else:
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    cp.write(chunk)
    seconds = time.perf_counter() - t
    store.conn.execute('DROP SCHEMA "bench_ingest_floor" CASCADE')
    store.close()
    return seconds


def bench(dsn: str, n: int, root: Path, args: argparse.Namespace) -> dict:
    from _common import fresh_store
    from recupdate_workloads.store.ingest import write_catalogue

    t = time.perf_counter()
    events, floor = generate(root, n, args.seed)
    print(
        f"\n== N = {n:,} rows ({max(1, n // 50):,} users, {ITEMS:,} items), generated in {time.perf_counter() - t:.1f} s ==",
        flush=True,
    )
    runs, floors = [], []
    for r in range(args.repeats):
        schema = "bench_ingest"
        store = fresh_store(dsn, schema)
        write_catalogue(
            store, items={"item": np.arange(ITEMS), "cluster": [f"c{i % CLUSTERS}" for i in range(ITEMS)]}, embed=False
        )
        store.close()
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps({"dsn": dsn, "schema": schema, "events": str(events)})],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if res["new"] != n:
            raise RuntimeError(f"ingested {res['new']} of {n} rows: {res}")
        fl = floor_once(dsn, floor)
        runs.append(res)
        floors.append(fl)
        print(
            f"  ingest #{r + 1}: {res['seconds']:.2f} s = {n / res['seconds'] / 1e6:.2f} M rows/s, peak RSS "
            f"{res['rss_kb'] / 1024:.0f} MiB;  floor (bare binary COPY): {fl:.2f} s = {n / fl / 1e6:.2f} M rows/s;  "
            f"ratio {res['seconds'] / fl:.2f}x",
            flush=True,
        )
    for p in events.iterdir():
        p.unlink()
    events.rmdir()
    floor.unlink()
    ingest_s = float(np.median([x["seconds"] for x in runs]))
    floor_s = float(np.median(floors))
    rss_mb = max(x["rss_kb"] for x in runs) / 1024
    return {
        "rows": n,
        "ingest_s": round(ingest_s, 3),
        "floor_s": round(floor_s, 3),
        "ratio": round(ingest_s / floor_s, 3),
        "ingest_rows_per_s": round(n / ingest_s),
        "floor_rows_per_s": round(n / floor_s),
        "client_peak_rss_mb": round(rss_mb, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big", action="store_true", help="also 10M rows")
    p.add_argument("--sizes", default=None, help="comma-separated row counts (overrides --big)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (medians reported)")
    p.add_argument(
        "--dsn", default=os.environ.get("RECUPDATE_BENCH_DSN"), help="external PostgreSQL (default: embedded)"
    )
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from _common import pg_settings, postgres

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1_000_000] + ([10_000_000] if args.big else [])
    results = []
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="recupdate-bench-ingest-") as tmp:
        print("PostgreSQL:", ", ".join(f"{k}={v}" for k, v in pg_settings(dsn).items()))
        for n in sizes:
            results.append(bench(dsn, n, Path(tmp), args))
    print("\nrows        ingest s   floor s   ratio   M rows/s   peak RSS MiB")
    for r in results:
        print(
            f"{r['rows']:>10,}  {r['ingest_s']:>8.2f}  {r['floor_s']:>8.2f}  {r['ratio']:>5.2f}x  "
            f"{r['ingest_rows_per_s'] / 1e6:>8.2f}  {r['client_peak_rss_mb']:>12.0f}"
        )
    largest = results[-1]
    verdict = {"target_ratio": 2.0, "target_rss_mb": 1024, "at_rows": largest["rows"]}
    verdict["met"] = largest["ratio"] <= 2.0 and largest["client_peak_rss_mb"] < 1024
    print(json.dumps({"results": results, **verdict}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
