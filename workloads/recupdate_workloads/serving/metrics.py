"""Serving metrics, through Ray Serve's metrics API (``ray.serve.metrics``), so that they reach Prometheus with
Ray's own (each replica's metrics agent exports them; Serve adds the ``deployment``, ``replica`` and
``application`` tags). Outside a Serve replica (plain uvicorn, tests) the same calls are made and go nowhere,
so every configuration runs the same handler.

Exported names (Ray adds the ``ray_`` prefix, and ``_total`` to counters; docs/serving.md):

- ``recupdate_serve_outcomes`` (counter; ``endpoint``, ``outcome``): contexts answered, one per context (a
  batch of k adds k), by how: ``table_hit``, ``online`` (online generation), ``evidence`` (evidence fallback),
  ``popular`` (popularity fallback, including contexts of fewer than two distinct clusters).
- ``recupdate_serve_requests`` (counter; ``endpoint``, ``code``): requests by status: the HTTP status code, or
  for the gRPC API (serving.grpc_api) the gRPC status name (``OK``, ``INVALID_ARGUMENT``, ...).
- ``recupdate_serve_latency_ms`` (histogram; ``endpoint``): time in the app, from the first byte of the body
  read to the last byte of the answer written (over gRPC: from the request's bytes to the response message).
- ``recupdate_serve_table_version`` (gauge): the table version served; ``recupdate_serve_release_load_seconds``
  (gauge): how long the served release took to load.

``endpoint`` is ``recommend`` or ``batch``. The replica also keeps the outcome totals itself (``GET /release``,
``served``), which the fast tests read."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

OUTCOMES = ("table_hit", "online", "evidence", "popular")
ENDPOINTS = ("recommend", "batch")
LATENCY_BOUNDARIES_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]

OUTCOMES_METRIC = "recupdate_serve_outcomes"
REQUESTS_METRIC = "recupdate_serve_requests"
LATENCY_METRIC = "recupdate_serve_latency_ms"
TABLE_VERSION_METRIC = "recupdate_serve_table_version"
LOAD_SECONDS_METRIC = "recupdate_serve_release_load_seconds"


def gauge_refresh_s(environ: Mapping[str, str] | None = None) -> float:
    """How often the replica re-sets its gauges: once per Ray report interval (``$RAY_metrics_report_interval_ms``,
    10 s by default, at least 1 s), at most every 5 s; Ray's agent keeps a gauge for two intervals."""
    raw = (os.environ if environ is None else environ).get("RAY_metrics_report_interval_ms", "")
    interval = int(raw) / 1000 if raw.strip().isdigit() else 10.0
    return min(5.0, max(1.0, interval))


class ServingMetrics:
    """One replica's metrics: Ray Serve metric objects, plus the outcome totals in memory."""

    def __init__(self) -> None:
        from ray.serve import metrics  # imported here: the contract and the operator never import Ray

        self._outcomes = metrics.Counter(
            OUTCOMES_METRIC,
            description="Recommendation contexts answered, by endpoint and outcome (table_hit, online, evidence, popular).",
            tag_keys=("endpoint", "outcome"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self._requests = metrics.Counter(
            REQUESTS_METRIC,
            description="Requests to /recommend and /recommend/batch (HTTP status code, or gRPC status name).",
            tag_keys=("endpoint", "code"),  # type: ignore[arg-type]
        )
        self._latency = metrics.Histogram(
            LATENCY_METRIC,
            description="Time in the app per request, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("endpoint",),
        )
        self._table_version = metrics.Gauge(TABLE_VERSION_METRIC, description="The transition table version served.")
        self._load_seconds = metrics.Gauge(LOAD_SECONDS_METRIC, description="Load time of the served release, in s.")
        self._served: tuple[int, float] | None = None
        self._lock = threading.Lock()
        self.totals: dict[str, dict[str, int]] = {e: dict.fromkeys(OUTCOMES, 0) for e in ENDPOINTS}

    def outcomes(self, endpoint: str, counts: Mapping[str, int]) -> None:
        with self._lock:
            t = self.totals[endpoint]
            for outcome, k in counts.items():
                t[outcome] += k
        for outcome, k in counts.items():
            if k:
                self._outcomes.inc(k, tags={"endpoint": endpoint, "outcome": outcome})

    def request(self, endpoint: str, code: int | str, ms: float) -> None:
        """One request: its HTTP status code, or its gRPC status name (``OK``, ``INVALID_ARGUMENT``, ...)."""
        self._requests.inc(1, tags={"endpoint": endpoint, "code": str(code)})
        self._latency.observe(ms, tags={"endpoint": endpoint})

    def served(self, table_version: int, load_seconds: float) -> None:
        self._served = (table_version, load_seconds)
        self.refresh()

    def refresh(self) -> None:
        """Set the gauges again. Ray 2.60 exports a gauge value once and its agent drops a series not refreshed
        within two report intervals (measured: gone 2 s after one set at a 1 s interval), so the replica
        re-sets them every gauge_refresh_s()."""
        if self._served is not None:
            self._table_version.set(self._served[0])
            self._load_seconds.set(self._served[1])

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {e: dict(t) for e, t in self.totals.items()}
