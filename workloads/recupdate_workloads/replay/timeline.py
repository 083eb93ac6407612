"""The timeline of the LLM strategies in `recupdate replay`: when each fine-tuned, beside the drift.

`Recorded` notes at which boundaries a strategy fine-tuned (from what it reports in ctx.extra_cost); the
figure puts those fine-tunes over time above the drift. Also the `adaptive` strategy's options and rule
(replay/adaptive.py holds the strategy, which brings the model in). Light: no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recupdate_workloads.contract.drift import DriftRule
from recupdate_workloads.contract.durations import parse_seconds
from recupdate_workloads.data.drift import MIN_SUPPORT, window_drift
from recupdate_workloads.data.types import Triples

if TYPE_CHECKING:
    from recupdate_workloads.replay.adaptive import AdaptiveStrategy
    from recupdate_workloads.replay.core import ReplayResult, UpdateContext

#: The default rule of `recupdate replay` (the synthetic stream's excess drift after two 90-day periods is
#: 0.04-0.12 at drift 0.05 and 0.17-0.25 at 0.35): a threshold between the two.
DEFAULT_THRESHOLD = 0.15


@dataclass
class Recorded:
    """A strategy whose fine-tunes are noted per boundary (from what it reports in ctx.extra_cost)."""

    inner: Any
    finetuned: list[bool] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def exact(self) -> list[float]:
        return list(getattr(self.inner, "exact", []) or [])

    def update(self, ctx: UpdateContext) -> None:
        self.inner.update(ctx)
        self.finetuned.append(ctx.extra_cost.get("finetunes", 0.0) > 0)

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        out: np.ndarray = self.inner.predict(c1, c2, n)
        return out

    @property
    def variants(self) -> tuple[str, ...]:
        """The inner strategy's rows (the LLM alone and blended: core.variants)."""
        return tuple(getattr(self.inner, "variants", ()) or (self.name,))

    def predict_variants(self, c1: np.ndarray, c2: np.ndarray, n: int) -> dict[str, np.ndarray]:
        fn = getattr(self.inner, "predict_variants", None)
        if fn is None or self.variants == (self.name,):  # one row: the strategy's own predict
            return {self.name: self.predict(c1, c2, n)}
        out: dict[str, np.ndarray] = fn(c1, c2, n)
        return out


def configure(p: argparse.ArgumentParser) -> None:
    """The adaptive strategy's options of `recupdate replay` (and the synthetic stream's drift rate)."""
    p.add_argument(
        "--drift-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"adaptive: fine-tune when drift beyond the noise floor reaches this (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--drift-min-interval",
        default=None,
        help="adaptive: at least this long between fine-tunes (default: --finetune-every periods, hybrid's cadence)",
    )
    p.add_argument(
        "--drift-max-interval",
        default=None,
        help="adaptive: a fine-tune at least this often, whatever the drift (default: twice the min interval)",
    )
    p.add_argument(
        "--drift-min-support",
        type=int,
        default=MIN_SUPPORT,
        help=f"adaptive: triples a context needs in both windows for its drift to count (default {MIN_SUPPORT})",
    )
    p.add_argument(
        "--synthetic-drift",
        type=float,
        default=None,
        help="synthetic: fraction of contexts whose successors change each period (default 0.35)",
    )
    p.add_argument("--synthetic-clusters", type=int, default=None, help="synthetic: number of clusters (default 30)")


def rule_of(args: argparse.Namespace, period: int) -> DriftRule:
    every = max(1, int(getattr(args, "finetune_every", 2)))
    lo = parse_seconds(args.drift_min_interval) if getattr(args, "drift_min_interval", None) else every * period
    hi = parse_seconds(args.drift_max_interval) if getattr(args, "drift_max_interval", None) else 2 * lo
    return DriftRule(getattr(args, "drift_threshold", DEFAULT_THRESHOLD), lo, hi)


def finetune_summary(recorded: list[Recorded]) -> str:
    """One line: the number of fine-tunes per strategy (the cost that matters for the LLM strategies)."""
    return "fine-tunes: " + ", ".join(f"{r.name} {sum(r.finetuned)}" for r in recorded)


def data_drift(history: Triples, boundaries: list[int], period: int, n_clusters: int) -> list[float | None]:
    """Excess drift of each period against the one before it: the data's own drift, whatever a strategy did."""
    out: list[float | None] = []
    for b in boundaries:
        w = window_drift(history.window(b - 2 * period, b - period), history.window(b - period, b), n_clusters)
        out.append(w.excess)
    return out


def plot_finetunes(
    result: ReplayResult,
    recorded: list[Recorded],
    adaptive: AdaptiveStrategy | None,
    drift_of_data: list[float | None],
    path: Path,
) -> Path:
    """When each strategy fine-tuned (markers per boundary) above the drift over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(result.periods) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=110, sharex=True, height_ratios=[1, 1.3])
    for row, r in enumerate(recorded):
        ft = [i + 1 for i, f in enumerate(r.finetuned) if f]
        top.scatter(ft, [row] * len(ft), marker="v", s=70, label=r.name)
    top.set_yticks(range(len(recorded)), [f"{r.name} ({sum(r.finetuned)})" for r in recorded])
    top.set_ylim(-0.7, len(recorded) - 0.3)
    top.set_title(f"fine-tunes per strategy over time: {result.data}")
    top.grid(alpha=0.3)
    nan = float("nan")
    bottom.plot(x, [nan if d is None else d for d in drift_of_data], marker="o", label="data: period vs the one before")
    if adaptive is not None:
        ex = [nan if m.excess is None else m.excess for m in adaptive.measurements]
        bottom.plot(x, ex, marker="s", label="adaptive: window vs its adapter's training window")
        bottom.axhline(adaptive.rule.threshold, color="grey", linestyle="--", label="threshold")
    bottom.set_xlabel("evaluated period (boundary before it)")
    bottom.set_ylabel("drift beyond noise (ΔJaccard)")
    bottom.set_xticks(x)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
