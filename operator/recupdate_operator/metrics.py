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
ANALYSIS_VERDICTS = Counter(
    "recupdate_analysis_verdicts_total",
    "Analyses on live events that ended, by verdict (Promoted, Aborted, Inconclusive, Cancelled), per policy.",
    ["policy", "verdict"],
    registry=REGISTRY,
)
ANALYSIS_RUNNING = Gauge(
    "recupdate_analysis_running",
    "1 while a policy's candidate is in analysis on live events (the release label), absent otherwise.",
    ["namespace", "policy", "release"],
    registry=REGISTRY,
)
ANALYSIS_HIT_RATE = Gauge(
    "recupdate_analysis_hit_rate",
    "HR@5 of the running analysis so far, per arm (candidate, active).",
    ["namespace", "policy", "arm"],
    registry=REGISTRY,
)
ANALYSIS_EVENTS = Gauge(
    "recupdate_analysis_events",
    "Events the running analysis has scored so far, per arm (candidate, active).",
    ["namespace", "policy", "arm"],
    registry=REGISTRY,
)

# What runs cost, from the registry (runs.cost), per policy and kind; each run is counted once (count_run_cost).
_COST_LABELS = ["namespace", "policy", "kind"]
RUN_CPU_SECONDS = Counter(
    "recupdate_run_cpu_seconds_total",
    "CPU seconds of the runs that ended (the job and its Ray workers), per policy and kind.",
    _COST_LABELS,
    registry=REGISTRY,
)
RUN_GPU_SECONDS = Counter(
    "recupdate_run_gpu_seconds_total",
    "GPU seconds of the runs that ended (training workers x GPUs each), per policy and kind.",
    _COST_LABELS,
    registry=REGISTRY,
)
RUN_TRAINING_TOKENS = Counter(
    "recupdate_run_training_tokens_total",
    "Tokens the fine-tunes that ended trained on, per policy and kind.",
    _COST_LABELS,
    registry=REGISTRY,
)
RUN_WALL_SECONDS = Counter(
    "recupdate_run_wall_seconds_total",
    "Wall seconds of the runs that ended, as they recorded them, per policy and kind.",
    _COST_LABELS,
    registry=REGISTRY,
)
RUN_ROWS_INGESTED = Counter(
    "recupdate_run_rows_ingested_total",
    "Interactions the sync steps of the runs that ended added to the store, per policy and kind.",
    _COST_LABELS,
    registry=REGISTRY,
)
# The newest candidate's change against the active table (status.lastChange), per policy and kind.
CANDIDATE_TOP1_CHANGED = Gauge(
    "recupdate_candidate_top1_changed_ratio",
    "Share of context pairs whose top-1 changed in the newest candidate of this kind, against the active table.",
    _COST_LABELS,
    registry=REGISTRY,
)
CANDIDATE_TOP5_OVERLAP = Gauge(
    "recupdate_candidate_top5_overlap_ratio",
    "Mean overlap of the top-5 lists of the newest candidate of this kind with the active table's.",
    _COST_LABELS,
    registry=REGISTRY,
)

_COUNTED_PER_POLICY = 1000  # run ids remembered per policy, to count each run's cost once
_counted: dict[tuple[str, str], dict[str, None]] = {}

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


def count_run_cost(namespace: str, policy: str, kind: str, run_id: str, cost: Any) -> bool:
    """Count one run's cost (an api.RunCost) into the cost counters, once per run id: a run seen again (a
    reconcile retried after its status write failed, a second operator replica's plan) is not counted again.
    Returns whether it was counted."""
    with _lock:
        seen = _counted.setdefault((namespace, policy), {})
        if run_id in seen:
            return False
        seen[run_id] = None
        while len(seen) > _COUNTED_PER_POLICY:
            del seen[next(iter(seen))]  # the oldest: a run that ended long ago does not end again
    labels = (namespace, policy, kind)
    RUN_CPU_SECONDS.labels(*labels).inc(cost.cpu_seconds)
    RUN_GPU_SECONDS.labels(*labels).inc(cost.gpu_seconds)
    RUN_TRAINING_TOKENS.labels(*labels).inc(cost.training_tokens)
    RUN_WALL_SECONDS.labels(*labels).inc(cost.wall_seconds)
    RUN_ROWS_INGESTED.labels(*labels).inc(cost.rows_ingested)
    return True


def set_change(namespace: str, policy: str, change: Any) -> None:
    """The change gauges from status.lastChange (an api.ChangeStatus, or None: leave them as they are)."""
    if change is None or change.kind is None:
        return
    CANDIDATE_TOP1_CHANGED.labels(namespace, policy, change.kind.value).set(change.top1_changed)
    CANDIDATE_TOP5_OVERLAP.labels(namespace, policy, change.kind.value).set(change.top5_overlap)


def set_drift(namespace: str, policy: str, drift: Any) -> None:
    """The drift gauges from status.lastDrift (a DriftStatus, or None); a measure not taken has no series."""
    for measure in _DRIFT_MEASURES:
        value = getattr(drift, measure, None) if drift is not None else None
        if value is None:
            _remove(DRIFT, namespace, policy, measure)
        else:
            DRIFT.labels(namespace, policy, measure).set(float(value))


_analysing: dict[tuple[str, str], str] = {}


def set_analysis(namespace: str, policy: str, analysis: Any) -> None:
    """The gauges of a policy's running analysis (a status AnalysisStatus, or None); removed when none runs."""
    running = analysis is not None and getattr(analysis.phase, "value", analysis.phase) == "Running"
    with _lock:
        old = _analysing.pop((namespace, policy), None)
        if old is not None and (not running or old != analysis.release_id):
            _remove(ANALYSIS_RUNNING, namespace, policy, old)
        if running:
            ANALYSIS_RUNNING.labels(namespace, policy, analysis.release_id).set(1)
            _analysing[(namespace, policy)] = analysis.release_id
    for arm, rate, events in (
        ("candidate", analysis.candidate_hit_rate if running else None, analysis.candidate_events if running else 0),
        ("active", analysis.baseline_hit_rate if running else None, analysis.baseline_events if running else 0),
    ):
        if running:
            ANALYSIS_EVENTS.labels(namespace, policy, arm).set(events)
            if rate is not None:
                ANALYSIS_HIT_RATE.labels(namespace, policy, arm).set(rate)
        else:
            _remove(ANALYSIS_EVENTS, namespace, policy, arm)
            _remove(ANALYSIS_HIT_RATE, namespace, policy, arm)


def forget_policy(namespace: str, policy: str) -> None:
    """Drop the per-policy series of a policy that was deleted."""
    set_active_release(namespace, policy, None)
    set_analysis(namespace, policy, None)
    _remove(STALENESS, namespace, policy)
    set_drift(namespace, policy, None)
    for kind in ("finetune", "refresh"):
        _remove(CANDIDATE_TOP1_CHANGED, namespace, policy, kind)
        _remove(CANDIDATE_TOP5_OVERLAP, namespace, policy, kind)
    with _lock:
        _counted.pop((namespace, policy), None)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on `port` in a background thread."""
    return start_http_server(port, addr=addr, registry=REGISTRY)


def value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's current value (for tests and the benchmark)."""
    return REGISTRY.get_sample_value(name, labels or {})
