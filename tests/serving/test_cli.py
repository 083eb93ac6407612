"""`recupdate serve`: the promotion follower, and the command end to end (a local Ray Serve in a subprocess that
follows an activation in the store)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from fixtures.net import free_port
from recupdate_workloads.serving.cli import follow_promotions, release_user_config
from recupdate_workloads.serving.demo_store import build_demo_store
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store, connect, migrate


def test_follow_promotions_rolls_each_new_active_release_once() -> None:
    seq: list[Any] = [
        None,
        SimpleNamespace(release_id="a"),
        SimpleNamespace(release_id="a"),
        RuntimeError("store down"),
        SimpleNamespace(release_id="b"),
        SimpleNamespace(release_id="c"),  # its rollout fails: retried on the next poll
        SimpleNamespace(release_id="c"),
    ]
    polls = iter(seq)
    rolled: list[str] = []
    logs: list[str] = []
    fail_once = {"c"}

    def active() -> Any:
        x = next(polls)
        if isinstance(x, Exception):
            raise x
        return x

    def roll(rel: Any) -> None:
        if rel.release_id in fail_once:
            fail_once.discard(rel.release_id)
            raise TimeoutError("slow")
        rolled.append(rel.release_id)

    n = {"polls": 0}

    def should_stop() -> bool:
        n["polls"] += 1
        return n["polls"] > len(seq)

    last = follow_promotions(
        active, roll, "a", poll_s=0, should_stop=should_stop, sleep=lambda s: None, log=logs.append
    )
    assert rolled == ["b", "c"] and last == "c"
    assert any("store down" in m for m in logs) and any("rollout to c failed" in m for m in logs)


def test_user_config_of_a_release() -> None:
    rel = reg.Release("r1", "base", "/a", 3, 7, None)
    assert release_user_config(rel, "s", online_timeout_ms=50) == {
        "release_id": "r1",
        "adapter_uri": "/a",
        "table_version": 7,
        "store_schema": "s",
        "online_timeout_ms": 50,
    }
    with pytest.raises(ValueError):
        release_user_config(reg.Release("r2", "base", None, None, None, None), "s")


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return None


@pytest.fixture
def cli_store(pg_dsn: str) -> Iterator[Store]:
    schema = f"serving_cli_{os.getpid()}"
    conn = connect(pg_dsn)
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    migrate(conn, schema)
    store = Store(dsn=pg_dsn, schema=schema, conn=conn)
    build_demo_store(store)
    yield store
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    store.close()


@pytest.mark.slow
@pytest.mark.ray
def test_recupdate_serve_follows_promotions(cli_store: Store, pg_dsn: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")
    cmd = [
        sys.executable,
        "-m",
        "recupdate_operator.cli",
        "serve",
        "--schema",
        cli_store.schema,
        "--port",
        str(port),
        "--poll",
        "0.5",
        "--ray-temp-dir",
        ray_dir,
        "--duration",
        "240",
    ]
    env = {**os.environ, "RECUPDATE_STORE_DSN": pg_dsn}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            info = _get(f"{url}/release")
            if info and info.get("release_id"):
                break
            time.sleep(1)
        assert info and info["release_id"] == "rel-a", info
        reg.activate(cli_store, "rel-b")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = _get(f"{url}/release")
            if info and info["release_id"] == "rel-b":
                break
            time.sleep(0.5)
        assert info and info["release_id"] == "rel-b" and not info["last_reconfigure_failed"], info
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 0, out[-3000:]
    assert "serving release rel-a" in out and "rolled to release rel-b" in out, out[-3000:]
