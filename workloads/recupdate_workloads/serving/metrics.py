"""Serving metrics, through Ray Serve's metrics API (``ray.serve.metrics``), so that they reach Prometheus with
Ray's own (each replica's metrics agent exports them; Serve adds the ``deployment``, ``replica`` and
``application`` tags). Outside a Serve replica (plain uvicorn, tests) the same calls are made and go nowhere,
so every configuration runs the same handler.

Exported names (Ray adds the ``ray_`` prefix, and ``_total`` to counters; docs/serving.md):

- ``recupdate_serve_outcomes`` (counter; ``endpoint``, ``outcome``): contexts answered, one per context (a
  batch of k adds k), by how: ``table_hit``, ``online`` (online generation), ``evidence`` (evidence fallback),
  ``popular`` (popularity fallback, including contexts of fewer than two distinct clusters).
- ``recupdate_serve_requests`` (counter; ``endpoint``, ``code``): HTTP requests by status code.
- ``recupdate_serve_latency_ms`` (histogram; ``endpoint``): time in the app, from the first byte of the body
  read to the last byte of the answer written.
- ``recupdate_serve_table_version`` (gauge): the table version served; ``recupdate_serve_release_load_seconds``
  (gauge): how long the served release took to load.

``endpoint`` is ``recommend`` or ``batch``. The replica also keeps the outcome totals itself (``GET /release``,
``served``), which the fast tests read."""

from __future__ import annotations

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


class ServingMetrics:
    """One replica's metrics: Ray Serve metric objects, plus the outcome totals in memory."""

    def __init__(self) -> None:
        from ray.serve import metrics  # imported here: the contract and the operator never import Ray

        self._outcomes = metrics.Counter(
            OUTCOMES_METRIC,
            description="Recommendation contexts answered, by endpoint and outcome (table_hit, online, evidence, popular).",
            tag_keys=("endpoint", "outcome"),
        )
        self._requests = metrics.Counter(
            REQUESTS_METRIC,
            description="HTTP requests to /recommend and /recommend/batch.",
            tag_keys=("endpoint", "code"),
        )
        self._latency = metrics.Histogram(
            LATENCY_METRIC,
            description="Time in the app per request, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("endpoint",),
        )
        self._table_version = metrics.Gauge(TABLE_VERSION_METRIC, description="The transition table version served.")
        self._load_seconds = metrics.Gauge(LOAD_SECONDS_METRIC, description="Load time of the served release, in s.")
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

    def request(self, endpoint: str, code: int, ms: float) -> None:
        self._requests.inc(1, tags={"endpoint": endpoint, "code": str(code)})
        self._latency.observe(ms, tags={"endpoint": endpoint})

    def served(self, table_version: int, load_seconds: float) -> None:
        self._table_version.set(table_version)
        self._load_seconds.set(load_seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {e: dict(t) for e, t in self.totals.items()}
