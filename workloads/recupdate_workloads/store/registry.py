"""The registry of runs and releases (docs/architecture.md). Jobs register; only the controller activates.

Activation is one transaction: the partial unique index on state = 'active' guarantees at most one active
release even if two controllers race, and a failure leaves the previous release active.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recupdate_workloads.contract import registry as contract_registry
from recupdate_workloads.contract.redact import redact
from recupdate_workloads.store.db import Store

RELEASE_STATES = ("candidate", "active", "rejected", "retired")
MAX_ERROR = 2000  # characters of runs.error


@dataclass
class Release:
    release_id: str
    base_model: str
    adapter_uri: str | None
    snapshot_id: int | None
    table_version: int | None
    prompt_hash: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    state: str = "candidate"
    created_at: datetime | None = None
    activated_at: datetime | None = None
    run_id: str | None = None


@dataclass
class Run:
    run_id: str
    kind: str
    status: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


_REL_COLS = (
    "release_id, base_model, adapter_uri, snapshot_id, table_version, prompt_hash, metrics, gates, state,"
    " created_at, activated_at, run_id"
)
_RUN_COLS = "run_id, kind, status, started_at, finished_at, cost, error"


def start_run(store: Store, run_id: str, kind: str) -> None:
    """Mark a run as running. A retried job (same run id) starts over: its earlier outcome is replaced."""
    with store.tx() as c:
        c.execute(
            "INSERT INTO runs (run_id, kind, status) VALUES (%s, %s, 'running')"
            " ON CONFLICT (run_id) DO UPDATE SET status = 'running', started_at = now(), finished_at = NULL,"
            " error = NULL",
            (run_id, kind),
        )


def finish_run(
    store: Store, run_id: str, status: str, cost: dict[str, Any] | None = None, error: str | None = None
) -> None:
    """Record a run's outcome. ``error`` is redacted (a store error may quote the DSN) before it is cut to
    MAX_ERROR characters (cut first, half a password would no longer be recognised)."""
    if status not in ("succeeded", "failed"):
        raise ValueError("status must be succeeded or failed")
    if error is not None:
        error = redact(error)[:MAX_ERROR]
    with store.tx() as c:
        c.execute(
            "UPDATE runs SET status = %s, finished_at = now(), cost = %s, error = %s WHERE run_id = %s",
            (status, json.dumps(cost or {}), error, run_id),
        )


def record_cost(store: Store, run_id: str, cost: dict[str, Any]) -> None:
    """Merge keys into a running run's cost (e.g. its sync, recorded before the rest of the run)."""
    with store.tx() as c:
        c.execute("UPDATE runs SET cost = cost || %s::jsonb WHERE run_id = %s", (json.dumps(cost), run_id))


def register_release(store: Store, release: Release) -> str:
    """Register a candidate (or, when its gates failed, a rejected) release. Never active."""
    if release.state not in ("candidate", "rejected"):
        raise ValueError("jobs register candidates or rejected releases only; the controller activates")
    with store.tx() as c:
        c.execute(
            "INSERT INTO releases (release_id, base_model, adapter_uri, snapshot_id, table_version, prompt_hash,"
            " metrics, gates, state, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (release_id) DO UPDATE SET metrics = EXCLUDED.metrics, gates = EXCLUDED.gates,"
            " state = EXCLUDED.state, table_version = EXCLUDED.table_version",
            (
                release.release_id,
                release.base_model,
                release.adapter_uri,
                release.snapshot_id,
                release.table_version,
                release.prompt_hash,
                json.dumps(release.metrics),
                json.dumps(release.gates),
                release.state,
                release.run_id,
            ),
        )
    return release.release_id


def reject(store: Store, release_id: str, reasons: list[str]) -> None:
    with store.tx() as c:
        c.execute(
            "UPDATE releases SET state = 'rejected', gates = gates || jsonb_build_object('reasons', %s::jsonb)"
            " WHERE release_id = %s AND state = 'candidate'",
            (json.dumps(reasons), release_id),
        )


def activate(store: Store, release_id: str) -> Release:
    """Make a release active and retire the previous one, atomically. Rejected releases cannot be activated."""
    try:
        with store.tx() as c:
            contract_registry.activate(c, store.schema, release_id)
    except contract_registry.ActivationRefused as exc:
        raise (LookupError(str(exc)) if exc.missing else ValueError(str(exc))) from None
    rel = get_release(store, release_id)
    assert rel is not None
    return rel


def _release(row: tuple) -> Release:
    return Release(*row)


def get_release(store: Store, release_id: str) -> Release | None:
    with store.tx() as c:
        row = c.execute(f"SELECT {_REL_COLS} FROM releases WHERE release_id = %s", (release_id,)).fetchone()
    return _release(row) if row else None


def active_release(store: Store) -> Release | None:
    with store.tx() as c:
        row = c.execute(f"SELECT {_REL_COLS} FROM releases WHERE state = 'active'").fetchone()
    return _release(row) if row else None


def list_releases(store: Store, state: str | None = None) -> list[Release]:
    with store.tx() as c:
        if state:
            rows = c.execute(f"SELECT {_REL_COLS} FROM releases WHERE state = %s ORDER BY created_at", (state,))
        else:
            rows = c.execute(f"SELECT {_REL_COLS} FROM releases ORDER BY created_at")
        return [_release(r) for r in rows.fetchall()]


def get_run(store: Store, run_id: str) -> Run | None:
    with store.tx() as c:
        row = c.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    return Run(*row) if row else None


def list_runs(store: Store) -> list[Run]:
    with store.tx() as c:
        return [Run(*r) for r in c.execute(f"SELECT {_RUN_COLS} FROM runs ORDER BY started_at").fetchall()]
