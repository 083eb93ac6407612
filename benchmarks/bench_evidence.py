#!/usr/bin/env python
"""Evidence refresh throughput: interactions/s from the store's log to a published snapshot.

What is timed (the production refresh path), for each size N, in a fresh child process:

    counted = jobs.counting.count_window(store, start, end, threshold, k, plan)   # load_catalogue, then
        # iter_interactions in chunks of whole users, sequences.triples(chunk).window(start, end),
        # Counts.of per chunk, Counts.merge; with a Ray plan, one task per shard of users, merged
    evidence.build_snapshot(store, counted.counts, (start, end), params)    # rank, borrow, publish atomically

The interactions are loaded beforehand with catalogue.append_interactions (timed and reported on its own,
not part of the refresh) and vacuumed/analysed, as autovacuum would. The window is the whole synthetic
span, so every one of the N interactions is read.

The first refresh of a catalogue version builds the shared pair index (HNSW over every ordered pair of
clusters) and searches its weak pairs' neighbour lists; it is run and reported once, apart. The timed
refreshes reuse them, as every later refresh of the same catalogue does.

Variants, in the same rounds: `--previous`, the snapshot path this replaced (SQL ranking, an HNSW index
built per snapshot, one search per weak pair; kept below for the comparison), on the same counts; and
`--ray-workers 1,2`, the counting split by user into one shard per worker on a local Ray with that many
CPUs (Ray's start is not timed: a RayJob's cluster is up before its driver runs); `--inline-shards 8`, the
counting split into 8 shards counted one after another in the child (each shard's query scans the whole
window and keeps its users: this shows what an extra shard costs PostgreSQL). Each run reports the CPU
seconds of the counting (this process, or the Ray tasks) and, for the embedded server, PostgreSQL's CPU
seconds (postmaster, backends and reaped backends, from /proc): the per-core rates of docs/scaling.md.

Baseline in the same run and the same PostgreSQL (the "floor"): binary COPY of the same raw rows
(user, item, ts, weight, cluster of item) from the client into a fresh table, then one GROUP BY pass over
it (`SELECT cluster, count(*) ... GROUP BY cluster`). The GROUP BY (user, cluster) variant, a hash
aggregate with many groups, is timed on the same table too and reported beside it.

Each measurement is repeated (refresh and floor interleaved) and the median is reported. The refresh
runs in a child process (this script with --child), so its peak RSS (os.wait4's ru_maxrss of the child)
excludes data generation; PostgreSQL's memory is separate (the backend's VmHWM is shown for reference).

    .venv/bin/python benchmarks/bench_evidence.py                          # quick: 200k and 1M, ~1-2 min
    .venv/bin/python benchmarks/bench_evidence.py --sizes 1000000,10000000 --previous --ray-workers 1,2 \
        --ray-min 10000000 --repeats 2                                      # full (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from psycopg import sql

from recupdate_workloads.data.sequences import triples
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
# The snapshot path this replaced, timed beside it with --previous on the same Counts (the same pairs and
# borrowed pairs come out): the counts COPYed row by row into PostgreSQL, ranked and scored there with window
# functions, the snapshot's donor pairs given their vectors and a fresh HNSW index, and every weak pair
# searched in it (one LATERAL statement). The production path ranks and borrows in numpy, on a pair index
# built once per catalogue version (store/evidence.py).

_PREV_RANKED = """
CREATE TABLE {ev} AS
WITH c AS (
    SELECT c1, c2, cn, cnt, sum(cnt) OVER (PARTITION BY c1, c2) AS support FROM {now}
), prev AS (
    SELECT c1, c2, cn, cnt::real / sum(cnt) OVER (PARTITION BY c1, c2) AS share FROM {prev}
), scored AS (
    SELECT c.c1, c.c2, c.cn, c.cnt, c.support, c.cnt::real / c.support AS share,
           CASE WHEN %(trend)s THEN c.cnt::real / c.support - coalesce(prev.share, 0)
                ELSE c.cnt::real / c.support END AS score
    FROM c LEFT JOIN prev USING (c1, c2, cn)
    WHERE c.support >= %(min_support)s
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY c1, c2 ORDER BY score DESC, cnt DESC, cn) AS rank FROM scored
)
SELECT c1, c2, support::int AS support, rank::smallint AS rank, cn AS successor, cnt::int AS count,
       share::real AS share, score::real AS score, false AS borrowed, '{{}}'::int[] AS borrowed_from
FROM ranked WHERE rank <= %(top_r)s
"""
_PREV_PAIRS = """
CREATE TABLE {pairs} AS
SELECT e.c1, e.c2, e.support, {vec} AS embedding
FROM (SELECT DISTINCT c1, c2, support FROM {ev}) e
JOIN clusters a ON a.cluster = e.c1 JOIN clusters b ON b.cluster = e.c2
"""


def _prev_copy_counts(store: Store, table, counts: ev.Counts) -> None:
    with store.conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (c1 int, c2 int, cn int, cnt bigint)").format(table))
        with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(table)) as cp:
            cp.set_types(["int4", "int4", "int4", "int8"])
            for row in zip(
                counts.c1.tolist(), counts.c2.tolist(), counts.c_next.tolist(), counts.count.tolist(), strict=True
            ):
                cp.write_row(row)


def previous_build_snapshot(store: Store, now: ev.Counts, window, params: ev.EvidenceParams, keep: int = 3):
    """build_snapshot as it was (frequency scoring), with timings of its steps."""
    parts: dict[str, float] = {}
    t = time.perf_counter()
    with store.tx() as c:
        sid = c.execute(
            "INSERT INTO snapshots (window_start, window_end, scoring, top_r, min_support, triples, state)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'building') RETURNING snapshot_id",
            (window[0], window[1], params.scoring, params.top_r, params.min_support, now.triples),
        ).fetchone()[0]  # type: ignore[index]
    evt, pairs = store.ident(f"evidence_s{sid}"), store.ident(f"evidence_pairs_s{sid}")
    cnow, cprev = store.ident(f"_counts_s{sid}"), store.ident(f"_prev_s{sid}")
    _prev_copy_counts(store, cnow, now)
    _prev_copy_counts(store, cprev, ev.Counts.empty())
    parts["copy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with store.tx() as c:
        args = {"trend": False, "min_support": params.min_support, "top_r": params.top_r}
        c.execute(sql.SQL(_PREV_RANKED).format(ev=evt, now=cnow, prev=cprev), args)
        c.execute(sql.SQL(_PREV_PAIRS).format(pairs=pairs, ev=evt, vec=sql.SQL(ev._PAIR_VEC)))
        c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2)").format(pairs))
    parts["rank_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with store.tx() as c:
        c.execute("SET LOCAL maintenance_work_mem = '1GB'")
        c.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding public.halfvec_cosine_ops)").format(pairs))
    parts["hnsw_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with store.tx() as c:
        c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(params.ef_search)))
        c.execute(
            sql.SQL(
                "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT c1, c2, sum(cnt)::int AS support FROM {} "
                "GROUP BY c1, c2 HAVING sum(cnt) < %s"
            ).format(sql.Identifier(f"_weak_s{sid}"), cnow),
            (params.min_support,),
        )
        c.execute(
            sql.SQL("INSERT INTO {ev} ").format(ev=evt)
            + sql.SQL(ev._BORROW).format(
                q=sql.Identifier(f"_weak_s{sid}"), pairs=pairs, ev=evt, vec=sql.SQL(ev._PAIR_VEC)
            ),
            {"k": params.neighbours, "top_r": params.top_r},
        )
        parts["borrow_s"] = time.perf_counter() - t
        t = time.perf_counter()
        c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2, rank)").format(evt))
        stats = c.execute(
            sql.SQL("SELECT count(DISTINCT (c1, c2)), count(DISTINCT (c1, c2)) FILTER (WHERE borrowed) FROM {}").format(
                evt
            )
        ).fetchone()
        c.execute(sql.SQL("DROP TABLE {}, {}").format(cnow, cprev))
    ev.publish_snapshot(store, sid, int(stats[0]), int(stats[1]))  # type: ignore[index]
    ev.prune_snapshots(store, keep)
    parts["publish_s"] = time.perf_counter() - t
    return ev.Snapshot(sid, window[0], window[1], int(stats[0]), int(stats[1]), now.triples, parts)  # type: ignore[index]


# ------------------------------------------------------------------------------------ PostgreSQL CPU


def pg_cpu_seconds(dsn: str) -> float | None:
    """CPU seconds used so far by the embedded server (postmaster, live backends, and the reaped ones through
    the postmaster's cutime/cstime); None for an external server."""
    from urllib.parse import parse_qs, urlparse

    host = (parse_qs(urlparse(dsn).query).get("host") or [""])[0]
    pidfile = Path(host) / "postmaster.pid"
    if not host or not pidfile.exists():
        return None
    pm = int(pidfile.read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d.name), int(f[1])
        if pid == pm:
            total += sum(int(x) for x in f[11:15]) / tick  # utime, stime, cutime, cstime
        elif ppid == pm:
            total += (int(f[11]) + int(f[12])) / tick
    return total


# --------------------------------------------------------------------------------------------- child


def child(cfg: dict) -> None:
    """One timed refresh. Prints a JSON line with the timings, then exits."""
    import resource

    from recupdate_workloads.jobs import counting

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn = connect(cfg["dsn"])
    store = Store(dsn=cfg["dsn"], schema=cfg["schema"], conn=conn)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    start, end, thr = cfg["start"], cfg["end"], cfg["threshold"]
    params = ev.EvidenceParams(min_support=cfg["min_support"])
    variant, workers = cfg["variant"], int(cfg.get("workers") or 0)
    ray_start_s = None
    if workers:  # the RayJob's cluster is up before its driver starts: Ray's start is not part of a refresh
        t = time.perf_counter()
        _start_ray(workers)
        ray_start_s = time.perf_counter() - t
        plan = counting.CountPlan(workers, "ray", 0)
    else:  # one shard, or several one after another in this process (what each extra shard costs PostgreSQL)
        plan = counting.CountPlan(int(cfg.get("shards") or 1), "inline", 0)
    k = cfg["clusters"]
    pg0, cpu0 = pg_cpu_seconds(cfg["dsn"]), _cpu()
    t0 = time.perf_counter()
    counted = counting.count_window(store, start, end, thr, k, plan, rows_per_chunk=cfg["rows_per_chunk"])
    t1 = time.perf_counter()
    cpu1, pg1 = _cpu(), pg_cpu_seconds(cfg["dsn"])
    build = previous_build_snapshot if variant == "previous" else ev.build_snapshot
    snap = build(store, counted.counts, (start, end), params)
    t2 = time.perf_counter()
    pg2 = pg_cpu_seconds(cfg["dsn"])
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
    counts = counted.counts
    out = {
        "rows": sum(s.rows for s in counted.shards),
        "shards": [dataclasses.asdict(s) for s in counted.shards],
        "total_s": t2 - t0,
        "count_s": t1 - t0,
        "build_s": t2 - t1,
        "build_parts": snap.parts,
        "count_cpu_s": cpu1 - cpu0 if not workers else sum(s.cpu_s for s in counted.shards),
        "pg_count_cpu_s": None if pg0 is None or pg1 is None else pg1 - pg0,
        "pg_build_cpu_s": None if pg1 is None or pg2 is None else pg2 - pg1,
        "ray_start_s": ray_start_s,
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
    if workers:
        import ray

        ray.shutdown()


def _start_ray(cpus: int, tries: int = 3) -> None:
    """A local Ray with `cpus` CPUs. On a loaded machine its start can time out: try again."""
    import ray

    from recupdate_workloads.model.train_loop import ensure_ray

    for i in range(tries):
        try:
            ensure_ray(num_cpus=cpus, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if i == tries - 1:
                raise


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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


def _variants(args: argparse.Namespace, n: int) -> list[tuple[str, dict]]:
    """(label, child config) of what is timed at size n, in the order of each round."""
    out = [("refresh", {"variant": "production"})]
    if args.previous:
        out.append(("previous", {"variant": "previous"}))
    for n_shards in [int(x) for x in args.inline_shards.split(",") if x]:
        out.append((f"inline x{n_shards}", {"variant": "production", "shards": n_shards}))
    if n >= args.ray_min:
        for w in [int(x) for x in args.ray_workers.split(",") if x]:
            out.append((f"ray x{w}", {"variant": "production", "workers": w}))
    return out


def _line(label: str, res: dict, n: int) -> str:
    from _common import fmt_rate

    bp = res["build_parts"]
    steps = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in bp.items() if k.endswith("_s"))
    pg = res["pg_count_cpu_s"]
    shards = ""
    if len(res["shards"]) > 1 or res["ray_start_s"] is not None:
        shards = "; shards " + ", ".join(
            f"#{x['shard']} {x['rows']:,} rows {x['wall_s']:.2f} s wall {x['cpu_s']:.2f} s CPU" for x in res["shards"]
        )
        if res["ray_start_s"] is not None:
            shards += f"; Ray start {res['ray_start_s']:.1f} s (not timed)"
    return (
        f"  {label:9} {res['total_s']:.2f} s = {fmt_rate(n / res['total_s'])}  (count {res['count_s']:.2f}: "
        f"{res['count_cpu_s']:.2f} s CPU here"
        + (f", PostgreSQL {pg:.2f} s CPU" if pg is not None else "")
        + f"; build_snapshot {res['build_s']:.2f}: {steps}"
        + (f", PostgreSQL {res['pg_build_cpu_s']:.2f} s CPU" if res["pg_build_cpu_s"] is not None else "")
        + f"; {res['triples']:,} triples, {res['pairs']:,} pairs of which {res['borrowed_pairs']:,} borrowed; "
        f"peak RSS {res['rss_child_kb'] / 1024:.0f} MiB{shards})"
    )


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
        "clusters": args.clusters,
    }
    # The first refresh of a catalogue version builds its pair index and searches its weak pairs' lists;
    # every later one reuses them. Timed apart, once.
    cold = launcher.run({**cfg, "variant": "production"})
    print(_line("first", cold, n) + "  <- builds the pair index of this catalogue", flush=True)
    variants = _variants(args, n)
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    floors: list[dict] = []
    for r in range(args.repeats):
        for label, extra in variants:
            res = launcher.run({**cfg, **extra})
            runs[label].append(res)
            print(_line(f"{label} #{r + 1}", res, n), flush=True)
            if res["rows"] != n:
                raise RuntimeError(f"{label} read {res['rows']} rows, expected {n}")
            expected = reference or cold["digest"]
            if res["digest"] != expected:
                raise RuntimeError(f"{label} counts {res['digest']} differ from {expected}")
            if (res["pairs"], res["borrowed_pairs"]) != (cold["pairs"], cold["borrowed_pairs"]):
                raise RuntimeError(
                    f"{label}: {res['pairs']} pairs / {res['borrowed_pairs']} borrowed, not as the first"
                )
        pg_a = pg_cpu_seconds(dsn)
        fl = floor_once(store, floor_path, unlogged=not args.floor_logged, user_cluster=args.groupby_user_cluster)
        pg_b = pg_cpu_seconds(dsn)
        fl["pg_cpu_s"] = None if pg_a is None or pg_b is None else pg_b - pg_a
        floors.append(fl)
        uc = (
            f"; GROUP BY user, cluster {fl['groupby_user_cluster_s']:.2f} s, {fl['user_cluster_groups']:,} groups"
            if args.groupby_user_cluster
            else ""
        )
        print(
            f"  floor    #{r + 1}: {fl['total_s']:.2f} s = {fmt_rate(n / fl['total_s'])}  "
            f"(COPY {fl['copy_s']:.2f}, GROUP BY cluster {fl['groupby_s']:.2f}{uc}); this round's ratio "
            + ", ".join(f"{label} {runs[label][-1]['total_s'] / fl['total_s']:.2f}x" for label, _ in variants),
            flush=True,
        )
    floor_path.unlink()
    store.conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    store.close()

    f_total = med([x["total_s"] for x in floors])
    f_uc = med([x["copy_s"] + x["groupby_user_cluster_s"] for x in floors]) if args.groupby_user_cluster else None

    def summary(rs: list[dict]) -> dict:
        total = med([x["total_s"] for x in rs])
        pg = [x["pg_count_cpu_s"] for x in rs if x["pg_count_cpu_s"] is not None]
        return {
            "refresh_s": total,
            "refresh_rate": n / total,
            "ratio": total / f_total,
            "ratio_paired": med([a["total_s"] / b["total_s"] for a, b in zip(rs, floors, strict=True)]),
            "count_s": med([x["count_s"] for x in rs]),
            "build_s": med([x["build_s"] for x in rs]),
            "build_parts": {k: med([x["build_parts"].get(k, 0.0) for x in rs]) for k in rs[0]["build_parts"]},
            "count_cpu_s": med([x["count_cpu_s"] for x in rs]),
            "count_rate_per_cpu_s": n / med([x["count_cpu_s"] for x in rs]),
            "pg_count_cpu_s": med(pg) if pg else None,
            "rss_mib": max(x["rss_child_kb"] for x in rs) / 1024,
            "shards": len(rs[0]["shards"]),
        }

    return {
        "n": n,
        "load_s": t_load,
        "load_rate": loaded / t_load,
        "vacuum_s": t_vac,
        "floor_s": f_total,
        "floor_rate": n / f_total,
        "floor_parts": {p: med([x[p] for x in floors]) for p in ("copy_s", "groupby_s")},
        "floor_pg_cpu_s": med([x["pg_cpu_s"] for x in floors]) if floors[0]["pg_cpu_s"] is not None else None,
        "floor_uc_s": f_uc,
        "first": {"refresh_s": cold["total_s"], "build_s": cold["build_s"], "build_parts": cold["build_parts"]},
        "variants": {label: summary(rs) for label, rs in runs.items()},
        "triples": cold["triples"],
        "pairs": cold["pairs"],
        "borrowed_pairs": cold["borrowed_pairs"],
        "checked": reference is not None,
        "runs": {**runs, "floor": floors, "first": [cold]},
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
        help="also time the snapshot path this replaced (SQL ranking, an HNSW build per snapshot; see the source)",
    )
    p.add_argument(
        "--ray-workers",
        default="",
        help="also count on a local Ray with this many workers (one shard each), e.g. 1,2",
    )
    p.add_argument(
        "--inline-shards",
        default="",
        help="also count split into this many shards one after another in one process, e.g. 8: each shard scans "
        "the whole window, so this shows what a shard costs PostgreSQL",
    )
    p.add_argument("--ray-min", type=int, default=0, help="only sizes from this many interactions on get the Ray runs")
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
    print(f"bench_evidence  {stamp()}  rev {git_rev()}  {machine()}  load {_load()}")
    results = []
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="recupdate-bench-ev-") as tmp:
        settings = pg_settings(dsn)
        print("postgres: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        for n in sizes:
            results.append(bench_size(dsn, n, args, Path(tmp), launcher))
    launcher.close()

    print(
        f"\nmedians of {args.repeats} (floor = binary COPY into a fresh {'logged' if args.floor_logged else 'unlogged'}"
        " table + GROUP BY cluster; 'paired' = median of each run over the floor run of its round); load " + _load()
    )
    print(
        f"{'N':>11} {'variant':>9} {'refresh':>9} {'refresh/s':>10} {'floor':>8} {'ratio':>6} {'paired':>7} "
        f"{'count':>7} {'build':>7} {'count/CPU-s':>12} {'PG CPU':>7} {'peak RSS':>9}"
    )
    for r in results:
        for label, v in r["variants"].items():
            pg = f"{v['pg_count_cpu_s']:.2f}s" if v["pg_count_cpu_s"] is not None else "-"
            print(
                f"{r['n']:>11,} {label:>9} {v['refresh_s']:>8.2f}s {fmt_rate(v['refresh_rate']):>10} "
                f"{r['floor_s']:>7.2f}s {v['ratio']:>5.2f}x {v['ratio_paired']:>6.2f}x {v['count_s']:>6.2f}s "
                f"{v['build_s']:>6.2f}s {fmt_rate(v['count_rate_per_cpu_s']):>12} {pg:>7} {v['rss_mib']:>6.0f} MiB"
            )
    for r in results:
        fp = r["first"]
        print(
            f"  N={r['n']:,}: first refresh of the catalogue {fp['refresh_s']:.2f} s (build_snapshot {fp['build_s']:.2f}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in fp["build_parts"].items())
            + f"); floor: COPY {r['floor_parts']['copy_s']:.2f}, GROUP BY {r['floor_parts']['groupby_s']:.2f}, "
            f"PostgreSQL CPU {r['floor_pg_cpu_s'] if r['floor_pg_cpu_s'] is None else round(r['floor_pg_cpu_s'], 2)} s; "
            f"{r['pairs']:,} pairs, {r['borrowed_pairs']:,} borrowed; counts checked vs in-memory: {r['checked']}"
        )
        for label, v in r["variants"].items():
            print(
                f"  N={r['n']:,} {label}: build_snapshot parts (median s): "
                + ", ".join(f"{k} {x:.3f}" for k, x in v["build_parts"].items())
            )
    print("targets: refresh within 3x of the floor at 1M and 10M; peak RSS of the refresh under 2 GB at 10M")
    summary = {
        "date": stamp(),
        "sizes": sizes,
        "ratios": {f"{r['n']}:{label}": round(v["ratio"], 3) for r in results for label, v in r["variants"].items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"date": stamp(), "settings": settings, "results": results}, indent=1))
    print(json.dumps(summary))


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
