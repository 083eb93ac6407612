"""Metrics and gates (docs/architecture.md): exact-match rate of free generation, recall on the most recent
held-out window, and no regression against the active release on the same triples (paired)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recupdate_workloads.data.types import Triples

TOP_N = 5


@dataclass(frozen=True)
class GateThresholds:
    """The paper's defaults."""

    min_exact_match: float = 0.90
    min_recall: float = 0.015
    max_regression: float = 0.01

    @classmethod
    def from_config(cls, gates: dict[str, Any] | None) -> GateThresholds:
        g = gates or {}
        return cls(
            float(g.get("minExactMatch", cls.min_exact_match)),
            float(g.get("minRecall", cls.min_recall)),
            float(g.get("maxRegression", cls.max_regression)),
        )


def hits(pred: np.ndarray, truth: np.ndarray, k: int = TOP_N) -> np.ndarray:
    """Per triple: did the true next cluster appear in the top-k? (recall@k with one relevant item)."""
    if len(truth) == 0:
        return np.zeros(0, dtype=bool)
    return (pred[:, :k] == truth[:, None]).any(axis=1)


def lookup_predictions(table: dict[tuple[int, int], list[int]], t: Triples, n: int = TOP_N) -> np.ndarray:
    """Predictions of a transition table (pair -> ranked ids) for each triple; -1 where the pair is missing."""
    out = np.full((len(t), n), -1, dtype=np.int32)
    for i, key in enumerate(zip(t.c1.tolist(), t.c2.tolist(), strict=True)):
        ranked = table.get(key)
        if ranked:
            out[i, : min(n, len(ranked))] = ranked[:n]
    return out


def gates(
    exact_match: float,
    candidate_hits: np.ndarray,
    active_hits: np.ndarray | None,
    thresholds: GateThresholds,
) -> dict[str, Any]:
    """Gate verdicts in the shape the controller reads: {gate: {passed, value, threshold}, passed}."""
    recall = float(candidate_hits.mean()) if len(candidate_hits) else 0.0
    out: dict[str, Any] = {
        "exactMatch": {
            "passed": exact_match >= thresholds.min_exact_match,
            "value": round(exact_match, 4),
            "threshold": thresholds.min_exact_match,
        },
        "recall": {
            "passed": recall >= thresholds.min_recall,
            "value": round(recall, 4),
            "threshold": thresholds.min_recall,
        },
    }
    if active_hits is not None and len(active_hits) == len(candidate_hits) and len(active_hits):
        delta = float(candidate_hits.mean() - active_hits.mean())
        out["regression"] = {
            "passed": delta >= -thresholds.max_regression,
            "value": round(delta, 4),
            "threshold": -thresholds.max_regression,
            "activeRecall": round(float(active_hits.mean()), 4),
        }
    out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict))
    out["heldOutTriples"] = len(candidate_hits)
    return out
