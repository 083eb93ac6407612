#!/usr/bin/env python
"""Evidence refresh throughput: interactions/s from the store's log to a published snapshot.

What is timed (the production refresh path), for each size N, in a fresh child process:

    catalogue.load_catalogue(store)
    for chunk in catalogue.iter_interactions(store, start, end, ...):   # chunks of whole users
        parts.append(evidence.Counts.of(sequences.triples(chunk, threshold).window(start, end), k))
    counts = evidence.Counts.merge(parts, k)
    evidence.build_snapshot(store, counts, (start, end), params)        # builds aside, publishes atomically

The interactions are loaded beforehand with catalogue.append_interactions (timed and reported on its own,
not part of the refresh) and vacuumed/analysed, as autovacuum would. The window is the whole synthetic
span, so every one of the N interactions is read.

Baseline in the same run and the same PostgreSQL (the "floor"): binary COPY of the same raw rows
(user, item, ts, weight, cluster of item) from the client into a fresh table, then one GROUP BY pass over
it (`SELECT cluster, count(*) ... GROUP BY cluster`). The GROUP BY (user, cluster) variant, a hash
aggregate with many groups, is timed on the same table too and reported beside it.

Each measurement is repeated (refresh and floor interleaved) and the median is reported. The refresh
runs in a child process (this script with --child), so its peak RSS (os.wait4's ru_maxrss of the child)
excludes data generation; PostgreSQL's memory is separate (the backend's VmHWM is shown for reference).

    .venv/bin/python benchmarks/bench_evidence.py                          # quick: 200k and 1M, ~1-2 min
    .venv/bin/python benchmarks/bench_evidence.py --sizes 1000000,10000000  # full (~15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from recupdate_workloads.data.sequences import triples, triples_from_arrays
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store.db import Store, connect

# Binary COPY rows of the floor table: (int8 user, int8 item, int8 ts, float4 weight, int4 cluster).
_FLOOR_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("user", ">i8"),
        ("l2", ">i4"),
        ("item", ">i8"),
        ("l3", ">i4"),
        ("ts", ">i8"),
        ("l4", ">i4"),
        ("weight", ">f4"),
        ("l5", ">i4"),
        ("cluster", ">i4"),
    ]
)
_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_BLOCK = 1 << 20


def counts_digest(c: ev.Counts) -> str:
    h = hashlib.sha1()
    for a in (c.c1, c.c2, c.c_next, c.count):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return f"{h.hexdigest()[:12]}:{c.triples}:{len(c.c1)}"


# ------------------------------------------------------------------------------------------ previous
# The path this replaced, timed beside it with --previous (same rows, same Counts: the digests must match):
# a row-by-row binary COPY TO STDOUT (one protocol message per row, ~1-2 us of Python each) and counting by
# a lexsort of every chunk plus np.unique. The production path packs blocks of users into one bytea each
# server-side, skips the sort for rows that arrive sorted, and counts with a dense bincount.

_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("user", ">i8"),
        ("l2", ">i4"),
        ("item", ">i8"),
        ("l3", ">i4"),
        ("ts", ">i8"),
        ("l4", ">i4"),
        ("weight", ">f4"),
    ]
)
_HEADER = 19  # PGCOPY signature (11) + flags (4) + header extension length (4)


def previous_iter_interactions(store: Store, start: int, end: int, item_cluster, catalogue, rows_per_chunk: int):
    from recupdate_workloads.data.types import InteractionLog

    def log(rows: np.ndarray) -> InteractionLog:
        return InteractionLog(
            rows["user"].astype(np.int64),
            rows["item"].astype(np.int64),
            rows["ts"].astype(np.int64),
            rows["weight"].astype(np.float32),
            item_cluster,
            catalogue,
        )

    def take(pending: bytearray, carry):
        n = len(pending) // _ROW.itemsize
        if n == 0:
            return carry
        rows = np.frombuffer(bytes(pending[: n * _ROW.itemsize]), dtype=_ROW)
        del pending[: n * _ROW.itemsize]
        return rows if carry is None else np.concatenate([carry, rows])

    query = (
        "COPY (SELECT user_id, item_id, ts, weight FROM interactions WHERE ts >= %s AND ts < %s"
        " ORDER BY user_id, ts, item_id) TO STDOUT (FORMAT BINARY)"
    )
    pending, carry = bytearray(), None
    with store.tx() as conn, conn.cursor() as cur, cur.copy(query, (start, end)) as cp:
        first = True
        for block in cp:
            pending += block
            if first:
                del pending[:_HEADER]
                first = False
            if len(pending) < min(1 << 22, rows_per_chunk * _ROW.itemsize):
                continue
            carry = take(pending, carry)
            if carry is None or len(carry) < rows_per_chunk:
                continue
            cut = int(np.searchsorted(carry["user"], carry["user"][-1]))
            if cut > 0:
                yield log(carry[:cut])
                carry = carry[cut:]
        carry = take(pending, carry)
    if carry is not None and len(carry):
        yield log(carry)


def previous_counts(chunk, threshold: float, start: int, end: int, k: int) -> ev.Counts:
    pos = chunk.weight >= threshold
    u, it, ts, w = chunk.user[pos], chunk.item[pos], chunk.ts[pos], chunk.weight[pos]
    o = np.lexsort((it, ts, u))  # the sort collapsed_sequences always did (it now skips it for sorted input)
    t = triples_from_arrays(u[o], it[o], ts[o], w[o], chunk.item_cluster, threshold).window(start, end)
    key = (t.c1.astype(np.int64) * k + t.c2) * k + t.c_next
    uniq, cnt = np.unique(key, return_counts=True)  # successor_counts before its dense bincount
    pair, cn = np.divmod(uniq, k)
    c1, c2 = np.divmod(pair, k)
    return ev.Counts(c1.astype(np.int32), c2.astype(np.int32), cn.astype(np.int32), cnt.astype(np.int64), len(t))


# --------------------------------------------------------------------------------------------- child


def child(cfg: dict) -> None:
    """One timed refresh. Prints a JSON line with the timings, then exits."""
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn = connect(cfg["dsn"])
    store = Store(dsn=cfg["dsn"], schema=cfg["schema"], conn=conn)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    start, end, thr = cfg["start"], cfg["end"], cfg["threshold"]
    params = ev.EvidenceParams(min_support=cfg["min_support"])
    t0 = time.perf_counter()
    catalogue, item_cluster = cat.load_catalogue(store)
    k = len(catalogue)
    t1 = time.perf_counter()
    parts, t_count, rows, chunks = [], 0.0, 0, 0
    previous = cfg.get("variant") == "previous"
    stream = previous_iter_interactions if previous else cat.iter_interactions
    for chunk in stream(store, start, end, item_cluster, catalogue, rows_per_chunk=cfg["rows_per_chunk"]):
        tc = time.perf_counter()
        if previous:
            parts.append(previous_counts(chunk, thr, start, end, k))
        else:
            parts.append(ev.Counts.of(triples(chunk, thr).window(start, end), k))
        t_count += time.perf_counter() - tc
        rows += len(chunk)
        chunks += 1
        del chunk
    t2 = time.perf_counter()
    counts = ev.Counts.merge(parts, k)
    del parts
    t3 = time.perf_counter()
    snap = ev.build_snapshot(store, counts, (start, end), params)
    t4 = time.perf_counter()
    vmhwm = None
    try:
        for line in Path(f"/proc/{backend}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                vmhwm = int(line.split()[1])
    except OSError:
        pass
    own_hwm = None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            own_hwm = int(line.split()[1])
    out = {
        "rows": rows,
        "chunks": chunks,
        "total_s": t4 - t0,
        "catalogue_s": t1 - t0,
        "stream_s": (t2 - t1) - t_count,
        "count_s": t_count,
        "merge_s": t3 - t2,
        "build_s": t4 - t3,
        "triples": counts.triples,
        "count_rows": len(counts.c1),
        "pairs": snap.pairs,
        "borrowed_pairs": snap.borrowed_pairs,
        "digest": counts_digest(counts),
        "rss_start_kb": rss0,
        "rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vmhwm_self_kb": own_hwm,
        "backend_vmhwm_kb": vmhwm,
    }
    conn.close()
    print("CHILD " + json.dumps(out), flush=True)


# Linux carries a process's peak RSS over fork and exec (ru_maxrss of a child starts at its parent's RSS),
# so refresh children are started by a tiny launcher that is itself started before this process grows
# (MiniLM, generated chunks): os.wait4 in the launcher then gives each child's own peak.
_LAUNCHER = r"""
import json, os, subprocess, sys
for line in sys.stdin:
    p = subprocess.Popen(json.loads(line), stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": p.returncode, "out": out, "maxrss_kb": ru.ru_maxrss}), flush=True)
"""


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, cfg: dict) -> dict:
        """Run one refresh in a fresh interpreter; its peak RSS comes from os.wait4 (this child only)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([sys.executable, __file__, "--child", json.dumps(cfg)]) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if reply["rc"] != 0:
            raise RuntimeError(f"refresh child failed ({reply['rc']}):\n{reply['out']}")
        line = next(x for x in reply["out"].splitlines() if x.startswith("CHILD "))
        res = json.loads(line[6:])
        res["rss_child_kb"] = reply["maxrss_kb"]
        return res

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


# --------------------------------------------------------------------------------------------- floor


def floor_rows(chunk, item_cluster: np.ndarray) -> bytes:
    rows = np.empty(len(chunk), dtype=_FLOOR_ROW)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"], rows["l5"] = 5, 8, 8, 8, 4, 4
    rows["user"], rows["item"], rows["ts"], rows["weight"] = chunk.user, chunk.item, chunk.ts, chunk.weight
    rows["cluster"] = item_cluster[chunk.item]
    return rows.tobytes()


def floor_once(store: Store, path: Path, unlogged: bool, user_cluster: bool) -> dict:
    """COPY the raw rows into a fresh table, then one GROUP BY pass. Timed together, like a refresh."""
    conn = store.conn
    name = f"{store.schema}.floor_raw"
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    t0 = time.perf_counter()
    conn.execute(
        f"CREATE {'UNLOGGED ' if unlogged else ''}TABLE {name}"
        " (user_id bigint, item_id bigint, ts bigint, weight real, cluster int) WITH (autovacuum_enabled = false)"
    )  # no autoanalyze halfway through the repeats: the same plan every time
    with conn.cursor().copy(f"COPY {name} FROM STDIN (FORMAT BINARY)") as cp, path.open("rb") as f:
        while block := f.read(_BLOCK):
            cp.write(block)
    t1 = time.perf_counter()
    groups = conn.execute(f"SELECT cluster, count(*) FROM {name} GROUP BY cluster").fetchall()
    t2 = time.perf_counter()
    n_uc = None
    if user_cluster:  # a heavier single pass, for reference: per (user, cluster), many groups
        n_uc = conn.execute(f"SELECT count(*) FROM (SELECT user_id, cluster, count(*) FROM {name} GROUP BY 1, 2) g")
        n_uc = n_uc.fetchone()[0]  # type: ignore[index]
    t3 = time.perf_counter()
    conn.execute(f"DROP TABLE {name}")
    return {
        "copy_s": t1 - t0,
        "groupby_s": t2 - t1,
        "total_s": t2 - t0,
        "groupby_user_cluster_s": (t3 - t2) if user_cluster else None,
        "groups": len(groups),
        "user_cluster_groups": n_uc,
    }


# --------------------------------------------------------------------------------------------- parent


def med(xs: list[float]) -> float:
    from _common import median

    return median(xs)


def bench_size(dsn: str, n: int, args: argparse.Namespace, tmpdir: Path, launcher: Launcher) -> dict:
    from _common import fmt_rate, fresh_store

    schema = f"bench_ev_{n}"
    store = fresh_store(dsn, schema)
    spec = SyntheticSpec(n_interactions=n, n_clusters=args.clusters, seed=args.seed)
    stream = SyntheticStream(spec)
    print(
        f"\n== N = {n:,} interactions ({spec.n_users:,} users, {args.clusters} clusters, "
        f"{len(stream.item_cluster):,} items, {spec.days} days) ==",
        flush=True,
    )
    t = time.perf_counter()
    cat.save_catalogue(store, stream.catalogue, stream.item_cluster)
    t_cat = time.perf_counter() - t
    # Load chunk by chunk (the parent never holds the whole log), writing the floor's COPY file as we go.
    floor_path = tmpdir / f"floor_{n}.bin"
    t_gen = t_load = 0.0
    loaded = 0
    check_parts: list[ev.Counts] = []
    with floor_path.open("wb") as f:
        f.write(_PGCOPY_HEADER)
        t = time.perf_counter()
        for chunk in stream.chunks():
            t_gen += time.perf_counter() - t
            t = time.perf_counter()
            loaded += cat.append_interactions(store, chunk)
            t_load += time.perf_counter() - t
            f.write(floor_rows(chunk, stream.item_cluster))
            if n <= args.check_max:  # reference counts, computed in memory from the generated log
                check_parts.append(
                    ev.Counts.of(triples(chunk, args.threshold).window(spec.start, spec.end), args.clusters)
                )
            t = time.perf_counter()
        f.write(b"\xff\xff")
    t = time.perf_counter()
    store.conn.execute(f"VACUUM (ANALYZE) {schema}.interactions")
    t_vac = time.perf_counter() - t
    size = store.conn.execute(f"SELECT pg_total_relation_size('{schema}.interactions')").fetchone()[0]  # type: ignore[index]
    print(f"catalogue + embeddings {t_cat:.1f} s (untimed); generate {t_gen:.1f} s (untimed)")
    print(
        f"load: append_interactions {loaded:,} rows in {t_load:.2f} s = {fmt_rate(loaded / t_load)}; "
        f"VACUUM ANALYZE {t_vac:.2f} s; table+index {size / 2**20:.0f} MiB",
        flush=True,
    )
    reference = counts_digest(ev.Counts.merge(check_parts, args.clusters)) if check_parts else None
    del check_parts

    cfg = {
        "dsn": dsn,
        "schema": schema,
        "start": spec.start,
        "end": spec.end,
        "threshold": args.threshold,
        "min_support": args.min_support,
        "rows_per_chunk": args.rows_per_chunk,
    }
    variants = ["production"] + (["previous"] if args.previous else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    floors: list[dict] = []
    for r in range(args.repeats):
        for v in variants:
            res = launcher.run({**cfg, "variant": v})
            runs[v].append(res)
            label = "refresh " if v == "production" else "previous"
            print(
                f"  {label} #{r + 1}: {res['total_s']:.2f} s = {fmt_rate(n / res['total_s'])}  "
                f"(stream {res['stream_s']:.2f}, count {res['count_s']:.2f}, merge {res['merge_s']:.2f}, "
                f"build_snapshot {res['build_s']:.2f}; {res['chunks']} chunks, {res['triples']:,} triples, "
                f"{res['pairs']:,} pairs of which {res['borrowed_pairs']:,} borrowed; "
                f"peak RSS {res['rss_child_kb'] / 1024:.0f} MiB, VmHWM {res['vmhwm_self_kb'] / 1024:.0f} MiB)",
                flush=True,
            )
            if res["rows"] != n:
                raise RuntimeError(f"{v} refresh read {res['rows']} rows, expected {n}")
            expected = reference or runs["production"][0]["digest"]
            if res["digest"] != expected:
                raise RuntimeError(f"{v} refresh counts {res['digest']} differ from {expected}")
        fl = floor_once(store, floor_path, unlogged=not args.floor_logged, user_cluster=args.groupby_user_cluster)
        floors.append(fl)
        uc = (
            f"; GROUP BY user, cluster {fl['groupby_user_cluster_s']:.2f} s, {fl['user_cluster_groups']:,} groups"
            if args.groupby_user_cluster
            else ""
        )
        print(
            f"  floor    #{r + 1}: {fl['total_s']:.2f} s = {fmt_rate(n / fl['total_s'])}  "
            f"(COPY {fl['copy_s']:.2f}, GROUP BY cluster {fl['groupby_s']:.2f}{uc}); this round's ratio "
            + ", ".join(f"{v} {runs[v][-1]['total_s'] / fl['total_s']:.2f}x" for v in variants),
            flush=True,
        )
    refreshes = runs["production"]
    floor_path.unlink()
    store.conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    store.close()

    r_total = med([x["total_s"] for x in refreshes])
    f_total = med([x["total_s"] for x in floors])
    f_uc = med([x["copy_s"] + x["groupby_user_cluster_s"] for x in floors]) if args.groupby_user_cluster else None
    return {
        "n": n,
        "load_s": t_load,
        "load_rate": loaded / t_load,
        "vacuum_s": t_vac,
        "refresh_s": r_total,
        "refresh_rate": n / r_total,
        "refresh_parts": {
            p: med([x[p] for x in refreshes]) for p in ("catalogue_s", "stream_s", "count_s", "merge_s", "build_s")
        },
        "floor_s": f_total,
        "floor_rate": n / f_total,
        "floor_parts": {p: med([x[p] for x in floors]) for p in ("copy_s", "groupby_s")},
        "floor_uc_s": f_uc,
        "ratio": r_total / f_total,
        "ratio_paired": med([a["total_s"] / b["total_s"] for a, b in zip(refreshes, floors, strict=True)]),
        "ratio_uc": r_total / f_uc if f_uc else None,
        "rss_mib": max(x["rss_child_kb"] for x in refreshes) / 1024,
        "rss_start_mib": min(x["rss_start_kb"] for x in refreshes) / 1024,
        "backend_vmhwm_mib": max((x["backend_vmhwm_kb"] or 0) for x in refreshes) / 1024,
        "triples": refreshes[0]["triples"],
        "pairs": refreshes[0]["pairs"],
        "borrowed_pairs": refreshes[0]["borrowed_pairs"],
        "checked": reference is not None,
        "previous": None
        if not args.previous
        else {
            "refresh_s": med([x["total_s"] for x in runs["previous"]]),
            "refresh_rate": n / med([x["total_s"] for x in runs["previous"]]),
            "ratio": med([x["total_s"] for x in runs["previous"]]) / f_total,
            "ratio_paired": med([a["total_s"] / b["total_s"] for a, b in zip(runs["previous"], floors, strict=True)]),
            "speedup": med([x["total_s"] for x in runs["previous"]]) / r_total,
            "rss_mib": max(x["rss_child_kb"] for x in runs["previous"]) / 1024,
            "refresh_parts": {
                p: med([x[p] for x in runs["previous"]])
                for p in ("catalogue_s", "stream_s", "count_s", "merge_s", "build_s")
            },
        },
        "runs": {**runs, "floor": floors},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--sizes", default="200000,1000000", help="comma-separated interaction counts (full: 1000000,10000000)"
    )
    p.add_argument("--repeats", type=int, default=3, help="repetitions of each measurement (median reported)")
    p.add_argument("--clusters", type=int, default=150, help="clusters in the synthetic catalogue (MovieLens: 173)")
    p.add_argument("--threshold", type=float, default=3.5, help="positive threshold on the weight")
    p.add_argument("--min-support", type=int, default=5, help="EvidenceParams.min_support")
    p.add_argument("--rows-per-chunk", type=int, default=1_000_000, help="iter_interactions rows_per_chunk")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--floor-logged", action="store_true", help="COPY the floor into a logged table (default: unlogged)")
    p.add_argument(
        "--previous",
        action="store_true",
        help="also time the path this replaced (row-by-row COPY, sort-based counting; see 'previous' in the source)",
    )
    p.add_argument(
        "--groupby-user-cluster",
        action="store_true",
        help="also time GROUP BY (user, cluster) on the floor table, for reference (slow at 10M)",
    )
    p.add_argument(
        "--check-max",
        type=int,
        default=1_000_000,
        help="check the refresh's counts against in-memory counts up to this size",
    )
    p.add_argument("--dsn", default=None, help="external PostgreSQL (default: an embedded one under /tmp)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from _common import fmt_rate, git_rev, machine, pg_settings, postgres, stamp

    sizes = [int(x) for x in args.sizes.split(",") if x]
    launcher = Launcher()  # first, while this process is small
    print(f"bench_evidence  {stamp()}  rev {git_rev()}  {machine()}")
    results = []
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="recupdate-bench-ev-") as tmp:
        settings = pg_settings(dsn)
        print("postgres: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        for n in sizes:
            results.append(bench_size(dsn, n, args, Path(tmp), launcher))
    launcher.close()

    print(
        f"\nmedians of {args.repeats} (floor = binary COPY into a fresh {'logged' if args.floor_logged else 'unlogged'}"
        " table + GROUP BY cluster; 'paired' = median of each refresh over the floor run right after it)"
    )
    print(
        f"{'N':>11} {'load':>9} {'refresh':>9} {'refresh/s':>10} {'floor':>8} {'floor/s':>9} {'ratio':>6} "
        f"{'paired':>7} {'peak RSS':>9}"
    )
    for r in results:
        print(
            f"{r['n']:>11,} {fmt_rate(r['load_rate']):>9} {r['refresh_s']:>8.2f}s {fmt_rate(r['refresh_rate']):>10} "
            f"{r['floor_s']:>7.2f}s {fmt_rate(r['floor_rate']):>9} {r['ratio']:>5.2f}x {r['ratio_paired']:>6.2f}x "
            f"{r['rss_mib']:>6.0f} MiB"
        )
    for r in results:
        parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["refresh_parts"].items())
        uc = (
            f"; COPY + GROUP BY user, cluster {r['floor_uc_s']:.2f} s = {r['ratio_uc']:.2f}x" if r["floor_uc_s"] else ""
        )
        print(
            f"  N={r['n']:,}: refresh parts (s): {parts}; floor: COPY {r['floor_parts']['copy_s']:.2f}, "
            f"GROUP BY {r['floor_parts']['groupby_s']:.2f}{uc}; child RSS at start {r['rss_start_mib']:.0f} MiB; "
            f"PG backend VmHWM {r['backend_vmhwm_mib']:.0f} MiB (incl. shared buffers it touched); "
            f"counts checked vs in-memory: {r['checked']}"
        )
    for r in results:
        if r["previous"]:
            q = r["previous"]
            parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in q["refresh_parts"].items())
            print(
                f"  N={r['n']:,} previous: {q['refresh_s']:.2f} s = {fmt_rate(q['refresh_rate'])}; "
                f"production is {q['speedup']:.2f}x faster; previous vs floor {q['ratio']:.2f}x (paired {q['ratio_paired']:.2f}x); "
                f"peak RSS {q['rss_mib']:.0f} MiB; parts (s): {parts}"
            )
    print("targets: refresh within 3x of the floor; peak RSS of the refresh under 2 GB at 10M")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": stamp(), "settings": settings, "results": results}, indent=1))


if __name__ == "__main__":
    main()
