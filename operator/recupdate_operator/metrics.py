"""Prometheus metrics of the operator, on their own registry (served by ``serve(port)``, `--metrics-port`).

Per-policy series (staleness, active release) are removed when the policy goes away. No label ever holds a
secret: the values are policy names, namespaces, run kinds, results and release ids.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter(
    "recupdate_runs_total",
    "Runs that ended, by kind (finetune, refresh) and result (Succeeded, Failed).",
    ["kind", "result"],
    registry=REGISTRY,
)
RUNS_LAUNCHED = Counter(
    "recupdate_runs_launched_total", "Runs launched (jobs created), by kind.", ["kind"], registry=REGISTRY
)
RUN_DURATION = Histogram(
    "recupdate_run_duration_seconds",
    "Wall-clock duration of finished runs, from launch to the job's end.",
    ["kind"],
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, float("inf")),
    registry=REGISTRY,
)
STALENESS = Gauge(
    "recupdate_staleness_seconds",
    "Age of the active release's evidence (now - end of its evidence window), per policy.",
    ["namespace", "policy"],
    registry=REGISTRY,
)
ACTIVE_RELEASE = Gauge(
    "recupdate_active_release",
    "1 for the release a policy has active (the release label), absent when it has none.",
    ["namespace", "policy", "release"],
    registry=REGISTRY,
)
PROMOTIONS = Counter(
    "recupdate_promotions_total",
    "Releases activated, by how (Automatic, Manual, Rollback).",
    ["reason"],
    registry=REGISTRY,
)
REJECTIONS = Counter("recupdate_rejections_total", "Candidates rejected.", registry=REGISTRY)
RECONCILES = Counter("recupdate_reconciles_total", "Reconciles of policies.", registry=REGISTRY)
RECONCILE_ERRORS = Counter(
    "recupdate_reconcile_errors_total",
    "Reconciles that failed, by cause (store, api, spec, internal).",
    ["cause"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "recupdate_reconcile_duration_seconds",
    "Time one reconcile takes (store reads, planning, actions, status patch).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
    registry=REGISTRY,
)
INGEST_ROWS = Counter(
    "recupdate_ingest_rows_total",
    "Interaction rows the runs' sync steps read, by outcome (new, duplicate, skipped), per policy.",
    ["namespace", "policy", "outcome"],
    registry=REGISTRY,
)
INGEST_SKIPPED = Counter(
    "recupdate_ingest_skipped_rows_total",
    "Bad interaction rows the runs' sync steps skipped, by reason (docs/data.md), per policy.",
    ["namespace", "policy", "reason"],
    registry=REGISTRY,
)
DRIFT = Gauge(
    "recupdate_drift",
    "The drift the newest refresh measured against the active adapter's training window, per policy, by "
    "measure: jaccard (mean Jaccard of the top-5 successor sets), floor_jaccard (the same with the windows "
    "shuffled: the noise floor), excess (floor_jaccard - jaccard, what fineTune.onDrift compares) and "
    "contexts (with enough support in both windows).",
    ["namespace", "policy", "measure"],
    registry=REGISTRY,
)
_DRIFT_MEASURES = ("jaccard", "floor_jaccard", "excess", "contexts")
POLICIES = Gauge("recupdate_policies", "Policies the operator currently tracks.", registry=REGISTRY)

_active: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def set_active_release(namespace: str, policy: str, release: str | None) -> None:
    with _lock:
        old = _active.get((namespace, policy))
        if old == release:
            return
        if old is not None:
            _remove(ACTIVE_RELEASE, namespace, policy, old)
            del _active[(namespace, policy)]
        if release is not None:
            ACTIVE_RELEASE.labels(namespace, policy, release).set(1)
            _active[(namespace, policy)] = release


def set_staleness(namespace: str, policy: str, evidence_at: datetime | None, now: datetime) -> None:
    if evidence_at is None:
        _remove(STALENESS, namespace, policy)
    else:
        STALENESS.labels(namespace, policy).set(max(0.0, (now - evidence_at).total_seconds()))


def count_sync(namespace: str, policy: str, sync: Any) -> None:
    """Count one run's sync (a SyncStatus) into the ingest counters; the caller counts each run once."""
    INGEST_ROWS.labels(namespace, policy, "new").inc(sync.new)
    INGEST_ROWS.labels(namespace, policy, "duplicate").inc(sync.duplicate)
    INGEST_ROWS.labels(namespace, policy, "skipped").inc(sum(sync.skipped.values()))
    for reason, n in sync.skipped.items():
        INGEST_SKIPPED.labels(namespace, policy, reason).inc(n)


def set_drift(namespace: str, policy: str, drift: Any) -> None:
    """The drift gauges from status.lastDrift (a DriftStatus, or None); a measure not taken has no series."""
    for measure in _DRIFT_MEASURES:
        value = getattr(drift, measure, None) if drift is not None else None
        if value is None:
            _remove(DRIFT, namespace, policy, measure)
        else:
            DRIFT.labels(namespace, policy, measure).set(float(value))


def forget_policy(namespace: str, policy: str) -> None:
    """Drop the per-policy series of a policy that was deleted."""
    set_active_release(namespace, policy, None)
    _remove(STALENESS, namespace, policy)
    set_drift(namespace, policy, None)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on `port` in a background thread."""
    return start_http_server(port, addr=addr, registry=REGISTRY)


def value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's current value (for tests and the benchmark)."""
    return REGISTRY.get_sample_value(name, labels or {})
