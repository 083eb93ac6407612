"""Benchmark of the operator at scale: N policies on the emulated Kubernetes API.

The real operator (`recupdate operator`, its own process) runs against the emulated API server (tests/k8s,
in this process) and an embedded PostgreSQL registry. Measured, for each N:

* create -> first RayJob latency (p50, p99, max): policies are created at --rate per second; the time runs
  from the create call to the RayJob's arrival at the API server;
* the time until all N policies have their RayJob (throughput);
* the operator's RSS (resident memory now and peak, /proc/<pid>/status);
* API requests per policy per idle hour: every policy first gets an active, served release (the stand-in
  workload registers it, this script plays KubeRay), then the operator is restarted (the time to resume all
  N policies is reported) with its clock running --time-scale times faster, and the requests reaching the
  emulator during --idle real seconds are scaled to one idle hour per policy. kopf's watch reconnections are
  counted apart: they are per operator and resource, not per policy, in real time (the emulator sends no
  watch bookmarks, so kopf reconnects every 70 s of silence; a real API server sends one a minute).

    .venv/bin/python benchmarks/bench_operator.py --policies 100,1000
    .venv/bin/python benchmarks/bench_operator.py --policies 100 --rate 50 --idle 120 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(Path(__file__).resolve().parent)]

CRD = REPO / "manifests" / "crd" / "recommenderupdatepolicies.recupdate.io.yaml"
NS = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Recorder:
    """Timestamps of RayJob and RayService arrivals at the emulated API server, by owning policy."""

    def __init__(self) -> None:
        self.jobs: dict[str, float] = {}
        self.services: dict[str, float] = {}
        self.job_names: dict[str, str] = {}

    def install(self) -> None:
        from k8s import emulator

        original = emulator.ApiServer._emit
        recorder = self

        def emit(api: Any, res: Any, event: Any) -> None:
            if event.type == "ADDED" and res.group == "ray.io":
                owners = event.object["metadata"].get("ownerReferences") or []
                if owners:
                    policy = owners[0]["name"]
                    table = recorder.jobs if res.plural == "rayjobs" else recorder.services
                    table.setdefault(policy, time.monotonic())
                    if res.plural == "rayjobs":
                        recorder.job_names.setdefault(policy, event.object["metadata"]["name"])
            original(api, res, event)

        emulator.ApiServer._emit = emit  # type: ignore[method-assign]


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "recupdate.io/v1alpha1",
        "kind": "RecommenderUpdatePolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "store": {"secretRef": {"name": "store", "key": "dsn"}},
            "fineTune": {"schedule": "0 3 1 * *"},
            # Long intervals: nothing falls due during the (fast-forwarded) idle window.
            "retrieval": {"refreshInterval": "7d", "maxStaleness": "14d"},
        },
    }


def register_release(dsn: str, schema: str, run_id: str) -> None:
    """What a workload leaves behind: its schema (the workloads' migrations), run, snapshot and release."""
    import psycopg
    from psycopg import sql

    from recupdate_workloads.store.db import connect, migrate

    with connect(dsn) as conn:
        migrate(conn, schema)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        s = sql.Identifier(schema)
        end = int(time.time())
        conn.execute(
            sql.SQL("INSERT INTO {}.runs (run_id, kind, status) VALUES (%s, 'finetune', 'succeeded')").format(s),
            (run_id,),
        )
        snap = conn.execute(
            sql.SQL(
                "INSERT INTO {}.snapshots (window_start, window_end, scoring, top_r, min_support, state)"
                " VALUES (%s, %s, 'frequency', 1, 5, 'current') RETURNING snapshot_id"
            ).format(s),
            (end - 30 * 86400, end),
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.releases (release_id, base_model, adapter_uri, snapshot_id, table_version, gates,"
                " state, run_id) VALUES (%s, 'b', %s, %s, 1, %s, 'candidate', %s)"
            ).format(s),
            (run_id, f"s3://adapters/{run_id}", snap, json.dumps({"passed": True}), run_id),
        )


async def run_one(n: int, args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    import yaml

    from k8s.emulator import EmulatedCluster

    recorder = Recorder()
    recorder.install()
    result: dict[str, Any] = {"policies": n}
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        async with EmulatedCluster(workdir=Path(tmp) / "k8s") as cluster:
            await cluster.apply(yaml.safe_load(CRD.read_text()))
            await cluster.create(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "store"}, "stringData": {"dsn": dsn}}
            )
            env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path), "PYTHONUNBUFFERED": "1"}
            log = open(Path(tmp) / "operator.log", "w")  # noqa: SIM115
            try:
                # Phase 1: the operator as deployed; policies arrive at --rate per second.
                proc, _ = await start_operator(args, env, log)
                try:
                    result["rss_start_mb"] = round(rss_mb(proc.pid)[0], 1)
                    created: dict[str, float] = {}
                    started = time.monotonic()
                    for i in range(n):
                        name = f"bench-{i:05d}"
                        created[name] = time.monotonic()
                        await cluster.create(policy(name))
                        delay = started + (i + 1) / args.rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    result["create_seconds"] = round(time.monotonic() - started, 1)
                    await until(lambda: len(recorder.jobs) >= n, args.timeout, proc)
                    result["all_jobs_seconds"] = round(max(recorder.jobs.values()) - started, 1)
                    lat = [recorder.jobs[p] - t for p, t in created.items()]
                    result["latency_p50_s"] = round(pct(lat, 50), 3)
                    result["latency_p99_s"] = round(pct(lat, 99), 3)
                    result["latency_max_s"] = round(max(lat), 3)
                    result["latency_mean_s"] = round(statistics.fmean(lat), 3)
                    result["rss_after_launch_mb"] = round(rss_mb(proc.pid)[0], 1)
                    if args.releases:
                        # Each fine-tune registers a passing candidate and succeeds: promoted, then served.
                        t0 = time.monotonic()
                        for name, job in sorted(recorder.job_names.items()):
                            await asyncio.to_thread(register_release, dsn, name.replace("-", "_"), job)
                            await cluster.patch_status(
                                "ray.io/v1",
                                "RayJob",
                                job,
                                {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
                            )
                        await until(lambda: len(recorder.services) >= n, args.timeout, proc)
                        result["promote_all_seconds"] = round(time.monotonic() - t0, 1)
                    await asyncio.sleep(args.settle)
                    now, peak = rss_mb(proc.pid)
                    result["rss_steady_mb"], result["rss_peak_mb"] = round(now, 1), round(peak, 1)
                finally:
                    stop(proc)

                # Phase 2: a restarted operator whose clock runs --time-scale times faster: it resumes every
                # policy, then idles; requests during the window are scaled to one idle hour.
                t0 = time.monotonic()
                proc, metrics_port = await start_operator(args, env, log, time_scale=args.time_scale)
                try:
                    await until(lambda: reconciles(metrics_port) >= n, args.timeout, proc)
                    result["restart_resume_all_seconds"] = round(time.monotonic() - t0, 1)
                    await asyncio.sleep(args.settle)
                    before = len(cluster.api._requests)
                    t_idle = time.monotonic()
                    await asyncio.sleep(args.idle)
                    idle = time.monotonic() - t_idle
                    window = cluster.api._requests[before:]
                    watches = [r for r in window if "watch=true" in str(r.url)]
                    other = [r for r in window if "watch=true" not in str(r.url)]
                    simulated_hours = idle * args.time_scale / 3600
                    result["idle_simulated_hours"] = round(simulated_hours, 2)
                    result["idle_requests_per_policy_hour"] = round(len(other) / simulated_hours / n, 3)
                    kinds: dict[str, int] = {}
                    for r in other:
                        path = str(r.url).split("?")[0].split("/namespaces/")[-1].split("/")
                        what = f"{str(r.method).split('.')[-1]} {path[1] if len(path) > 1 else path[0]}"
                        what += "/" + path[3] if len(path) > 3 else ""
                        kinds[what] = kinds.get(what, 0) + 1
                    result["idle_requests_by_kind"] = kinds
                    # kopf's watch reconnects are per operator and resource, and in real time (not scaled).
                    result["watch_reconnects_per_real_hour"] = round(len(watches) * 3600 / idle, 1)
                    result["rss_restarted_mb"] = round(rss_mb(proc.pid)[0], 1)
                finally:
                    stop(proc)
            finally:
                log.close()
                if args.keep_log:
                    Path(args.keep_log).write_text((Path(tmp) / "operator.log").read_text())
    return result


async def start_operator(
    args: argparse.Namespace, env: dict[str, str], log: Any, time_scale: float = 1.0
) -> tuple[subprocess.Popen[bytes], int]:
    health, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "recupdate_operator.cli",
        "operator",
        "--namespace",
        NS,
        "--standalone",
        "--metrics-port",
        str(metrics_port),
        "--metrics-address",
        "127.0.0.1",
        "--liveness",
        f"http://127.0.0.1:{health}/healthz",
        "--workers",
        str(args.workers),
        "--resync",
        str(args.resync),
        "--time-scale",
        str(time_scale),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    await wait_healthy(health, proc)
    return proc, metrics_port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def reconciles(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("recupdate_reconciles_total "):
            return float(line.split()[1])
    return 0.0


async def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", None, 2)
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError("the operator did not become healthy")


async def until(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        await asyncio.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--policies", default="100,1000", help="comma-separated policy counts (100,1000)")
    p.add_argument("--rate", type=float, default=25.0, help="policies created per second (25)")
    p.add_argument("--workers", type=int, default=8, help="the operator's --workers (8)")
    p.add_argument("--idle", type=float, default=120.0, help="real seconds of idle to count API requests over (120)")
    p.add_argument("--resync", type=float, default=900.0, help="the operator's --resync (its default, 900)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=60.0,
        help="clock speed-up of the restarted operator for the idle count (60: an hour a minute)",
    )
    p.add_argument("--settle", type=float, default=10.0, help="seconds to let things settle before idle (10)")
    p.add_argument(
        "--no-releases",
        dest="releases",
        action="store_false",
        help="skip promoting a release for every policy before the idle count",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds (600)")
    p.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: an embedded server)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--keep-log", default=None, help="copy the operator's log here")
    args = p.parse_args()

    from _common import postgres

    results = []
    with postgres(args.dsn) as dsn:
        for n in [int(x) for x in args.policies.split(",") if x]:
            drop_schemas(dsn, n)
            print(f"--- {n} policies (rate {args.rate}/s, {args.workers} workers) ---", flush=True)
            r = asyncio.run(run_one(n, args, dsn))
            r["load_average"] = [round(x, 2) for x in os.getloadavg()]
            r["cpus"] = os.cpu_count()
            results.append(r)
            for key, value in r.items():
                print(f"  {key}: {value}", flush=True)
            if args.releases:
                drop_schemas(dsn, n)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def drop_schemas(dsn: str, n: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(n):
            conn.execute(f'DROP SCHEMA IF EXISTS "bench_{i:05d}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
