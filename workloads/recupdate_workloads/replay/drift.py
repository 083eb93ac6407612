"""`recupdate drift`: how fast do successor sets change? (the paper's motivation analysis)

For each context (c1, c2), the top-5 successor set per period; the Jaccard similarity of consecutive
periods where both have enough support; and the same with period labels shuffled within each context,
the noise floor: real drift shows as consecutive-period overlap below the shuffled overlap... or not.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from recupdate_workloads.contract.durations import parse_seconds
from recupdate_workloads.data.loaders import load
from recupdate_workloads.data.sequences import pair_key, triples
from recupdate_workloads.data.synthetic import SyntheticSpec
from recupdate_workloads.data.types import Triples

TOP = 5


@dataclass
class DriftStats:
    mean: float
    var: float
    contexts: int
    comparisons: int


def _top_sets(
    key: np.ndarray, period: np.ndarray, nxt: np.ndarray, min_support: int
) -> dict[tuple[int, int], set[int]]:
    """{(context key, period): top-5 successors} for cells with at least min_support triples."""
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
    sets = _top_sets(key, period, nxt, min_support)
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


def drift(t: Triples, n_clusters: int, period: int, min_support: int, seed: int = 0) -> tuple[DriftStats, DriftStats]:
    """(observed, shuffled noise floor). No triples: no comparisons (NaN means)."""
    if period <= 0:
        raise ValueError("period must be positive")
    if not len(t):
        none = DriftStats(float("nan"), float("nan"), 0, 0)
        return none, none
    # Period index by arithmetic: nothing is allocated per period, so a wide time span costs nothing.
    per = (t.ts - int(t.ts.min())) // period
    key = pair_key(t.c1, t.c2, n_clusters)
    observed = consecutive_jaccard(key, per, t.c_next, min_support)
    # Shuffle the period labels among each context's triples: same per-period sizes, no time structure.
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(key)), key))
    shuffled = per.copy()
    k_sorted = key[order]
    bounds = np.flatnonzero(k_sorted[1:] != k_sorted[:-1]) + 1
    for seg in np.split(order, bounds):
        shuffled[seg] = rng.permutation(per[seg])
    return observed, consecutive_jaccard(key, shuffled, t.c_next, min_support)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic", help="synthetic (default), movielens:PATH or table:I,ITEMS[,C]")
    p.add_argument("--clusters", default="pair", choices=["pair", "genre"])
    p.add_argument("--interactions", type=int, default=100_000, help="synthetic size")
    p.add_argument("--period", default="90d", help="period length, e.g. 30d, 90d, 365d")
    p.add_argument("--min-support", type=int, default=10, help="triples a context needs in both periods")
    p.add_argument("--threshold", type=float, default=3.5, help="positive threshold")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:

    try:  # bad data (DataError) or a bad duration: one line and exit 2, no traceback
        ds = load(args.data, clusters=args.clusters, synthetic=SyntheticSpec(n_interactions=args.interactions))
        period = parse_seconds(args.period)
        if period <= 0:
            raise ValueError(f"--period {args.period!r} must be positive")
    except ValueError as exc:
        print(f"recupdate drift: {exc}", file=sys.stderr)
        return 2
    t = triples(ds.log, args.threshold)
    obs, floor = drift(t, len(ds.catalogue), period, args.min_support, args.seed)
    print(f"drift of top-{TOP} successor sets, {ds.name}, period {args.period}, min support {args.min_support}")
    print(f"{'':<22} {'mean J':>7} {'var':>7} {'contexts':>9} {'pairs of periods':>17}")
    for label, s in (("consecutive periods", obs), ("shuffled (noise)", floor)):
        print(f"{label:<22} {s.mean:7.3f} {s.var:7.3f} {s.contexts:9d} {s.comparisons:17d}")
    if obs.comparisons == 0:
        print(
            "no context has --min-support triples in two consecutive periods: use a longer --period or a lower --min-support"
        )
        return 1
    print(f"drift beyond noise: {floor.mean - obs.mean:+.3f} (shuffled minus observed mean Jaccard)")
    return 0
