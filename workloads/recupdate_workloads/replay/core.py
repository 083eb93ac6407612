"""Offline replay of update strategies over historical data.

Time is cut into periods. At each period boundary every strategy may update using data before the
boundary only; it is then scored on the triples of the next period. Strategies plug in through the
`Strategy` interface; the count baselines live here, the LLM strategies in `replay_llm`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from recupdate_workloads.data.evidence import popular_fill
from recupdate_workloads.data.sequences import period_edges
from recupdate_workloads.data.types import Catalogue, PairEvidence, Triples
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store.db import Store

TOP_N = 5


@dataclass
class ReplayConfig:
    """What to replay and how. Durations are seconds."""

    period: int = 90 * 86_400
    train_periods: int = 2  # periods of history before the first evaluated period
    window: int = 90 * 86_400  # retrieval window for evidence refreshes
    threshold: float = 3.5
    top_r: int = TOP_N
    min_support: int = 3
    neighbours: int = 5
    scoring: str = "frequency"
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class UpdateContext:
    """What a strategy may see at a boundary: triples strictly before it, plus shared services."""

    period: int  # index of the period about to be evaluated (0 = first evaluated)
    boundary: int
    history: Triples  # every triple with ts < boundary
    catalogue: Catalogue
    config: ReplayConfig
    evidence: Callable[[int, int], dict[tuple[int, int], PairEvidence]]  # (start, end) -> snapshot (cached)
    extra_cost: dict[str, float] = field(default_factory=dict)  # work done outside this process (Ray workers)
    # Work done inside update() that several strategies share (the LLMs' bootstrapped base): reported on its
    # own, not charged to whichever strategy happened to build it first.
    shared_cost: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    name: str

    def update(self, ctx: UpdateContext) -> None:
        """Refresh whatever the strategy keeps, from ctx.history (data before the boundary only)."""

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        """Top-n cluster ids per context, int32 [len(c1), n], -1 where fewer are known."""


def variants(s: Strategy) -> tuple[str, ...]:
    """The rows a strategy is reported as: its name, or the names of its ``variants`` (an LLM strategy's
    ranking by the model alone and blended with the evidence), each scored on its own."""
    return tuple(getattr(s, "variants", ()) or (s.name,))


def predictions(s: Strategy, c1: np.ndarray, c2: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Each of the strategy's rows' top-n (``predict_variants`` where it has variants, else ``predict``)."""
    fn = getattr(s, "predict_variants", None)
    if fn is not None:
        out: dict[str, np.ndarray] = fn(c1, c2, n)
        if set(out) != set(variants(s)):
            raise ValueError(f"{s.name}: predict_variants gave {sorted(out)}, not {sorted(variants(s))}")
        return out
    return {s.name: s.predict(c1, c2, n)}


class EvidenceTable:
    """Predictions from an evidence snapshot: a pair's ranked successors, then global popularity."""

    def __init__(self, evidence: dict[tuple[int, int], PairEvidence], popular: np.ndarray) -> None:
        self.table = {k: [s.cluster for s in v.successors] for k, v in evidence.items()}
        self.popular = popular

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        out = np.empty((len(c1), n), dtype=np.int32)
        cache: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(c1.tolist(), c2.tolist(), strict=True)):
            if key not in cache:
                cache[key] = popular_fill(self.table.get(key, []), self.popular, key, n)
            out[i] = cache[key]
        return out


def popularity(t: Triples, n_clusters: int) -> np.ndarray:
    """Cluster ids by how often they were the next novel cluster, most frequent first."""
    counts = np.bincount(t.c_next, minlength=n_clusters)
    return np.argsort(-counts, kind="stable").astype(np.int32)


class PopularStrategy:
    """Globally most frequent successors over the retrieval window (refreshed every period)."""

    name = "popular"

    def __init__(self) -> None:
        self.popular = np.zeros(0, np.int32)

    def update(self, ctx: UpdateContext) -> None:
        self.popular = popularity(ctx.history.window(ctx.boundary - ctx.config.window, None), len(ctx.catalogue))
        ctx.extra_cost["refreshes"] = 1.0

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        return EvidenceTable({}, self.popular).predict(c1, c2, n)


class CountsStrategy:
    """Count-argmax table from the evidence store: retrieval without an LLM.

    refresh=True rebuilds the snapshot over the latest window every period (`counts`); refresh=False
    builds it once from the first training window and never updates (`static`)."""

    def __init__(self, name: str, refresh: bool) -> None:
        self.name = name
        self.refresh = refresh
        self.table: EvidenceTable | None = None

    def update(self, ctx: UpdateContext) -> None:
        if self.table is not None and not self.refresh:
            return
        start = ctx.boundary - (ctx.config.window if self.refresh else ctx.config.period * ctx.config.train_periods)
        evidence = ctx.evidence(start, ctx.boundary)
        self.table = EvidenceTable(evidence, popularity(ctx.history.window(start, None), len(ctx.catalogue)))
        ctx.extra_cost["refreshes"] = 1.0

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        assert self.table is not None, "update() first"
        return self.table.predict(c1, c2, n)


def store_evidence(store: Store, triples: Triples, catalogue: Catalogue, config: ReplayConfig) -> Callable[..., Any]:
    """An evidence provider backed by the real store: builds (and caches) a snapshot per window."""
    cache: dict[tuple[int, int], dict[tuple[int, int], PairEvidence]] = {}
    params = ev.EvidenceParams(
        top_r=config.top_r, min_support=config.min_support, scoring=config.scoring, neighbours=config.neighbours
    )

    def get(start: int, end: int) -> dict[tuple[int, int], PairEvidence]:
        if (start, end) not in cache:
            k = len(catalogue)
            now = ev.Counts.of(triples.window(start, end), k)
            prev = ev.Counts.of(triples.window(2 * start - end, start), k) if config.scoring == "trend" else None
            ev.build_snapshot(store, now, (start, end), params, prev=prev)
            cache[(start, end)] = ev.load_evidence(store)
        return cache[(start, end)]

    return get


@dataclass
class StrategyResult:
    name: str
    hr1: float
    hr5: float
    hr1_macro: float
    hr5_macro: float
    coverage: float
    per_period_hr5: list[float]
    per_period_hr1: list[float]
    cpu_seconds: float
    wall_seconds: float
    diff_hr5_vs_static: float | None = None
    ci95_hr5_vs_static: tuple[float, float] | None = None
    diff_hr1_vs_static: float | None = None
    ci95_hr1_vs_static: tuple[float, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)
    # what each period's update did (its extra_cost: finetunes, refreshes, ...), for replay/report.py's marks
    per_period_updates: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ReplayResult:
    data: str
    periods: list[tuple[int, int]]
    eval_triples: int
    eval_users: int
    strategies: list[StrategyResult]
    shared_cost: dict[str, float] = field(default_factory=dict)  # cpu_seconds, wall_seconds of shared work

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    users: np.ndarray, hits_a: np.ndarray, hits_b: np.ndarray, rounds: int, seed: int
) -> tuple[float, tuple[float, float]]:
    """Difference of micro hit rates (a - b) and its 95% CI, resampling users (clusters of triples)."""
    uniq, inv = np.unique(users, return_inverse=True)
    da = np.bincount(inv, weights=hits_a.astype(np.float64), minlength=len(uniq))
    db = np.bincount(inv, weights=hits_b.astype(np.float64), minlength=len(uniq))
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    point = float((da.sum() - db.sum()) / n.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), size=(rounds, len(uniq)))
    diffs = (da[idx].sum(1) - db[idx].sum(1)) / n[idx].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return point, (float(lo), float(hi))


def _macro(users: np.ndarray, hits: np.ndarray) -> float:
    _, inv = np.unique(users, return_inverse=True)
    return float(np.mean(np.bincount(inv, weights=hits) / np.bincount(inv)))


def replay(
    triples: Triples,
    catalogue: Catalogue,
    strategies: Sequence[Strategy],
    config: ReplayConfig,
    evidence: Callable[[int, int], dict[tuple[int, int], PairEvidence]],
    data_name: str = "",
    progress: bool = True,
) -> ReplayResult:
    """Run every strategy over the periods and score it. `static` (if present) is the CI baseline."""

    if len(triples) == 0:
        raise ValueError("no triples: is the positive threshold right for this data?")
    t0 = int(triples.ts.min())
    edges = period_edges(t0, int(triples.ts.max()) + 1, config.period)
    boundaries = edges[config.train_periods : -1]
    if not boundaries:
        raise ValueError(f"data spans {len(edges) - 1} periods; need more than train_periods={config.train_periods}")
    rows = {s.name: variants(s) for s in strategies}
    names = [row for s in strategies for row in rows[s.name]]
    if len(set(names)) != len(names):
        raise ValueError(f"two strategies report rows of the same name: {names}")
    hits1: dict[str, list[np.ndarray]] = {row: [] for row in names}
    hits5: dict[str, list[np.ndarray]] = {row: [] for row in names}
    recommended: dict[str, set[int]] = {row: set() for row in names}
    cost = {s.name: [0.0, 0.0] for s in strategies}
    extra: dict[str, dict[str, float]] = {s.name: {} for s in strategies}
    updates: dict[str, list[dict[str, float]]] = {s.name: [] for s in strategies}
    shared: dict[str, float] = {}
    eval_users, periods = [], []
    bar = tqdm(total=len(boundaries) * len(strategies), desc="replay", unit="update", disable=not progress)
    for p, boundary in enumerate(boundaries):
        end = boundary + config.period
        test = triples.window(boundary, end)
        periods.append((boundary, end))
        eval_users.append(test.user)
        history = triples.window(None, boundary)
        for s in strategies:
            bar.set_postfix_str(f"{s.name} @ period {p + 1}/{len(boundaries)}")
            ctx = UpdateContext(p, boundary, history, catalogue, config, evidence)
            c0, w0 = time.process_time(), time.perf_counter()
            s.update(ctx)
            cost[s.name][0] += time.process_time() - c0 - ctx.shared_cost.get("cpu_seconds", 0.0)
            cost[s.name][1] += time.perf_counter() - w0 - ctx.shared_cost.get("wall_seconds", 0.0)
            for k, v in ctx.shared_cost.items():
                shared[k] = shared.get(k, 0.0) + v
            for k, v in ctx.extra_cost.items():
                extra[s.name][k] = extra[s.name].get(k, 0.0) + v
            updates[s.name].append(dict(ctx.extra_cost))
            if len(test):
                preds = predictions(s, test.c1, test.c2, TOP_N)
            else:
                preds = {row: np.zeros((0, TOP_N), np.int32) for row in rows[s.name]}
            for row, pred in preds.items():
                hit_rank = pred == test.c_next[:, None]
                hits1[row].append(hit_rank[:, 0])
                hits5[row].append(hit_rank.any(axis=1))
                recommended[row].update(np.unique(pred[pred >= 0]).tolist())
            bar.update()
    bar.close()
    users = np.concatenate(eval_users)
    for s in strategies:  # LLM strategies record the exact-match rate of their free generations
        exact = getattr(s, "exact", None)
        if exact:
            extra[s.name]["exact_match"] = float(np.mean(exact))
    results = []
    for s in strategies:
        for row in rows[s.name]:
            results.append(
                _result(
                    row,
                    hits1[row],
                    hits5[row],
                    recommended[row],
                    users,
                    len(catalogue),
                    cost[s.name],
                    extra[s.name],
                    updates[s.name],
                )
            )
    if "static" in hits5:
        base5, base1 = np.concatenate(hits5["static"]), np.concatenate(hits1["static"])
        for r in results:
            if r.name == "static":
                continue
            h1, h5 = np.concatenate(hits1[r.name]), np.concatenate(hits5[r.name])
            if len(h5):
                r.diff_hr5_vs_static, r.ci95_hr5_vs_static = paired_bootstrap(
                    users, h5, base5, config.bootstrap, config.seed
                )
                r.diff_hr1_vs_static, r.ci95_hr1_vs_static = paired_bootstrap(
                    users, h1, base1, config.bootstrap, config.seed
                )
    return ReplayResult(data_name, periods, len(users), len(np.unique(users)), results, shared)


def _result(
    name: str,
    hits1: list[np.ndarray],
    hits5: list[np.ndarray],
    recommended: set[int],
    users: np.ndarray,
    n_clusters: int,
    cost: list[float],
    extra: dict[str, float],
    updates: list[dict[str, float]],
) -> StrategyResult:
    h1, h5 = np.concatenate(hits1), np.concatenate(hits5)
    return StrategyResult(
        name=name,
        hr1=float(h1.mean()) if len(h1) else 0.0,
        hr5=float(h5.mean()) if len(h5) else 0.0,
        hr1_macro=_macro(users, h1) if len(h1) else 0.0,
        hr5_macro=_macro(users, h5) if len(h5) else 0.0,
        coverage=len(recommended) / n_clusters,
        per_period_hr5=[float(x.mean()) if len(x) else float("nan") for x in hits5],
        per_period_hr1=[float(x.mean()) if len(x) else float("nan") for x in hits1],
        cpu_seconds=cost[0] + extra.get("cpu_seconds", 0.0),
        wall_seconds=cost[1],
        extra=dict(extra),
        per_period_updates=list(updates),
    )


def format_table(result: ReplayResult) -> str:
    """The side-by-side comparison printed on the terminal."""
    head = f"{'strategy':<16} {'HR@1':>6} {'HR@5':>6} {'HR@5 users':>10} {'cover':>6}  {'ΔHR@5 vs static [95% CI]':<30} {'CPU s':>8} {'wall s':>7} {'exact':>6} {'train tok':>10}"
    lines = [
        f"replay of {result.data}: {len(result.periods)} periods, {result.eval_triples} triples, {result.eval_users} users",
        head,
        "-" * len(head),
    ]
    for r in result.strategies:
        ci = (
            f"{r.diff_hr5_vs_static:+.4f} [{r.ci95_hr5_vs_static[0]:+.4f}, {r.ci95_hr5_vs_static[1]:+.4f}]"
            if r.diff_hr5_vs_static is not None and r.ci95_hr5_vs_static is not None
            else "baseline"
            if r.name == "static"
            else ""
        )
        lines.append(
            f"{r.name:<16} {r.hr1:6.4f} {r.hr5:6.4f} {r.hr5_macro:10.4f} {r.coverage:6.2f}  {ci:<30} {r.cpu_seconds:8.1f} {r.wall_seconds:7.1f}"
            f" {r.extra.get('exact_match', float('nan')):6.3f} {int(r.extra.get('training_tokens', 0)):>10}"
        )
    if any("+blend" in r.name for r in result.strategies):
        lines.append(
            "<name>+blend<B>: the same model's ranking blended with the evidence, (1 - B) x likelihood + B x share; "
            "its cost is the row above's"
        )
    if result.shared_cost:
        lines.append(
            f"shared by the LLM strategies, not in their rows: the base model's bootstrap, "
            f"{result.shared_cost.get('cpu_seconds', 0.0):.1f} CPU s, {result.shared_cost.get('wall_seconds', 0.0):.1f} wall s"
        )
    return "\n".join(lines)


def plot(result: ReplayResult, path: Path) -> Path:
    """HR@5 per period per strategy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    x = np.arange(1, len(result.periods) + 1)
    for r in result.strategies:
        ax.plot(x, r.per_period_hr5, marker="o", label=f"{r.name} (HR@5 {r.hr5:.3f})")
    ax.set_xlabel("evaluated period")
    ax.set_ylabel("HR@5 of the next novel cluster")
    ax.set_title(f"recupdate replay: {result.data}")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(result: ReplayResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2))
    return path
