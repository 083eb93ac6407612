"""The cost-quality trade-off of update strategies, for `recupdate replay` and `recupdate local`.

Each strategy's gain in HR@5 over the release never updated (`static`), per CPU-hour it spent beyond what
`static` spent: the quality an hour of compute buys. And the HR@5 plot over time, with every fine-tune and
every promotion (a new release served: a fine-tune's or an evidence refresh's) marked where it happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recupdate_workloads.replay.core import ReplayResult


@dataclass(frozen=True)
class CostQuality:
    """One strategy's ΔHR@5 against static, what it cost beyond static, and how often it updated."""

    name: str
    delta_hr5: float | None  # None for the baseline itself
    ci95: tuple[float, float] | None
    cpu_seconds: float  # the strategy's own CPU seconds
    extra_cpu_seconds: float  # beyond the baseline's
    finetunes: int = 0
    promotions: int = 0

    @property
    def per_cpu_hour(self) -> float | None:
        """ΔHR@5 per CPU-hour beyond the baseline; None for the baseline or when it cost no more."""
        if self.delta_hr5 is None or self.extra_cpu_seconds <= 0:
            return None
        return self.delta_hr5 / (self.extra_cpu_seconds / 3600)

    @property
    def ci95_per_cpu_hour(self) -> tuple[float, float] | None:
        """The ΔHR@5 CI over the same CPU-hours (the cost is measured, not sampled)."""
        if self.ci95 is None or self.per_cpu_hour is None:
            return None
        hours = self.extra_cpu_seconds / 3600
        return self.ci95[0] / hours, self.ci95[1] / hours


@dataclass
class Marks:
    """When a strategy fine-tuned and when it promoted a new release, on the plot's time axis."""

    finetunes: list[datetime] = field(default_factory=list)
    promotions: list[datetime] = field(default_factory=list)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def replay_marks(result: ReplayResult) -> dict[str, Marks]:
    """Each strategy's updates, at the boundary before the period they served: a fine-tune where it trained
    an adapter, a promotion wherever it served a new release (a fine-tune or an evidence refresh)."""
    out: dict[str, Marks] = {}
    for r in result.strategies:
        m = out[r.name] = Marks()
        for (boundary, _), update in zip(result.periods, r.per_period_updates, strict=False):
            if update.get("finetunes", 0) > 0:
                m.finetunes.append(_utc(boundary))
            if update.get("finetunes", 0) > 0 or update.get("refreshes", 0) > 0:
                m.promotions.append(_utc(boundary))
    return out


def replay_cost_quality(result: ReplayResult, baseline: str = "static") -> list[CostQuality]:
    """The trade-off of every strategy of a replay, against `baseline` (whose row has no Δ)."""
    base = next((r for r in result.strategies if r.name == baseline), None)
    base_cpu = base.cpu_seconds if base is not None else 0.0
    marks = replay_marks(result)
    rows = []
    for r in result.strategies:
        rows.append(
            CostQuality(
                name=r.name,
                delta_hr5=None if r.name == baseline else r.diff_hr5_vs_static,
                ci95=None if r.name == baseline else r.ci95_hr5_vs_static,
                cpu_seconds=r.cpu_seconds,
                extra_cpu_seconds=r.cpu_seconds - base_cpu,
                finetunes=len(marks[r.name].finetunes),
                promotions=len(marks[r.name].promotions),
            )
        )
    return rows


def format_cost_quality(rows: Sequence[CostQuality], baseline: str = "static") -> str:
    """The table printed beside the plot: ΔHR@5 per CPU-hour per strategy."""
    head = (
        f"{'strategy':<10} {'ΔHR@5 vs ' + baseline:>15} {'CPU s':>9} {'+CPU s':>9} "
        f"{'ΔHR@5 per CPU-hour [95% CI]':<36} {'fine-tunes':>10} {'promotions':>10}"
    )
    lines = [f"cost-quality: HR@5 gained over {baseline} per CPU-hour spent beyond it", head, "-" * len(head)]
    for r in rows:
        delta = "baseline" if r.delta_hr5 is None else f"{r.delta_hr5:+.4f}"
        per = r.per_cpu_hour
        ci = r.ci95_per_cpu_hour
        if per is None:
            rate = "-" if r.delta_hr5 is not None else ""
        else:
            rate = f"{per:+.4g}" + (f" [{ci[0]:+.4g}, {ci[1]:+.4g}]" if ci else "")
        lines.append(
            f"{r.name:<10} {delta:>15} {r.cpu_seconds:9.1f} {r.extra_cpu_seconds:+9.1f} "
            f"{rate:<36} {r.finetunes:>10} {r.promotions:>10}"
        )
    return "\n".join(lines)


def plot_over_time(
    path: Path,
    title: str,
    series: Sequence[tuple[str, Sequence[datetime], Sequence[float]]],
    marks: dict[str, Marks],
    ylabel: str = "HR@5 of the next novel cluster",
) -> Path:
    """HR@5 over time per strategy (top) and, below it on the same time axis, one row per strategy with a
    triangle at every fine-tune and a tick at every promotion. A PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in marks if marks[name].finetunes or marks[name].promotions]
    fig, (ax, ev) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(9, 5.5 + 0.25 * len(names)),
        dpi=110,
        gridspec_kw={"height_ratios": [3, max(1, len(names)) * 0.35 + 0.6]},
    )
    colors: dict[str, Any] = {}
    for label, xs, ys in series:
        (line,) = ax.plot(list(xs), list(ys), marker="o", label=label)
        colors[label.split(" ")[0]] = line.get_color()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for row, name in enumerate(names):
        m, color = marks[name], colors.get(name, "black")
        ev.scatter(m.promotions, [row] * len(m.promotions), marker="|", s=160, color=color)
        ev.scatter(m.finetunes, [row] * len(m.finetunes), marker="^", s=60, color=color, edgecolors="black")
        for t in m.finetunes:
            ax.axvline(t, color=color, alpha=0.15, linewidth=1)
    ev.set_yticks(range(len(names)), names, fontsize=8)
    ev.set_ylim(-0.7, max(0, len(names) - 1) + 0.7)
    ev.set_title("▲ fine-tune   | promotion (a new release served)", fontsize=8)
    ev.grid(alpha=0.3, axis="x")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_replay(result: ReplayResult, path: Path) -> Path:
    """The replay's HR@5 per period (at each period's middle) with its fine-tunes and promotions."""
    mids = [_utc((a + b) / 2) for a, b in result.periods]
    rows = {r.name: r for r in replay_cost_quality(result)}
    series = []
    for r in result.strategies:
        per = rows[r.name].per_cpu_hour
        rate = f", {per:+.3g}/CPU-h" if per is not None else ""
        series.append((f"{r.name} (HR@5 {r.hr5:.3f}{rate})", mids, r.per_period_hr5))
    return plot_over_time(path, f"recupdate replay: {result.data}", series, replay_marks(result))
