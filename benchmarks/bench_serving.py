"""Serving benchmark: the same FastAPI app through Ray Serve's HTTP proxy and under plain uvicorn (the
baseline, measured in the same run): single-context POST /recommend, POST /recommend/batch (``--batch``
contexts each), where a request's time goes, latency during in-place rollouts against steady state, and the
load time and memory of a release's table at given sizes (``--table-pairs``).

Load is closed-loop on loopback: ``--concurrency`` keep-alive connections, each sending its next request when
the previous answer has arrived, ``--requests`` per run (a tenth as many batches), after a warm-up. The client
speaks HTTP/1.1 over raw asyncio streams (tens of microseconds per request, so the client, which shares the 2
cores, takes as little CPU from the servers as possible). Requests are table hits over random pairs, as most
production traffic is. Figures are medians over ``--repeats`` runs. Every response is checked: status 200 and,
during rollouts, that all its clusters come from the table of the release it names (the two demo tables answer
from disjoint sets).

Each ``--variant NAME:KEY=VALUE,...`` runs on a fresh local Ray whose processes get the upper-case keys as
environment (Serve's settings, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1); lower-case keys are application settings
(access_log=0, max_ongoing_requests=N, swap=awaited). Where the time goes: the mean ms per request of Serve's own
latency histograms (proxy, router, replica) and the app's (recupdate_serve_latency_ms), and CPU ms per request of
each process (proxy, replica, controller, ...; "other" is everything else on the machine).

    .venv/bin/python benchmarks/bench_serving.py                       # defaults: 173 clusters, 1 replica
    .venv/bin/python benchmarks/bench_serving.py --variant default: --variant fast:RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    .venv/bin/python benchmarks/bench_serving.py --skip-serve --skip-uvicorn --table-pairs 100000,1000000
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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, fresh_store, median, percentile, postgres, wait_http
from recupdate_workloads.contract.serve import APP_NAME
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


def _request(body: bytes, path: str = "/recommend") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
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
    path: str = "/recommend",
) -> Run:
    """``requests`` requests (or until ``stop`` is set, if given) over ``concurrency`` keep-alive connections,
    spread round-robin over ``ports`` (several: client-side balancing over replicas' direct-ingress ports)."""
    run = Run()
    counter = itertools.count()
    reqs = [_request(p, path) for p in payloads]

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


async def grpc_closed_loop(port: int, bodies: list[bytes], requests: int, concurrency: int, *, batch: bool) -> Run:
    """The same closed loop over Serve's gRPC proxy (serving.grpc_api): ``concurrency`` channels (one HTTP/2
    connection each), bodies already serialized, every answer parsed and checked (status OK, one result per
    context, and a release)."""
    import grpc

    from recupdate_workloads.serving import grpc_api

    run = Run()
    counter = itertools.count()
    out_cls = grpc_api.RecommendBatchResponseMessage if batch else grpc_api.RecommendResponseMessage
    method = f"/{grpc_api.FULL_SERVICE}/{'RecommendBatch' if batch else 'Recommend'}"
    metadata = (("application", APP_NAME),)

    async def worker() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=out_cls.FromString)
            while (i := next(counter)) < requests:
                t0 = time.perf_counter()
                try:
                    out = await call(bodies[i % len(bodies)], metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    run.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                t1 = time.perf_counter()
                if not out.release or (batch and not out.results) or (not batch and not out.clusters):
                    run.errors.append(f"empty answer: {out}")
                    continue
                run.starts.append(t0)
                run.latencies_ms.append((t1 - t0) * 1000)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - t
    return run


def _grpc_bodies(singles: list[bytes], batches: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """The same contexts as serialized gRPC requests."""
    from recupdate_workloads.serving import grpc_api

    def one(doc: dict[str, Any]) -> Any:
        return grpc_api.request_message(doc["recent_clusters"], doc.get("n", 10))

    single = [one(json.loads(b)).SerializeToString() for b in singles]
    batch = [
        grpc_api.RecommendBatchRequestMessage(requests=[one(d) for d in json.loads(b)["requests"]]).SerializeToString()
        for b in batches
    ]
    return single, batch


def measure_grpc(port: int, singles: list[bytes], batches: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """measure_both over gRPC, after CPU per request by process over one run of single requests."""

    def grpc(batch: bool) -> Loop:
        return lambda bodies, n: grpc_closed_loop(port, bodies, n, args.concurrency, batch=batch)

    asyncio.run(grpc(False)(singles, args.warmup))
    cpu0 = _cpu_by_role()
    r = asyncio.run(grpc(False)(singles, args.requests))
    cpu = _cpu_delta(cpu0, _cpu_by_role())
    out: dict[str, Any] = {
        "cpu_ms_per_request": {k: round(v * 1000 / max(1, r.ok), 3) for k, v in cpu.items()},
        "stage_ms": {"client": round(sum(r.latencies_ms) / max(1, r.ok), 3)},
        "runs": measure(grpc(False), singles, args),
    }
    if batches:
        out["batch_runs"] = measure(grpc(True), batches, args, args.batch)
    return out


def _payloads(n_clusters: int, count: int = 512, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    missing = set(MISSING_PAIRS)
    out = []
    while len(out) < count:
        a, b = rng.randrange(n_clusters), rng.randrange(n_clusters)
        if a != b and (a, b) not in missing:
            out.append(json.dumps({"recent_clusters": [rng.randrange(n_clusters), a, b], "n": 5}).encode())
    return out


def _batches(singles: list[bytes], size: int) -> list[bytes]:
    """Batch bodies of ``size`` contexts each, from the single bodies (the same contexts, in order)."""
    items = [json.loads(b) for b in singles]
    out = []
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        if len(chunk) == size:
            out.append(json.dumps({"requests": chunk}).encode())
    return out


#: One closed-loop run: (bodies, requests) -> its Run (an HTTP or a gRPC loop with its target bound in).
Loop = Callable[[list[bytes], int], Coroutine[Any, Any, Run]]


def measure(loop: Loop, bodies: list[bytes], args: argparse.Namespace, contexts: int = 1) -> list[dict[str, float]]:
    """Warm-up, then ``--repeats`` closed-loop runs; ``contexts`` per request (a batch's size) gives contexts/s.
    Batches run a tenth as many requests (at least 200)."""
    requests = args.requests if contexts == 1 else max(200, args.requests // 10)
    asyncio.run(loop(bodies, max(50, args.warmup // max(1, contexts // 8))))
    runs = []
    for _ in range(args.repeats):
        r = asyncio.run(loop(bodies, requests))
        if r.errors:
            print(f"    errors: {len(r.errors)}, first: {r.errors[0]}")
        summary = r.summary()
        summary["contexts_per_s"] = summary["rps"] * contexts
        runs.append(summary)
    return runs


def measure_both(ports: list[int], payloads: list[bytes], batches: list[bytes], args: argparse.Namespace) -> dict:
    def http(path: str) -> Loop:
        return lambda bodies, n: closed_loop(ports, bodies, n, args.concurrency, path=path)

    out: dict[str, Any] = {"runs": measure(http("/recommend"), payloads, args)}
    if batches:
        out["batch_runs"] = measure(http("/recommend/batch"), batches, args, args.batch)
    return out


def med(runs: list[dict[str, float]], key: str) -> float:
    return median([r[key] for r in runs])


def bench_uvicorn(
    dsn: str, uc: dict[str, Any], payloads: list[bytes], batches: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
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
        out = {**probe([port], payloads, args, server_pid=proc.pid), **measure_both([port], payloads, batches, args)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not lose the run over a slow exit
            proc.kill()
            proc.wait(timeout=30)
    return out


_ROLES = (
    ("ProxyActor", "proxy"),
    ("ServeReplica", "replica"),
    ("ServeController", "controller"),
    ("raylet", "raylet"),
    ("gcs_server", "gcs"),
    ("postgres", "postgres"),
)


def _cpu_by_role(server_pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) so far of this machine's processes, by role: Serve's proxy, replica and
    controller, Ray's raylet and GCS, PostgreSQL, this client, a uvicorn server (``server_pid``), the rest."""
    import psutil

    out: dict[str, float] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            t = proc.info["cpu_times"]
            if t is None:
                continue
            text = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
        except (psutil.Error, TypeError):
            continue
        if proc.info["pid"] == me:
            role = "client"
        elif proc.info["pid"] == server_pid:
            role = "uvicorn"
        else:
            role = next((r for key, r in _ROLES if key in text), "other")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b.get(k, 0.0) - a.get(k, 0.0), 3) for k in sorted(set(a) | set(b))}


_STAGES = {
    "proxy": "ray_serve_http_request_latency_ms",
    "router_fulfillment": "ray_serve_request_router_fulfillment_time_ms",
    "replica": "ray_serve_deployment_processing_latency_ms",
    "app": "ray_recupdate_serve_latency_ms",
}


def _histograms() -> dict[str, tuple[float, float]]:
    """(sum, count) of Serve's own latency histograms and the app's, from this node's Prometheus exporter."""
    import urllib.request

    import ray

    port = ray._private.worker._global_node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, tuple[float, float]] = {}
    for stage, name in _STAGES.items():
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(name + "_sum{"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count{"):
                count += float(line.rsplit(" ", 1)[1])
        out[stage] = (total, count)
    return out


def _stage_means(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean ms per request of each stage between two scrapes."""
    out = {}
    for k in a:
        n = b[k][1] - a[k][1]
        out[k] = round((b[k][0] - a[k][0]) / n, 3) if n > 0 else float("nan")
    return out


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


def probe(
    ports: list[int],
    payloads: list[bytes],
    args: argparse.Namespace,
    server_pid: int | None = None,
    stages: bool = False,
) -> dict[str, Any]:
    """Where the time of single requests goes: CPU ms per request by process over one run and, with ``stages``,
    the mean ms per request in Serve's own latency histograms (proxy, router, replica) and the app's."""
    asyncio.run(closed_loop(ports, payloads, args.warmup, args.concurrency))
    if stages:
        time.sleep(2.5)  # past a metrics report interval (1 s here)
        h0 = _histograms()
    cpu0 = _cpu_by_role(server_pid)
    run = asyncio.run(closed_loop(ports, payloads, args.requests, args.concurrency))
    cpu = _cpu_delta(cpu0, _cpu_by_role(server_pid))
    out: dict[str, Any] = {
        "cpu_ms_per_request": {k: round(v * 1000 / max(1, run.ok), 3) for k, v in cpu.items()},
        "stage_ms": {"client": round(sum(run.latencies_ms) / max(1, run.ok), 3)},
    }
    if stages:
        time.sleep(2.5)
        out["stage_ms"].update(_stage_means(h0, _histograms()))
    return out


def _replica_rss_mib() -> list[float]:
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            if "ServeReplica" in " ".join(proc.info["cmdline"] or []):
                out.append(round(proc.info["memory_info"].rss / 2**20, 1))
        except (psutil.Error, TypeError, AttributeError):
            continue
    return out


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
        "outside_n": len(outside),
    }


def bench_serve(
    dsn: str,
    demo: Any,
    payloads: list[bytes],
    batches: list[bytes],
    replicas: int,
    port: int,
    args: argparse.Namespace,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``options``: a variant's application settings (access_log=0|1, max_ongoing_requests=N,
    swap=auto|background|awaited)."""
    from recupdate_workloads.serving import deployment as sv

    opts = options or {}
    swap = opts.get("swap", args.swap)
    app = sv.serve_application(
        demo.releases["rel-a"],
        replicas,
        num_cpus=args.replica_cpus,
        env_vars={"RECUPDATE_STORE_DSN": dsn},
        access_log=opts.get("access_log", "0" if args.no_access_log else "1") == "1",
        background_swap="auto" if swap == "auto" else swap == "background",
        max_ongoing_requests=int(opts.get("max_ongoing_requests", args.max_ongoing_requests)),
    )
    grpc_port = None if args.no_grpc else free_port()
    config = sv.deploy_config([app], port=port, grpc_port=grpc_port)
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
        res: dict[str, Any] = {
            "ports": ports,
            **probe(ports, payloads, args, stages=True),
            **measure_both(ports, payloads, batches, args),
        }
        rss = _replica_rss_mib()
        if rss:
            res["replica_rss_mib"] = rss
        if args.rollouts:
            config, res["rollout"] = rollouts_under_load(ports, demo, payloads, config, args)
        out["paths"][name] = res
    if grpc_port is not None:
        print(f"  grpc [{grpc_port}] ...", flush=True)
        out["paths"]["grpc"] = {"ports": [grpc_port], **measure_grpc(grpc_port, *_grpc_bodies(payloads, batches), args)}
    return out


def _child_load(spec: str) -> None:
    """In a fresh process: load a release as a replica does and report its time and memory, then build the
    index the previous loader built (a dict of (c1, c2) tuples) over the same pairs, as the baseline."""
    import gc

    import psutil

    from recupdate_workloads.contract.serve import UserConfig
    from recupdate_workloads.serving.release import load_release

    cfg = json.loads(spec)
    me = psutil.Process()
    rss0 = me.memory_info().rss
    t0 = time.perf_counter()
    b = load_release(UserConfig.model_validate(cfg["uc"]), {"RECUPDATE_STORE_DSN": cfg["dsn"]})
    load_s = time.perf_counter() - t0
    rss1 = me.memory_info().rss
    keys = b.table_index.packed  # type: ignore[attr-defined]
    c1, c2 = (keys >> 32).tolist(), (keys & 0xFFFFFFFF).tolist()
    gc.collect()
    rss2 = me.memory_info().rss
    t1 = time.perf_counter()
    old = {(a, x): i for i, (a, x) in enumerate(zip(c1, c2, strict=True))}
    dict_s = time.perf_counter() - t1
    rss3 = me.memory_info().rss
    print(
        json.dumps(
            {
                "pairs": len(b.table_index),
                "load_s": round(load_s, 3),
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_loaded_mib": round(rss1 / 2**20, 1),
                "release_mib": round((rss1 - rss0) / 2**20, 1),
                "index_mib": round(keys.nbytes / 2**20, 1),
                "arrays_mib": round((b.table_ids.nbytes + b.table_scores.nbytes) / 2**20, 1),
                "previous_dict_s": round(dict_s, 3),
                "previous_dict_mib": round((rss3 - rss2) / 2**20, 1),
                "dict_entries": len(old),
            }
        )
    )


def bench_table_load(dsn: str, pairs: int, top_n: int) -> dict[str, Any]:
    """A catalogue of n clusters and a published table of about ``pairs`` pairs (n*(n-1)), loaded by a fresh
    child process (_child_load)."""
    import numpy as np

    from recupdate_workloads.contract.serve import user_config
    from recupdate_workloads.serving.demo_store import demo_catalogue
    from recupdate_workloads.store import catalogue as cat
    from recupdate_workloads.store import tables

    n = 2
    while n * (n - 1) < pairs:
        n += 1
    store = fresh_store(dsn, f"bench_serving_load_{pairs}")
    try:
        cat.save_catalogue(store, demo_catalogue(n), np.arange(n, dtype=np.int32), embed=False)
        rng = np.random.default_rng(0)
        a, b = np.meshgrid(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), indexing="ij")
        keep = a != b
        c1, c2 = a[keep], b[keep]
        ids = rng.integers(0, n, size=(len(c1), top_n), dtype=np.int32)
        scores = -np.sort(rng.random((len(c1), top_n), dtype=np.float32), axis=1)
        t0 = time.perf_counter()
        version = tables.publish_table(store, c1, c2, ids, scores, np.zeros(len(c1), np.int8), None, None)
        write_s = time.perf_counter() - t0
        uc = user_config(f"load-{pairs}", None, version, store.schema)
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, __file__, "--child-load", json.dumps({"dsn": dsn, "uc": uc})],
                capture_output=True,
                text=True,
                check=True,
                timeout=900,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return {"clusters": n, "pairs": len(c1), "top_n": top_n, "write_s": round(write_s, 1), "runs": runs}
    finally:
        store.conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')
        store.close()


def _variants(specs: list[str]) -> list[tuple[str, dict[str, str]]]:
    """``name:KEY=VALUE,key=value`` each: upper-case keys are environment variables of the local Ray, lower-case
    ones application settings (bench_serve's ``options``); "default" (nothing changed) when none are given."""
    out = []
    for spec in specs or ["default:"]:
        name, _, rest = spec.partition(":")
        env = {}
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            env[k.strip()] = v.strip()
        out.append((name, env))
    return out


def main() -> None:
    from recupdate_workloads.contract.serve import DEFAULT_MAX_ONGOING_REQUESTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="external PostgreSQL DSN (default: an embedded one)")
    ap.add_argument("--clusters", type=int, default=173, help="clusters in the demo store (table: n*(n-1) pairs)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per measured run")
    ap.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    ap.add_argument("--concurrency", type=int, default=4, help="keep-alive connections in the closed loop")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (figures: medians)")
    ap.add_argument("--replicas", default="1", help="comma-separated replica counts for Ray Serve")
    ap.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica")
    ap.add_argument("--max-ongoing-requests", type=int, default=DEFAULT_MAX_ONGOING_REQUESTS)
    ap.add_argument("--batch", type=int, default=64, help="contexts per /recommend/batch request (0: no batches)")
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
    ap.add_argument("--skip-serve", action="store_true", help="no Ray Serve (e.g. only --table-pairs)")
    ap.add_argument("--no-access-log", action="store_true", help="turn off Serve's per-request access log")
    ap.add_argument("--no-grpc", action="store_true", help="do not also measure Serve's gRPC proxy (serving.grpc_api)")
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
        help="environment for the local Ray (all Serve processes) of every variant",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a Serve configuration to measure, each on a fresh Ray (repeatable; default: Serve's own defaults)",
    )
    ap.add_argument("--table-pairs", default="", help="comma-separated table sizes (pairs) to time loading at")
    ap.add_argument("--table-top", type=int, default=10, help="clusters per table row for --table-pairs")
    ap.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.child_load:
        _child_load(args.child_load)
        return

    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    variants = _variants(args.variant)
    with postgres(args.dsn) as dsn:
        store = fresh_store(dsn, "bench_serving")
        t0 = time.perf_counter()
        demo = build_demo_store(store, n_clusters=args.clusters)
        pairs = args.clusters * (args.clusters - 1) - len(MISSING_PAIRS)
        print(f"store: {args.clusters} clusters, {pairs} pairs per table, built in {time.perf_counter() - t0:.1f}s")
        payloads = _payloads(args.clusters, count=max(512, 8 * args.batch))
        batches = _batches(payloads, args.batch) if args.batch else []

        if not args.skip_uvicorn:
            print(f"uvicorn ({args.uvicorn_workers} worker) ...", flush=True)
            results["uvicorn"] = bench_uvicorn(dsn, demo.releases["rel-a"], payloads, batches, args)

        import ray

        from recupdate_workloads.serving import deployment as sv

        if args.throughput_optimized:
            args.serve_env.append("RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
        common = dict(kv.partition("=")[::2] for kv in args.serve_env)
        common.setdefault("RAY_metrics_report_interval_ms", "1000")  # the stage breakdown reads Serve's metrics
        for name, settings in [] if args.skip_serve else variants:
            env = {k: v for k, v in settings.items() if not k.islower()}  # environment variables are upper case
            options = {k: v for k, v in settings.items() if k.islower()}
            saved = {k: os.environ.get(k) for k in {**common, **env}}
            os.environ.update({**common, **env})  # inherited by the raylet and every Serve process it starts
            ray_dir = tempfile.mkdtemp(prefix="rbs-", dir="/tmp")  # short: Ray's socket paths are length-limited
            sv.ensure_local_ray(num_cpus=2, temp_dir=ray_dir)
            port = free_port()
            try:
                for r in [int(x) for x in args.replicas.split(",") if x.strip()]:
                    print(f"ray serve [{name}] {settings}, {r} replica(s) ...", flush=True)
                    results[f"{name}/serve_{r}"] = {
                        "settings": settings,
                        **bench_serve(dsn, demo, payloads, batches, r, port, args, options),
                    }
            finally:
                sv.shutdown()
                ray.shutdown()
                shutil.rmtree(ray_dir, ignore_errors=True)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        store.close()
        for size in [int(x) for x in args.table_pairs.split(",") if x.strip()]:
            print(f"table load at {size} pairs ...", flush=True)
            results[f"table_load_{size}"] = bench_table_load(dsn, size, args.table_top)

    results["loadavg_end"] = os.getloadavg()
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(f"POST /recommend, closed loop, {args.concurrency} connections, {args.requests} requests x {args.repeats}")
    print(
        f"load average at start {results['loadavg_start'][0]:.1f}, at end {results['loadavg_end'][0]:.1f}"
        f" (on {os.cpu_count()} CPUs; other processes skew the figures)"
    )
    summary: dict[str, Any] = {}
    base = results.get("uvicorn")
    base_rps = med(base["runs"], "rps") if base else float("nan")
    rows: list[tuple[str, dict[str, Any], bool | None]] = [("uvicorn", base, None)] if base else []
    for k, v in results.items():
        if "/serve_" in k:
            for path, res in v["paths"].items():
                rows.append((f"{k} {path}", res, v["background_swap"]))
    print(
        f"{'server':<34}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'vs uv':>7}"
        f"{'batch ctx/s':>12}{'b p99 ms':>9}{'vs uv':>7}"
    )
    for name, res, _ in rows:
        rps = med(res["runs"], "rps")
        b = res.get("batch_runs") or []
        bctx = med(b, "contexts_per_s") if b else float("nan")
        row = {
            "rps": round(rps, 1),
            "p50_ms": round(med(res["runs"], "p50_ms"), 2),
            "p99_ms": round(med(res["runs"], "p99_ms"), 2),
            "vs_uvicorn": round(rps / base_rps, 3),
            "batch_contexts_per_s": round(bctx, 1),
            "batch_p99_ms": round(med(b, "p99_ms"), 2) if b else None,
            "batch_vs_uvicorn_single": round(bctx / base_rps, 3),
        }
        summary[name] = row
        print(
            f"{name:<34}{rps:>8.0f}{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{row['vs_uvicorn']:>7.2f}"
            f"{bctx:>12.0f}{row['batch_p99_ms'] or float('nan'):>9.2f}{row['batch_vs_uvicorn_single']:>7.2f}"
        )
    stages = [(n, r) for n, r, _ in rows if r.get("stage_ms")]
    if stages:
        print("\nwhere a single request's time goes (mean ms: client end to end, Serve's proxy, router, replica, app)")
        print("and CPU ms per request by process")
        for name, res in stages:
            print(f"  {name}: {res['stage_ms']}")
            print(f"  {' ' * len(name)}  cpu {res['cpu_ms_per_request']}")
            summary[name]["stage_ms"] = res["stage_ms"]
            summary[name]["cpu_ms_per_request"] = res["cpu_ms_per_request"]
    if args.rollouts:
        print()
        print(
            f"{'rollouts':<34}{'swap':>6}{'switch s':>9}{'reqs':>7}{'errors':>7}{'p99 during':>11}"
            f"{'p99 steady':>11}{'ratio':>7}{'p99 outside':>12}{'ratio':>7}{'max during':>11}"
        )
        for name, res, bg in rows:
            ro = res.get("rollout")
            if not ro:
                continue
            steady = med(res["runs"], "p99_ms")
            print(
                f"{name:<34}{'bg' if bg else 'await':>6}{median(ro['switch_s']):>9.2f}{ro['during_n']:>7}"
                f"{ro['errors']:>7}{ro['during_p99_ms']:>11.2f}{steady:>11.2f}{ro['during_p99_ms'] / steady:>7.2f}"
                f"{ro['outside_p99_ms']:>12.2f}{ro['during_p99_ms'] / ro['outside_p99_ms']:>7.2f}"
                f"{ro['during_max_ms']:>11.1f}"
            )
            if ro["first_errors"]:
                print("   first errors:", ro["first_errors"])
            summary[name]["rollout"] = {
                "switches": ro["switches"],
                "errors": ro["errors"],
                "during_p99_ms": round(ro["during_p99_ms"], 2),
                "ratio_vs_steady": round(ro["during_p99_ms"] / steady, 2),
                "ratio_vs_outside": round(ro["during_p99_ms"] / ro["outside_p99_ms"], 2),
            }
    loads = {k: v for k, v in results.items() if k.startswith("table_load_")}
    if loads:
        print("\ntable load (fresh process, load_release; medians of 2) and the previous dict index on the same pairs")
        print(
            f"{'pairs':>9}{'load s':>8}{'RSS MiB':>9}{'release MiB':>12}{'index MiB':>10}{'dict s':>8}{'dict MiB':>9}"
        )
        for v in loads.values():
            r = {k: median([x[k] for x in v["runs"]]) for k in v["runs"][0]}
            print(
                f"{v['pairs']:>9}{r['load_s']:>8.2f}{r['rss_loaded_mib']:>9.0f}{r['release_mib']:>12.0f}"
                f"{r['index_mib']:>10.1f}{r['previous_dict_s']:>8.2f}{r['previous_dict_mib']:>9.0f}"
            )
            summary[f"table_load_{v['pairs']}"] = r
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
