"""How fast successor sets change: the drift measure of `recupdate drift`, of every refresh and of replay.

Per context (c1, c2), the top-5 successor set (most frequent next novel clusters, ties by cluster id) of a
period; the Jaccard similarity of two periods' sets where both have at least `min_support` triples; and
the same figure with the period labels shuffled among each context's triples, the noise floor: the
overlap that sampling alone leaves (same per-period sizes, no time structure). Real drift shows as an
observed overlap below the floor.

Two windows (window_drift): `drift = 1 - jaccard`, `floor = 1 - floorJaccard`, and the drift beyond
noise, `excess = drift - floor = floorJaccard - jaccard`: 0 when the new window's successors are what
sampling noise alone would give, up to 1 when every set changed completely while the floor saw none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recupdate_workloads.data.sequences import pair_key
from recupdate_workloads.data.types import Triples

TOP = 5
#: Triples a context needs in both windows for its top-5 sets to count (as `recupdate drift`'s default).
MIN_SUPPORT = 10


@dataclass
class DriftStats:
    """Mean and variance of the Jaccard similarity over the compared (context, period pair) cells."""

    mean: float
    var: float
    contexts: int
    comparisons: int


def top_sets(key: np.ndarray, period: np.ndarray, nxt: np.ndarray, min_support: int) -> dict[tuple[int, int], set[int]]:
    """{(context key, period): top-5 successors} for cells with at least min_support triples."""
    if not len(key):
        return {}
    order = np.lexsort((nxt, period, key))
    key, period, nxt = key[order], period[order], nxt[order]
    cell = np.stack([key, period], axis=1)
    bounds = np.flatnonzero(np.any(cell[1:] != cell[:-1], axis=1)) + 1
    out = {}
    for seg_k, seg_p, seg_n in zip(np.split(key, bounds), np.split(period, bounds), np.split(nxt, bounds), strict=True):
        if len(seg_n) < min_support:
            continue
        vals, counts = np.unique(seg_n, return_counts=True)
        top = vals[np.lexsort((vals, -counts))][:TOP]
        out[(int(seg_k[0]), int(seg_p[0]))] = set(top.tolist())
    return out


def consecutive_jaccard(key: np.ndarray, period: np.ndarray, nxt: np.ndarray, min_support: int) -> DriftStats:
    """Jaccard of each context's top-5 sets in periods p and p + 1, where both have enough support."""
    sets = top_sets(key, period, nxt, min_support)
    sims, ctx = [], set()
    for (k, p), s in sets.items():
        nxt_set = sets.get((k, p + 1))
        if nxt_set is not None:
            sims.append(len(s & nxt_set) / len(s | nxt_set))
            ctx.add(k)
    arr = np.asarray(sims, dtype=np.float64)
    return DriftStats(
        float(arr.mean()) if len(arr) else float("nan"),
        float(arr.var()) if len(arr) else float("nan"),
        len(ctx),
        len(arr),
    )


def shuffle_within(key: np.ndarray, period: np.ndarray, seed: int) -> np.ndarray:
    """The period labels permuted among each context's triples: same per-period sizes, no time structure."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(key)), key))
    shuffled = period.copy()
    k_sorted = key[order]
    bounds = np.flatnonzero(k_sorted[1:] != k_sorted[:-1]) + 1
    for seg in np.split(order, bounds):
        shuffled[seg] = rng.permutation(period[seg])
    return shuffled


def drift(t: Triples, n_clusters: int, period: int, min_support: int, seed: int = 0) -> tuple[DriftStats, DriftStats]:
    """(observed, shuffled noise floor) over consecutive periods. No triples: no comparisons (NaN means)."""
    if period <= 0:
        raise ValueError("period must be positive")
    if not len(t):
        none = DriftStats(float("nan"), float("nan"), 0, 0)
        return none, none
    # Period index by arithmetic: nothing is allocated per period, so a wide time span costs nothing.
    per = (t.ts - int(t.ts.min())) // period
    key = pair_key(t.c1, t.c2, n_clusters)
    observed = consecutive_jaccard(key, per, t.c_next, min_support)
    return observed, consecutive_jaccard(key, shuffle_within(key, per, seed), t.c_next, min_support)


@dataclass(frozen=True)
class WindowDrift:
    """Drift of a new window against a reference window (the one the active adapter was trained on)."""

    jaccard: float  # mean Jaccard of the contexts' top-5 sets, reference vs new; NaN: no context compared
    floor_jaccard: float  # the same with window labels shuffled within each context
    contexts: int  # contexts with min_support triples in both windows

    @property
    def drift(self) -> float:
        return 1.0 - self.jaccard

    @property
    def floor(self) -> float:
        return 1.0 - self.floor_jaccard

    @property
    def excess(self) -> float | None:
        """Drift beyond the noise floor; None when no context had enough support in both windows."""
        if self.contexts == 0:
            return None
        return self.floor_jaccard - self.jaccard

    def as_dict(self) -> dict[str, Any]:
        """The record of a release's metrics (camelCase, JSON: NaN becomes null)."""

        def num(x: float | None) -> float | None:
            return None if x is None or np.isnan(x) else round(float(x), 4)

        return {
            "jaccard": num(self.jaccard),
            "floorJaccard": num(self.floor_jaccard),
            "drift": num(self.drift),
            "floor": num(self.floor),
            "excess": num(self.excess),
            "contexts": self.contexts,
        }


def window_drift(
    reference: Triples, new: Triples, n_clusters: int, min_support: int = MIN_SUPPORT, seed: int = 0
) -> WindowDrift:
    """Drift of `new` against `reference`, beside the floor of the same triples with the two windows'
    labels shuffled within each context. The windows may differ in length: the shuffle keeps each
    context's per-window sizes, so the floor carries the same sampling noise as the observation."""
    key = pair_key(np.concatenate([reference.c1, new.c1]), np.concatenate([reference.c2, new.c2]), n_clusters)
    label = np.concatenate([np.zeros(len(reference), np.int64), np.ones(len(new), np.int64)])
    nxt = np.concatenate([reference.c_next, new.c_next])
    observed = consecutive_jaccard(key, label, nxt, min_support)
    if observed.comparisons == 0:
        return WindowDrift(float("nan"), float("nan"), 0)
    floor = consecutive_jaccard(key, shuffle_within(key, label, seed), nxt, min_support)
    return WindowDrift(observed.mean, floor.mean, observed.contexts)
