"""`recupdate serve`: serve the active release of a local store with a local Ray Serve, and follow promotions.

The store is the embedded PostgreSQL under ``--store-dir`` (or ``RECUPDATE_STORE_DSN`` / ``--dsn``). The active
release is deployed through Serve's declarative deploy path; every few seconds the registry is polled, and when
another release becomes active the application is rolled to it in place (``reconfigure()`` on the live
replicas, no request dropped). Heavy imports (Ray, the store) happen inside ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg import sql

from recupdate_workloads.contract.env import DSN_ENV
from recupdate_workloads.contract.serve import deploy_config, serve_application, user_config
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store, connect, migrate, resolve_dsn


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-dir", default=".recupdate", help="local store dir (embedded PostgreSQL in STORE_DIR/pg)")
    p.add_argument("--dsn", default=None, help="store DSN (default: $RECUPDATE_STORE_DSN, else the embedded store)")
    p.add_argument("--schema", default=None, help="the policy's schema (default: the only one with an active release)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the gRPC API (recupdate.v1.Recommender, docs/serving.md) through Serve's gRPC proxy here",
    )
    p.add_argument("--replicas", type=int, default=1, help="replicas of the recommender")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument(
        "--ray-temp-dir",
        default=None,
        help="a private (0700) directory for Ray's files, in DIR/ray (keep it short: socket paths)",
    )
    p.add_argument("--poll", type=float, default=5.0, help="seconds between registry polls")
    p.add_argument("--online-timeout-ms", type=float, default=None, help="time limit of online generation")
    p.add_argument("--no-access-log", action="store_true", help="no per-request access log lines from Serve")
    p.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray 2.60, experimental): replicas also serve HTTP on their own"
        " ports (30000+), several times faster than through the proxy on small machines",
    )
    p.add_argument("--demo", action="store_true", help="first fill an empty schema with a small demo store")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: never)")


def release_user_config(release: Any, schema: str, **extra: Any) -> dict[str, Any]:
    """The Serve user_config of a registry release."""

    if release.table_version is None:
        raise ValueError(f"release {release.release_id} has no transition table")
    return user_config(release.release_id, release.adapter_uri, release.table_version, schema, **extra)


def discover_schema(conn: Any) -> str:
    """The only schema of the store holding an active release."""

    rows = conn.execute(
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'releases' ORDER BY 1"
    ).fetchall()
    active = []
    for (schema,) in rows:
        q = sql.SQL("SELECT 1 FROM {}.releases WHERE state = 'active'").format(sql.Identifier(schema))
        if conn.execute(q).fetchone():
            active.append(schema)
    if len(active) != 1:
        found = ", ".join(active) or "none"
        raise SystemExit(f"pass --schema: schemas with an active release: {found}")
    return str(active[0])


def follow_promotions(
    active: Callable[[], Any],
    roll: Callable[[Any], None],
    current: str | None,
    *,
    poll_s: float,
    should_stop: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> str | None:
    """Poll ``active()`` (the registry's active release, or None) and ``roll`` to each new one until
    ``should_stop()``; registry errors are logged and retried on the next poll. Returns the last release."""
    while not should_stop():
        sleep(poll_s)
        try:
            rel = active()
        except Exception as exc:  # a store blip: keep serving, try again
            log(f"registry poll failed: {type(exc).__name__}: {exc}")
            continue
        if rel is None or rel.release_id == current:
            continue
        try:
            roll(rel)
        except Exception as exc:
            log(f"rollout to {rel.release_id} failed: {type(exc).__name__}: {exc}")
            continue
        current = rel.release_id
    return current


def _release_info(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/release", timeout=10) as r:
        return dict(json.loads(r.read()))


def run(args: argparse.Namespace) -> int:
    from recupdate_workloads.contract.secret_file import file_env, remove, write_private
    from recupdate_workloads.serving import deployment as sv

    dsn, _server = resolve_dsn(args.dsn, Path(args.store_dir) / "pg")
    conn = connect(dsn)
    if args.demo:
        from recupdate_workloads.serving.demo_store import build_demo_store

        schema = args.schema or "demo"
        migrate(conn, schema)
        store = Store(dsn=dsn, schema=schema, conn=conn)
        if reg.active_release(store) is None:
            print(f"building a demo store in schema {schema} ...", flush=True)
            build_demo_store(store, model_dir=Path(args.store_dir) / "demo-model")
    else:
        schema = args.schema or discover_schema(conn)
        store = Store(dsn=dsn, schema=schema, conn=conn)
    extra = {} if args.online_timeout_ms is None else {"online_timeout_ms": args.online_timeout_ms}

    stop = {"now": False}
    deadline = None if args.duration is None else time.monotonic() + args.duration

    def _stop(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def should_stop() -> bool:
        return stop["now"] or (deadline is not None and time.monotonic() > deadline)

    rel = reg.active_release(store)
    while rel is None and not should_stop():
        print(f"no active release in schema {schema} yet; waiting ...", flush=True)
        time.sleep(args.poll)
        rel = reg.active_release(store)
    if rel is None:
        return 1

    base_url = f"http://{args.host}:{args.port}"
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by every Serve process the local Ray starts
    started = sv.ensure_local_ray(num_cpus=args.num_cpus, temp_dir=args.ray_temp_dir, log_to_driver=True)
    # Replicas read the DSN from a private file: Ray logs a deployment's runtime_env, env_vars included.
    dsn_file = write_private(Path(args.store_dir).absolute() / "secrets" / f"serve-dsn-{os.getpid()}", dsn)
    app = serve_application(
        release_user_config(rel, schema, **extra),
        args.replicas,
        num_cpus=args.replica_cpus,
        env_vars={file_env(DSN_ENV): str(dsn_file)},
        access_log=not args.no_access_log,
    )
    config = deploy_config([app], host=args.host, port=args.port, grpc_port=args.grpc_port)
    try:
        sv.deploy(config, timeout_s=300)
        print(f"serving release {rel.release_id} of schema {schema} at {base_url}", flush=True)
        print("  POST /recommend  GET /release  GET /healthz", flush=True)
        if args.grpc_port is not None:
            print(f"  gRPC recupdate.v1.Recommender at {args.host}:{args.grpc_port}", flush=True)

        def roll(new: Any) -> None:
            nonlocal config
            t0 = time.perf_counter()
            config = sv.roll(release_user_config(new, schema, **extra), config=config)
            info = _release_info(base_url)
            if info.get("last_reconfigure_failed"):
                print(
                    f"release {new.release_id} failed to load; still serving {info.get('release_id')}:"
                    f" {info.get('last_reconfigure_error')}",
                    flush=True,
                )
            else:
                print(f"rolled to release {new.release_id} in {time.perf_counter() - t0:.2f}s", flush=True)

        def active() -> Any:
            nonlocal store
            if store.conn.closed or store.conn.broken:  # reconnect after a store restart
                store = Store(dsn=dsn, schema=schema, conn=connect(dsn))
            return reg.active_release(store)

        follow_promotions(
            active,
            roll,
            rel.release_id,
            poll_s=args.poll,
            should_stop=should_stop,
            sleep=lambda s: _sleep_until(s, should_stop),
        )
    finally:
        print("shutting down", flush=True)
        try:
            sv.shutdown()
        finally:
            if started:
                sv.shutdown_local_ray()  # and its session directory
            remove(dsn_file)
            store.close()  # an embedded server started here is persistent: it stays up for the next command
    return 0


def _sleep_until(seconds: float, should_stop: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < end:
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="recupdate serve")
    configure(p)
    sys.exit(run(p.parse_args()))
