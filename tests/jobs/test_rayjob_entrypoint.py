"""The real RayJob entrypoint end to end: the manifest the KubeRay backend builds for a policy whose source is a
Parquet directory, its entrypoint run as a subprocess with the manifest's environment (Ray's submission wrapper
aside: `ray job submit` would run the same command with the same variables on the head pod), against the
embedded PostgreSQL. The data is ingested and a candidate registered; a later run killed mid-ingest leaves
nothing, and its retry ingests the new files alone, each row exactly once."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recupdate_operator.api import PolicySpec, RunKind
from recupdate_operator.backends.base import PolicyRef
from recupdate_operator.backends.kuberay import rayjob_manifest
from recupdate_operator.planner import LaunchRun, run_config, run_name
from recupdate_workloads.data.synthetic import DAY, SyntheticSpec, SyntheticStream
from recupdate_workloads.store.sync import SYNC_LOCK

REPO = Path(__file__).resolve().parents[2]
SPEC = SyntheticSpec(n_interactions=20_000, n_clusters=10, days=360, period_days=90, drift=0.2, seed=5)
SECRETS = {"store-dsn": {}}  # name -> key -> value: what the kubelet would resolve; the DSN is filled in


def _policy(schema: str, root: Path) -> PolicyRef:
    spec = PolicySpec.model_validate(
        {
            "model": {"base": "", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "data": {
                "interactions": str(root / "events"),
                "items": str(root / "catalogue" / "items.parquet"),
                "clusters": str(root / "catalogue" / "clusters.parquet"),
                "columns": {"user": "user_id", "item": "item_id", "ts": "event_time", "weight": "rating"},
                "positiveThreshold": 3.5,
            },
            "store": {"secretRef": {"name": "store-dsn", "key": "dsn"}, "schema": schema},
            "fineTune": {
                "window": "180d",
                "hyperparameters": {"epochs": 1, "learningRate": 0.003, "batchSize": 64, "withEvidence": True},
            },
            "retrieval": {"window": "60d", "topSuccessors": 5, "minSupport": 3, "neighbours": 3},
            "gates": {"minExactMatch": 0.9, "minRecall": 0.015, "maxRegression": 0.05},
            "runtime": {
                "env": [
                    {"name": "RECUPDATE_EXECUTOR", "value": "inline"},
                    {"name": "RECUPDATE_MODEL_SIZE", "value": "tiny"},
                    {"name": "RECUPDATE_STORAGE", "value": str(root / "artifacts")},
                    {"name": "OMP_NUM_THREADS", "value": "1"},
                ]
            },
        }
    )
    return PolicyRef("shop", "ml", "uid-shop", spec, generation=1)


def _command(
    policy: PolicyRef, kind: RunKind, day: int, active: str | None, attempt: int = 0
) -> tuple[list[str], dict[str, str], str]:
    """The head pod's command and environment, from the RayJob manifest."""
    when = datetime.fromtimestamp(SPEC.start + day * DAY, UTC)
    run_id = run_name(policy.name, kind, when, attempt)
    config = run_config(policy.name, policy.namespace, policy.spec, kind, run_id, when, active, uid=policy.uid)
    job = rayjob_manifest(policy, LaunchRun(kind, run_id, run_id, config, 1, when, attempt))["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", f"recupdate_workloads.jobs.{kind.value}"]
    env = {k: str(v) for k, v in yaml.safe_load(job["runtimeEnvYAML"])["env_vars"].items()}
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for var in head.get("env", []):
        ref = var["valueFrom"]["secretKeyRef"]
        env[var["name"]] = SECRETS[ref["name"]][ref["key"]]
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    base["PYTHONPATH"] = f"{REPO}/operator:{REPO}/workloads"
    return [sys.executable, *argv[1:]], base | env, run_id


def _write_events(path: Path, log: Any, idx: np.ndarray | None = None) -> int:
    """Rows of a log (those at `idx`) as the user's Parquet: integer user ids, text item ids, ms timestamps."""
    take = slice(None) if idx is None else idx
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(log.user[take]),
                "item_id": pa.array([f"sku-{i}" for i in log.item[take]]),
                "event_time": pa.array(log.ts[take] * 1000, pa.timestamp("ms")),
                "rating": pa.array(log.weight[take]),
            }
        ),
        path,
        row_group_size=50_000,
    )
    return len(log.user[take])


def _scalar(dsn: str, schema: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(dsn) as conn:
        conn.execute(f"SET search_path TO {schema}, public")
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


@pytest.mark.slow
def test_rayjob_entrypoint_ingests_then_registers_and_survives_a_kill(pg_dsn: str, tmp_path: Path) -> None:
    SECRETS["store-dsn"]["dsn"] = pg_dsn
    schema = f"rayjob_e2e_{os.getpid()}"
    stream = SyntheticStream(SPEC)
    log = stream.generate()
    (tmp_path / "events").mkdir()
    (tmp_path / "catalogue").mkdir()
    names = [c.name for c in stream.catalogue.clusters]
    pq.write_table(
        pa.table(
            {
                "item": [f"sku-{i}" for i in range(len(stream.item_cluster))],
                "cluster": [f"c{c}" for c in stream.item_cluster],
            }
        ),
        tmp_path / "catalogue" / "items.parquet",
    )
    pq.write_table(
        pa.table({"cluster": [f"c{i}" for i in range(len(names))], "name": names,
                  "keywords": [list(c.keywords) for c in stream.catalogue.clusters]}),
        tmp_path / "catalogue" / "clusters.parquet",
    )  # fmt: skip
    policy = _policy(schema, tmp_path)
    day = lambda d: SPEC.start + d * DAY  # noqa: E731
    first = 0
    for i, (a, b) in enumerate(((0, 90), (90, 180), (180, 270))):
        first += _write_events(tmp_path / "events" / f"part-{i}.parquet", log.window(day(a), day(b)))

    # 1. A fine-tune: its sync ingests the three files, then it trains and registers a candidate.
    argv, env, ft_id = _command(policy, RunKind.FINETUNE, 270, None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _scalar(pg_dsn, schema, "SELECT count(*) FROM interactions") == first
    assert _scalar(pg_dsn, schema, "SELECT state FROM releases WHERE run_id = %s", ft_id) == "candidate"
    sync = _scalar(pg_dsn, schema, "SELECT cost -> 'sync' FROM runs WHERE run_id = %s", ft_id)
    assert (sync["new"], sync["files"], sync["clusters"], sync["items"]) == (first, 5, 10, len(stream.item_cluster))

    # 2. New files, and a run (a refresh with that candidate's adapter) killed mid-ingest: SIGKILL once it has
    # claimed a new file in its open sync transaction (the claim is the statement right before the file's rows
    # are read and written). Nothing of it stays; its retry ingests the new files, and only those, once.
    added = _write_events(tmp_path / "events" / "part-3.parquet", log.window(day(270), day(300)))
    big = log.window(day(300), day(330))
    rows = np.random.default_rng(1).integers(0, len(big), 200_000)
    added += _write_events(tmp_path / "events" / "part-4.parquet", big, rows)
    argv, env, _ = _command(policy, RunKind.REFRESH, 330, ft_id)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    claimed = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO ingest_files%%'"
        " AND state IN ('idle in transaction', 'active') AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 300
    while _scalar(pg_dsn, schema, claimed) == 0:
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = {SYNC_LOCK} AND granted"
    while _scalar(pg_dsn, schema, lock):  # PostgreSQL aborts the dead client's transaction
        time.sleep(0.05)
    assert _scalar(pg_dsn, schema, "SELECT count(*) FROM interactions") == first
    assert _scalar(pg_dsn, schema, "SELECT count(*) FROM ingest_files WHERE kind = 'interactions'") == 3
    argv, env, retry = _command(policy, RunKind.REFRESH, 330, ft_id, attempt=1)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sync = _scalar(pg_dsn, schema, "SELECT cost -> 'sync' FROM runs WHERE run_id = %s", retry)
    assert (sync["new"], sync["rows"], sync["files"], sync["duplicate"]) == (added, added, 2, 0)
    assert _scalar(pg_dsn, schema, "SELECT count(*) FROM interactions") == first + added
    files = "SELECT string_agg(run_id, ',' ORDER BY uri) FROM ingest_files WHERE kind = 'interactions'"
    assert _scalar(pg_dsn, schema, files) == ",".join([ft_id] * 3 + [retry] * 2)
    assert _scalar(pg_dsn, schema, "SELECT count(*) FROM releases WHERE run_id = %s", retry) == 1
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
