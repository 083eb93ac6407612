"""Shared helpers of the store benchmarks: an embedded (or external) PostgreSQL, schemas, statistics.

Not a library: imported by the scripts in this folder only (they put this folder on sys.path).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recupdate_workloads.store.db import Store, connect, migrate

PG_SETTINGS = (
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "synchronous_commit",
    "server_version",
)


@contextmanager
def postgres(dsn: str | None = None, keep: bool = False) -> Iterator[str]:
    """A DSN: the given one (external server), else an embedded PostgreSQL in a fresh /tmp dir.

    The embedded server runs as the `pgserver` system user, so its data dir must not sit under a 0700
    dir (pytest's tmp, a home dir): tempfile.mkdtemp under /tmp is fine.
    """
    if dsn:
        yield dsn
        return
    from recupdate_workloads.store.db import embedded_server

    data = Path(tempfile.mkdtemp(prefix="recupdate-bench-pg-"))
    server = embedded_server(data, persistent=False)
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if not keep:
            shutil.rmtree(data, ignore_errors=True)


def fresh_store(dsn: str, schema: str) -> Store:
    """A Store on a freshly (re)created and migrated schema."""
    conn = connect(dsn)
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    migrate(conn, schema)
    return Store(dsn=dsn, schema=schema, conn=conn)


def pg_settings(dsn: str) -> dict[str, str]:
    conn = connect(dsn)
    try:
        return {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in PG_SETTINGS}  # type: ignore[index]
    finally:
        conn.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a sample."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M/s" if x >= 1e6 else f"{x / 1e3:.0f}k/s"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM"


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    """Poll `url` until it answers 200, or raise TimeoutError."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout_s}s")
