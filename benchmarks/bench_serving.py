"""Serving benchmark: POST /recommend through Ray Serve's HTTP proxy against the same FastAPI app under plain
uvicorn, with 1 and 2 replicas, and latency during in-place rollouts against steady state.

Load is closed-loop on loopback: ``--concurrency`` keep-alive connections, each sending its next request when
the previous answer has arrived, ``--requests`` per run, after a warm-up. The client speaks HTTP/1.1 over raw
asyncio streams (tens of microseconds per request, so the client, which shares the 2 cores, takes as little CPU
from the servers as possible). Requests are table hits over random pairs, as most production traffic is.
Figures are medians over ``--repeats`` runs. Every response is checked: status 200 and, during rollouts, that all
its clusters come from the table of the release it names (the two demo tables answer from disjoint sets).

    .venv/bin/python benchmarks/bench_serving.py                       # defaults: 173 clusters, 1 and 2 replicas
    .venv/bin/python benchmarks/bench_serving.py --replicas 1 --repeats 5 --out out/bench_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, fresh_store, median, percentile, postgres, wait_http
from recupdate_workloads.serving.demo_store import MISSING_PAIRS, build_demo_store


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, float]:
        return {
            "rps": self.ok / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(self.latencies_ms, 50),
            "p99_ms": percentile(self.latencies_ms, 99),
            "errors": float(len(self.errors)),
        }


def _request(body: bytes) -> bytes:
    return (
        b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length, chunked = None, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        return status, b"".join(parts)
    return status, await reader.readexactly(length or 0)


async def closed_loop(
    ports: list[int],
    payloads: list[bytes],
    requests: int,
    concurrency: int,
    *,
    sets: dict[str, frozenset[int]] | None = None,
    stop: threading.Event | None = None,
) -> Run:
    """``requests`` requests (or until ``stop`` is set, if given) over ``concurrency`` keep-alive connections,
    spread round-robin over ``ports`` (several: client-side balancing over replicas' direct-ingress ports)."""
    run = Run()
    counter = itertools.count()
    reqs = [_request(p) for p in payloads]

    async def worker(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                i = next(counter)
                if (stop is None and i >= requests) or (stop is not None and (stop.is_set() or i >= requests)):
                    return
                t0 = time.perf_counter()
                try:
                    writer.write(reqs[i % len(reqs)])
                    status, body = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    run.errors.append(f"{type(exc).__name__}: {exc}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                t1 = time.perf_counter()
                if status != 200:
                    run.errors.append(f"{status}: {body[:200]!r}")
                    continue
                if sets is not None:
                    out = json.loads(body)
                    rel = out["release"]
                    run.labels[rel] = run.labels.get(rel, 0) + 1
                    if not {e["id"] for e in out["clusters"]} <= sets[rel]:
                        run.errors.append(f"mixed answer: {out}")
                        continue
                run.starts.append(t0)
                run.latencies_ms.append((t1 - t0) * 1000)
        finally:
            writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker(ports[i % len(ports)]) for i in range(concurrency)))
    run.seconds = time.perf_counter() - t
    return run


def _payloads(n_clusters: int, count: int = 512, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    missing = set(MISSING_PAIRS)
    out = []
    while len(out) < count:
        a, b = rng.randrange(n_clusters), rng.randrange(n_clusters)
        if a != b and (a, b) not in missing:
            out.append(json.dumps({"recent_clusters": [rng.randrange(n_clusters), a, b], "n": 5}).encode())
    return out


def measure(ports: list[int], payloads: list[bytes], args: argparse.Namespace) -> list[dict[str, float]]:
    asyncio.run(closed_loop(ports, payloads, args.warmup, args.concurrency))
    runs = []
    for _ in range(args.repeats):
        r = asyncio.run(closed_loop(ports, payloads, args.requests, args.concurrency))
        if r.errors:
            print(f"    errors: {len(r.errors)}, first: {r.errors[0]}")
        runs.append(r.summary())
    return runs


def med(runs: list[dict[str, float]], key: str) -> float:
    return median([r[key] for r in runs])


def bench_uvicorn(dsn: str, uc: dict[str, Any], payloads: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "RECUPDATE_STORE_DSN": dsn, "RECUPDATE_SERVE_USER_CONFIG": json.dumps(uc)}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "recupdate_workloads.serving.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--workers",
        str(args.uvicorn_workers),
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        runs = measure([port], payloads, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"runs": runs}


def direct_ingress_ports(app_name: str) -> list[int]:
    """The replicas' own HTTP ports when Serve's direct ingress is on (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), else []."""
    import ray

    from recupdate_workloads.serving import deployment as sv

    groups = ray.get(sv._client()._controller.get_target_groups.remote(app_name))
    proxy_port = sv._client().http_config.port
    ports = sorted(
        {t.port for g in groups if str(g.protocol).endswith("HTTP") for t in g.targets if t.port != proxy_port}
    )
    return ports


def rollouts_under_load(
    ports: list[int], demo: Any, payloads: list[bytes], config: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alternate releases while a closed loop runs; requests are classified by their start time."""
    from recupdate_workloads.serving import deployment as sv

    windows: list[tuple[float, float]] = []
    stop = threading.Event()
    result: dict[str, Run] = {}

    def load() -> None:
        result["run"] = asyncio.run(closed_loop(ports, payloads, 10**9, args.concurrency, sets=demo.sets, stop=stop))

    th = threading.Thread(target=load)
    th.start()
    time.sleep(1.0)
    target = "rel-a"
    for _ in range(args.rollouts):
        target = "rel-b" if target == "rel-a" else "rel-a"
        t0 = time.perf_counter()
        config = sv.roll(demo.releases[target], config=config)
        windows.append((t0, time.perf_counter()))
        time.sleep(args.rollout_gap)
    stop.set()
    th.join()
    config = sv.roll(demo.releases["rel-a"], config=config)
    run = result["run"]
    inside = [any(a <= s <= b for a, b in windows) for s in run.starts]
    during = [lat for lat, w in zip(run.latencies_ms, inside, strict=True) if w]
    outside = [lat for lat, w in zip(run.latencies_ms, inside, strict=True) if not w]
    return config, {
        "switches": len(windows),
        "switch_s": [b - a for a, b in windows],
        "requests": run.ok,
        "errors": len(run.errors),
        "first_errors": run.errors[:3],
        "labels": run.labels,
        "during_n": len(during),
        "during_p50_ms": percentile(during, 50),
        "during_p99_ms": percentile(during, 99),
        "during_max_ms": max(during) if during else float("nan"),
        "outside_p99_ms": percentile(outside, 99),
    }


def bench_serve(
    dsn: str, demo: Any, payloads: list[bytes], replicas: int, port: int, args: argparse.Namespace
) -> dict[str, Any]:
    from recupdate_workloads.serving import deployment as sv

    app = sv.serve_application(
        demo.releases["rel-a"],
        replicas,
        num_cpus=args.replica_cpus,
        env_vars={"RECUPDATE_STORE_DSN": dsn},
        access_log=not args.no_access_log,
        background_swap=None if args.swap == "auto" else args.swap == "background",
    )
    config = sv.deploy_config([app], port=port)
    t0 = time.perf_counter()
    sv.deploy(config, timeout_s=300)
    out: dict[str, Any] = {
        "background_swap": (sv.user_config_of(config) or {}).get("background_swap"),
        "deploy_s": time.perf_counter() - t0,
        "paths": {},
    }
    wait_http(f"http://127.0.0.1:{port}/healthz")
    paths = {"proxy": [port]}
    direct = direct_ingress_ports(sv.APP_NAME)
    if direct:
        paths["direct"] = direct
    for name, ports in paths.items():
        print(f"  {name} {ports} ...", flush=True)
        res: dict[str, Any] = {"ports": ports, "runs": measure(ports, payloads, args)}
        if args.rollouts:
            config, res["rollout"] = rollouts_under_load(ports, demo, payloads, config, args)
        out["paths"][name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="external PostgreSQL DSN (default: an embedded one)")
    ap.add_argument("--clusters", type=int, default=173, help="clusters in the demo store (table: n*(n-1) pairs)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per measured run")
    ap.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    ap.add_argument("--concurrency", type=int, default=4, help="keep-alive connections in the closed loop")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (figures: medians)")
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts for Ray Serve")
    ap.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica")
    ap.add_argument("--uvicorn-workers", type=int, default=1, help="worker processes of the uvicorn baseline")
    ap.add_argument("--rollouts", type=int, default=5, help="release switches under load per replica count")
    ap.add_argument("--rollout-gap", type=float, default=1.0, help="seconds of steady load between switches")
    ap.add_argument(
        "--swap",
        default="auto",
        choices=["auto", "background", "awaited"],
        help="how replicas swap releases (auto: background for one replica, awaited for several)",
    )
    ap.add_argument("--skip-uvicorn", action="store_true", help="no uvicorn baseline")
    ap.add_argument("--no-access-log", action="store_true", help="turn off Serve's per-request access log")
    ap.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1: also measures Serve's direct ingress (the replicas' own HTTP ports)",
    )
    ap.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the local Ray (all Serve processes), e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    )
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with postgres(args.dsn) as dsn:
        store = fresh_store(dsn, "bench_serving")
        t0 = time.perf_counter()
        demo = build_demo_store(store, n_clusters=args.clusters)
        pairs = args.clusters * (args.clusters - 1) - len(MISSING_PAIRS)
        print(f"store: {args.clusters} clusters, {pairs} pairs per table, built in {time.perf_counter() - t0:.1f}s")
        payloads = _payloads(args.clusters)

        if not args.skip_uvicorn:
            print(f"uvicorn ({args.uvicorn_workers} worker) ...", flush=True)
            results["uvicorn"] = bench_uvicorn(dsn, demo.releases["rel-a"], payloads, args)

        import ray

        from recupdate_workloads.serving import deployment as sv

        if args.throughput_optimized:
            args.serve_env.append("RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
        for kv in args.serve_env:
            k, _, v = kv.partition("=")
            os.environ[k] = v  # inherited by the raylet and every Serve process it starts
        ray_dir = tempfile.mkdtemp(prefix="rbs-", dir="/tmp")  # short: Ray's socket paths are length-limited
        sv.ensure_local_ray(num_cpus=2, temp_dir=ray_dir)
        port = free_port()
        try:
            for r in [int(x) for x in args.replicas.split(",") if x.strip()]:
                print(f"ray serve, {r} replica(s) ...", flush=True)
                results[f"serve_{r}"] = bench_serve(dsn, demo, payloads, r, port, args)
        finally:
            sv.shutdown()
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
        store.close()

    results["loadavg_end"] = os.getloadavg()
    print()
    print(f"POST /recommend, closed loop, {args.concurrency} connections, {args.requests} requests x {args.repeats}")
    print(
        f"load average at start {results['loadavg_start'][0]:.1f}, at end {results['loadavg_end'][0]:.1f}"
        f" (on {os.cpu_count()} CPUs; other processes skew the figures)"
    )
    print(f"{'server':<30}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs uvicorn':>12}")
    base = results.get("uvicorn")
    base_rps = med(base["runs"], "rps") if base else float("nan")
    rows: list[tuple[str, dict[str, Any], bool | None]] = [("uvicorn", base, None)] if base else []
    for k, v in results.items():
        if k.startswith("serve_"):
            for path, res in v["paths"].items():
                rows.append((f"ray serve x{k.split('_')[1]} {path}", res, v["background_swap"]))
    for name, res, _ in rows:
        rps = med(res["runs"], "rps")
        print(
            f"{name:<30}{rps:>9.0f}{med(res['runs'], 'p50_ms'):>9.2f}{med(res['runs'], 'p99_ms'):>9.2f}"
            f"{rps / base_rps:>12.2f}"
        )
    if args.rollouts:
        print()
        print(
            f"{'rollouts':<30}{'swap':>9}{'switch s':>9}{'reqs':>7}{'errors':>7}{'p99 during':>11}"
            f"{'p99 steady':>11}{'ratio':>7}{'max during':>11}"
        )
        for name, res, bg in rows:
            ro = res.get("rollout")
            if not ro:
                continue
            steady = med(res["runs"], "p99_ms")
            print(
                f"{name:<30}{'bg' if bg else 'awaited':>9}{median(ro['switch_s']):>9.2f}{ro['during_n']:>7}"
                f"{ro['errors']:>7}{ro['during_p99_ms']:>11.2f}{steady:>11.2f}{ro['during_p99_ms'] / steady:>7.2f}"
                f"{ro['during_max_ms']:>11.1f}"
            )
            if ro["first_errors"]:
                print("   first errors:", ro["first_errors"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
