"""`recupdate replay`: compare update strategies over historical data (synthetic or MovieLens)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from recupdate_workloads.contract.durations import parse_seconds
from recupdate_workloads.data.loaders import load
from recupdate_workloads.data.sequences import period_edges, triples
from recupdate_workloads.data.synthetic import SyntheticSpec
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store.db import open_store

BASELINES = ("static", "counts", "popular")
LLM_STRATEGIES = ("finetune", "rag", "hybrid", "adaptive")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic", help="synthetic (default), movielens:PATH or table:I,ITEMS[,C]")
    p.add_argument("--clusters", default="pair", choices=["pair", "genre"], help="MovieLens clusters")
    p.add_argument("--interactions", type=int, default=100_000, help="synthetic size (interactions)")
    p.add_argument("--seed", type=int, default=7, help="synthetic seed")
    p.add_argument("--period", default="90d", help="period length, e.g. 90d, 365d")
    p.add_argument("--train-periods", type=int, default=2, help="periods of history before the first evaluation")
    p.add_argument("--window", default=None, help="retrieval window (default: one period)")
    p.add_argument("--threshold", type=float, default=3.5, help="positive threshold on the weight/rating")
    p.add_argument("--min-support", type=int, default=3, help="pairs below it borrow evidence from neighbours")
    p.add_argument("--scoring", default="frequency", choices=["frequency", "trend"])
    p.add_argument(
        "--strategies",
        default=",".join(BASELINES),
        help=f"comma-separated, from {', '.join(BASELINES + LLM_STRATEGIES)}",
    )
    p.add_argument("--finetune-every", type=int, default=2, help="hybrid: fine-tune every M periods")
    p.add_argument("--executor", default="ray", choices=["ray", "inline"], help="where LLM fine-tunes run")
    p.add_argument("--model-size", default="small", help="bootstrap model size (LLM strategies)")
    p.add_argument("--epochs", type=float, default=None, help="LoRA epochs per fine-tune (LLM strategies)")
    p.add_argument(
        "--bootstrap-epochs",
        type=int,
        default=None,
        help="epochs of the base model's bootstrap (LLM strategies; default 8)",
    )
    p.add_argument(
        "--blend",
        type=float,
        default=0.5,
        help="LLM strategies: also report each one's ranking blended with the evidence's shares "
        "(retrieval.blend, 0..1), as a row <name>+blend<B> next to the model alone; 0: the model alone only",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the CIs")
    p.add_argument("--out", default="out/replay", help="directory for results.json and hr5.png")
    p.add_argument("--store-dir", default=None, help="embedded PostgreSQL data dir (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from recupdate_workloads.replay import timeline

    timeline.configure(p)


def run(args: argparse.Namespace) -> int:
    from recupdate_workloads.replay import core as rp

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(names) - set(BASELINES + LLM_STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies: {', '.join(sorted(unknown))}")
    if not 0.0 <= args.blend <= 1.0:
        print(f"recupdate replay: --blend must be in [0, 1], not {args.blend}", file=sys.stderr)
        return 2
    try:  # bad data (DataError), a bad duration, too short a span: one line and exit 2, before any store starts
        ds = load(args.data, clusters=args.clusters, synthetic=_synthetic(args))
        print(f"data {ds.name}: {ds.report.summary()}; {len(ds.catalogue)} clusters")
        period = parse_seconds(args.period)
        window = parse_seconds(args.window) if args.window else period
        t = triples(ds.log, args.threshold)
        _check_span(t, period, args.train_periods, ds.name)
    except ValueError as exc:
        print(f"recupdate replay: {exc}", file=sys.stderr)
        return 2
    config = rp.ReplayConfig(
        period=period,
        train_periods=args.train_periods,
        window=window,
        threshold=args.threshold,
        min_support=args.min_support,
        scoring=args.scoring,
        bootstrap=args.bootstrap,
    )
    with tempfile.TemporaryDirectory(prefix="recupdate-replay-") as tmp:
        store = open_store("replay", data_dir=args.store_dir or Path(tmp) / "pg")
        try:
            cat.save_catalogue(store, ds.catalogue, ds.log.item_cluster)
            evidence = rp.store_evidence(store, t, ds.catalogue, config)
            strategies = build_strategies(names, args, Path(tmp), store, period)
            recorded = _recorded(strategies)
            result = rp.replay(t, ds.catalogue, recorded, config, evidence, ds.name, progress=not args.no_progress)
        finally:
            with store.tx() as c:
                c.execute("DROP SCHEMA replay CASCADE")
            store.close()
            if store.server is not None:
                store.server.cleanup()
    from recupdate_workloads.replay import report

    out = Path(args.out)
    print(rp.format_table(result))
    print(f"results: {rp.write_json(result, out / 'results.json')}")
    print()
    print(report.format_cost_quality(report.replay_cost_quality(result)))
    print(f"plot:    {report.plot_replay(result, out / 'hr5.png')} (fine-tunes and promotions marked)")
    llm = [r for r in recorded if r.name in LLM_STRATEGIES]
    if llm:
        from recupdate_workloads.replay import timeline as tl
        from recupdate_workloads.replay.adaptive import AdaptiveStrategy

        print(tl.finetune_summary(llm))
        drift = tl.data_drift(t, [b for b, _ in result.periods], period, len(ds.catalogue))
        adaptive = next((r.inner for r in llm if isinstance(r.inner, AdaptiveStrategy)), None)
        print(f"fine-tunes plot: {tl.plot_finetunes(result, llm, adaptive, drift, out / 'finetunes.png')}")
    return 0


def _synthetic(args: argparse.Namespace) -> SyntheticSpec:
    spec = SyntheticSpec(n_interactions=args.interactions, seed=args.seed)
    if args.synthetic_drift is not None:
        spec = dataclasses.replace(spec, drift=args.synthetic_drift)
    if args.synthetic_clusters is not None:
        spec = dataclasses.replace(spec, n_clusters=args.synthetic_clusters)
    return spec


def _recorded(strategies: list[Any]) -> list[Any]:
    """Every strategy, the LLM ones wrapped so that their fine-tunes are noted per boundary."""
    from recupdate_workloads.replay.timeline import Recorded

    return [Recorded(s) if s.name in LLM_STRATEGIES else s for s in strategies]


def _check_span(t: Any, period: int, train_periods: int, name: str) -> None:
    """The checks replay() makes, made before the store starts (ValueError, one line)."""

    if not len(t):
        raise ValueError(f"data {name}: no triples (is --threshold right for this data?)")
    edges = period_edges(int(t.ts.min()), int(t.ts.max()) + 1, period)  # bounded: ValueError past MAX_PERIODS
    if len(edges) - 1 <= train_periods:
        raise ValueError(
            f"data {name} spans {len(edges) - 1} periods of {period}s; need more than --train-periods={train_periods}"
        )


def build_strategies(
    names: list[str], args: argparse.Namespace, workdir: Path, store: Any, period: int = 0
) -> list[Any]:
    from recupdate_workloads.replay import core as rp

    out: list[Any] = []
    for name in names:
        if name == "static":
            out.append(rp.CountsStrategy("static", refresh=False))
        elif name == "counts":
            out.append(rp.CountsStrategy("counts", refresh=True))
        elif name == "popular":
            out.append(rp.PopularStrategy())
        elif name == "adaptive":
            from recupdate_workloads.replay import adaptive

            out.append(adaptive.build(args, workdir, store, period or parse_seconds(args.period)))
        else:
            import recupdate_workloads.replay.llm as replay_llm

            out.append(replay_llm.build(name, args, workdir, store))
    return out
