"""`recupdate drift`: how fast do successor sets change? (the paper's motivation analysis)

For each context (c1, c2), the top-5 successor set per period; the Jaccard similarity of consecutive
periods where both have enough support; and the same with period labels shuffled within each context,
the noise floor: real drift shows as consecutive-period overlap below the shuffled overlap... or not.
"""

from __future__ import annotations

import argparse
import sys

from recupdate_workloads.contract.durations import parse_seconds
from recupdate_workloads.data.drift import TOP, DriftStats, drift
from recupdate_workloads.data.loaders import load
from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import SyntheticSpec

__all__ = ["TOP", "DriftStats", "configure", "drift", "run"]  # the measure lives in data/drift.py


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
