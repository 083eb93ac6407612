"""HTTP intake benchmark: POST /v1/interactions through real uvicorn on 127.0.0.1, against the bare store write of
the same batches without HTTP, in the same run and the same PostgreSQL.

The server is the serving app (``make_api``) in a uvicorn subprocess (httptools and uvloop where installed, as
``uvicorn[standard]`` runs), over an in-memory release whose store_schema is a fresh, owned schema with a
catalogue of ``--items`` items. Load is closed-loop: ``--concurrency`` keep-alive connections, each sending its
next batch when the previous answer has arrived; every answer is checked (200, every event accepted, or in the
resend phase every event a duplicate). A batch is ``--batch`` events of random users, items and times, each with
a unique event id (``--no-event-ids``: without, the plain COPY path).

Phases, each ``--batches`` batches, repeated ``--repeats`` times in turn (figures: medians over the repeats):

* ``http``: new batches through HTTP;
* ``resend``: the same batches again (all duplicates: a producer's retries);
* ``inproc``: new batches through the intake's own path without HTTP (check_rows + write_batch), same concurrency;
* ``bare``: new batches straight into store/ingest.py ``write_interactions`` (the baseline), same concurrency.

    .venv/bin/python benchmarks/bench_intake.py                          # 5 rounds x 4 phases x 30 batches of 1,000
    .venv/bin/python benchmarks/bench_intake.py --batches 200 --repeats 5 --concurrency 4

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    free_port,
    fresh_store,
    git_rev,
    machine,
    median,
    percentile,
    pg_settings,
    postgres,
    stamp,
    wait_http,
)

SCHEMA_ENV = "BENCH_INTAKE_SCHEMA"
T0 = 1_900_000_000


def intake_app() -> Any:
    """The uvicorn factory (``--factory bench_intake:intake_app``): the serving app over an in-memory release
    whose store_schema is $BENCH_INTAKE_SCHEMA; the intake writes there with $RECUPDATE_STORE_DSN."""
    from contextlib import asynccontextmanager

    import numpy as np

    from recupdate_workloads.data.types import Catalogue, Cluster
    from recupdate_workloads.serving.app import make_api
    from recupdate_workloads.serving.release import Loaded
    from recupdate_workloads.serving.service import RecommenderService

    def bundle(cfg: Any) -> Loaded:
        return Loaded(
            config=cfg,
            catalogue=Catalogue([Cluster(0, "a"), Cluster(1, "b")]),
            table_index={},
            table_ids=np.zeros((0, 2), dtype=np.int64),
            table_scores=np.zeros((0, 2)),
            table_source=np.zeros(0, dtype=np.int8),
            popular=((0, 1.0), (1, 1.0)),
        )

    svc = RecommenderService(loader=bundle, retry_delays_s=())
    uc = {"release_id": "bench", "table_version": 0, "store_schema": os.environ[SCHEMA_ENV]}

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        assert await svc.reconfigure(uc), svc.last_error
        yield
        svc.shutdown()

    return make_api(svc, lifespan=lifespan)


# ---------------------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Distinct batches of events (unique event ids across the whole run), as dicts and as request bodies."""

    def __init__(self, items: list[str], batch: int, users: int, event_ids: bool, seed: int = 0) -> None:
        self.items, self.batch, self.users, self.event_ids = items, batch, users, event_ids
        self.rng = random.Random(seed)
        self.serial = itertools.count()

    def make(self, n: int) -> list[list[dict[str, Any]]]:
        out = []
        for _ in range(n):
            b = next(self.serial)
            events = []
            for k in range(self.batch):
                e: dict[str, Any] = {
                    "user": f"user-{self.rng.randrange(self.users)}",
                    "item": self.rng.choice(self.items),
                    "ts": T0 + self.rng.randrange(30 * 86400),
                    "weight": float(self.rng.randrange(1, 11)) / 2,
                }
                if self.event_ids:
                    e["event_id"] = f"ev-{b}-{k}"
                events.append(e)
            out.append(events)
        return out


def body(events: list[dict[str, Any]]) -> bytes:
    return json.dumps({"events": events}, separators=(",", ":")).encode()


def columns(events: list[dict[str, Any]]) -> dict[str, Any]:
    cols: dict[str, Any] = {k: [e[k] for e in events] for k in ("user", "item", "ts", "weight")}
    if "event_id" in events[0]:
        cols["event_id"] = [e["event_id"] for e in events]
    return cols


# ---------------------------------------------------------------------------------------------------------
# HTTP client: raw asyncio streams (tens of microseconds per request, so the client takes little CPU)


def _request(payload: bytes) -> bytes:
    return (
        b"POST /v1/interactions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    return status, await reader.readexactly(length)


async def closed_loop(port: int, payloads: list[bytes], concurrency: int, check: Callable[[int, bytes], str]) -> dict:
    """Each payload once, over ``concurrency`` keep-alive connections. Returns latencies, wall time, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    todo = iter(range(len(payloads)))
    reqs = [_request(p) for p in payloads]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in todo:
                t0 = time.perf_counter()
                writer.write(reqs[i])
                status, answer = await _read_response(reader)
                latencies.append((time.perf_counter() - t0) * 1000)
                problem = check(status, answer)
                if problem:
                    errors.append(problem)
        finally:
            writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - t, "latencies_ms": latencies, "errors": errors}


def expect(field: str, n: int) -> Callable[[int, bytes], str]:
    def check(status: int, answer: bytes) -> str:
        if status != 200:
            return f"{status}: {answer[:200]!r}"
        out = json.loads(answer)
        return "" if out.get(field) == n else f"{field} = {out.get(field)}, expected {n}: {answer[:200]!r}"

    return check


def in_process(batches: list[list[dict[str, Any]]], concurrency: int, make: Callable[[], Any], write: Callable) -> dict:
    """Each batch once through ``write(store, batch)``, ``concurrency`` threads with a connection each."""
    latencies: list[float] = []
    todo = iter(batches)
    lock = threading.Lock()

    def worker() -> None:
        store = make()
        try:
            while True:
                with lock:
                    b = next(todo, None)
                if b is None:
                    return
                t0 = time.perf_counter()
                write(store, b)
                latencies.append((time.perf_counter() - t0) * 1000)
        finally:
            store.close()

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(worker) for _ in range(concurrency)]:
            f.result()
    return {"seconds": time.perf_counter() - t, "latencies_ms": latencies, "errors": []}


def summary(run: dict, events: int) -> dict[str, float]:
    lat = run["latencies_ms"]
    return {
        "events_per_s": events / run["seconds"] if run["seconds"] else 0.0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "errors": float(len(run["errors"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="external PostgreSQL DSN (default: an embedded one)")
    ap.add_argument("--batch", type=int, default=1000, help="events per batch")
    ap.add_argument("--batches", type=int, default=30, help="batches per phase and repeat")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of all phases (figures: medians)")
    ap.add_argument("--concurrency", type=int, default=2, help="connections (HTTP) or threads (in-process)")
    ap.add_argument("--items", type=int, default=5000, help="items in the catalogue")
    ap.add_argument("--users", type=int, default=20000, help="distinct users the events come from")
    ap.add_argument("--no-event-ids", action="store_true", help="events without ids (the plain COPY path)")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()

    from recupdate_workloads.serving.intake import check_rows, write_batch
    from recupdate_workloads.store import ingest
    from recupdate_workloads.store.db import Store, connect
    from recupdate_workloads.store.owner import Owner, claim_owner

    schema = f"bench_intake_{os.getpid()}"
    items = [f"item-{i}" for i in range(args.items)]
    gen = Batches(items, args.batch, args.users, not args.no_event_ids)
    phases = ("http", "resend", "inproc", "bare")
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in phases}
    print(f"bench_intake {stamp()} rev {git_rev()}, {machine()}", flush=True)
    with postgres(args.dsn) as dsn:
        store = fresh_store(dsn, schema)
        claim_owner(store.conn, schema, Owner("bench", "intake"))
        ingest.write_catalogue(
            store, items={"item": items, "cluster": [f"c{i % 50}" for i in range(args.items)]}, embed=False
        )
        settings = pg_settings(dsn)
        print(f"  PostgreSQL {settings['server_version']}, shared_buffers {settings['shared_buffers']}", flush=True)
        port = free_port()
        env = {**os.environ, "RECUPDATE_STORE_DSN": dsn, SCHEMA_ENV: schema}
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench_intake:intake_app"]
        cmd += ["--app-dir", str(Path(__file__).resolve().parent), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--no-access-log", "--log-level", "warning"]
        server = subprocess.Popen(cmd, env=env)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz")
            warm = [body(b) for b in gen.make(2 * args.concurrency)]
            asyncio.run(closed_loop(port, warm, args.concurrency, expect("accepted", args.batch)))

            def make_store() -> Store:
                return Store(dsn=dsn, schema=schema, conn=connect(dsn))

            def via_intake(s: Store, events: list[dict[str, Any]]) -> None:
                rows, errors = check_rows(events)
                assert not errors and write_batch(s, rows).accepted == len(events)

            def bare(s: Store, events: list[dict[str, Any]]) -> None:
                assert ingest.write_interactions(s, columns(events)).new == len(events)

            n = args.batch * args.batches
            for r in range(args.repeats):
                sent = gen.make(args.batches)
                payloads = [body(b) for b in sent]
                res = asyncio.run(closed_loop(port, payloads, args.concurrency, expect("accepted", args.batch)))
                runs["http"].append(summary(res, n))
                dup_field = "duplicates" if not args.no_event_ids else "accepted"
                res = asyncio.run(closed_loop(port, payloads, args.concurrency, expect(dup_field, args.batch)))
                runs["resend"].append(summary(res, n))
                runs["inproc"].append(
                    summary(in_process(gen.make(args.batches), args.concurrency, make_store, via_intake), n)
                )
                runs["bare"].append(summary(in_process(gen.make(args.batches), args.concurrency, make_store, bare), n))
                line = ", ".join(f"{p} {runs[p][-1]['events_per_s']:,.0f}/s" for p in phases)
                print(f"  round {r + 1}/{args.repeats}: {line}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
        with store.tx() as c:
            row = c.execute("SELECT count(*), count(DISTINCT event_id) FROM interactions").fetchone()
        stored = (int(row[0]), int(row[1])) if row else (0, 0)
        store.conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        store.close()

    fig = {p: {k: median([x[k] for x in runs[p]]) for k in runs[p][0]} for p in phases}
    errors = sum(int(x["errors"]) for p in phases for x in runs[p])
    print()
    print(
        f"{args.batches} batches of {args.batch} events per phase, concurrency {args.concurrency}, "
        f"event ids {'off' if args.no_event_ids else 'on'}; medians of {args.repeats} rounds"
    )
    print(f"{'phase':<8} {'events/s':>10} {'p50 ms/batch':>13} {'p99 ms/batch':>13}")
    for p in phases:
        f = fig[p]
        print(f"{p:<8} {f['events_per_s']:>10,.0f} {f['p50_ms']:>13.1f} {f['p99_ms']:>13.1f}")
    ratio = fig["bare"]["events_per_s"] / fig["http"]["events_per_s"] if fig["http"]["events_per_s"] else float("nan")
    paired = median([b["events_per_s"] / h["events_per_s"] for b, h in zip(runs["bare"], runs["http"], strict=True)])
    print(f"bare / http events/s: {ratio:.2f}x (paired by round: {paired:.2f}x); errors: {errors}")
    print(f"stored rows {stored[0]:,}, distinct event ids {stored[1]:,}")
    result = {
        "bench": "intake",
        "batch": args.batch,
        "batches": args.batches,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "event_ids": not args.no_event_ids,
        "figures": fig,
        "bare_over_http": ratio,
        "bare_over_http_paired": paired,
        "rounds": runs,
        "errors": errors,
        "stored_rows": stored[0],
        "machine": machine(),
        "postgres": settings,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
