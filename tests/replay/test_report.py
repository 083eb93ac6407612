"""The cost-quality report of a replay (replay/report.py): ΔHR@5 per CPU-hour per strategy, and the marks of
every fine-tune and promotion on the plot's time axis."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.replay import core as rp
from recupdate_workloads.replay import report

DAY = 86_400


class _FineTunesEvery(rp.PopularStrategy):
    """Popular, which also 'fine-tunes' (burns CPU and says so) every `every` periods."""

    def __init__(self, name: str, every: int) -> None:
        super().__init__()
        self.name, self.every = name, every

    def update(self, ctx: rp.UpdateContext) -> None:
        super().update(ctx)
        if ctx.period % self.every == 0:
            t0 = time.process_time()
            while time.process_time() - t0 < 0.05:
                pass
            ctx.extra_cost["finetunes"] = 1.0


@pytest.fixture(scope="module")
def result() -> rp.ReplayResult:
    s = SyntheticStream(SyntheticSpec(n_interactions=8_000, n_clusters=8, days=450, period_days=90, seed=3))
    t = triples(s.generate(), 3.5)
    config = rp.ReplayConfig(period=90 * DAY, window=90 * DAY, train_periods=1, bootstrap=50)
    evidence = {}  # no store: every table is popularity only

    strategies = [rp.CountsStrategy("static", False), rp.PopularStrategy(), _FineTunesEvery("ft2", 2)]
    return rp.replay(t, s.catalogue, strategies, config, lambda a, b: evidence, "synthetic", progress=False)


def test_cost_quality_rows(result: rp.ReplayResult) -> None:
    rows = {r.name: r for r in report.replay_cost_quality(result)}
    by_name = {r.name: r for r in result.strategies}
    static, ft2 = rows["static"], rows["ft2"]
    assert static.delta_hr5 is None and static.per_cpu_hour is None and static.extra_cpu_seconds == 0.0
    assert ft2.delta_hr5 == by_name["ft2"].diff_hr5_vs_static
    extra = by_name["ft2"].cpu_seconds - by_name["static"].cpu_seconds
    assert ft2.extra_cpu_seconds == pytest.approx(extra) and extra > 0.05  # the burnt CPU, charged to ft2
    assert ft2.per_cpu_hour == pytest.approx(ft2.delta_hr5 / (extra / 3600))  # type: ignore[operator]
    lo, hi = ft2.ci95_per_cpu_hour  # type: ignore[misc]
    assert lo <= ft2.per_cpu_hour <= hi  # type: ignore[operator]
    periods = len(result.periods)
    assert (static.finetunes, static.promotions) == (0, 1)  # built once, never updated
    assert (rows["popular"].finetunes, rows["popular"].promotions) == (0, periods)  # refreshed every period
    assert (ft2.finetunes, ft2.promotions) == (len(range(0, periods, 2)), periods)
    text = report.format_cost_quality(list(rows.values()))
    assert "ΔHR@5 per CPU-hour" in text and "baseline" in text
    (ft2_line,) = [line for line in text.splitlines() if line.startswith("ft2")]
    assert f"{ft2.per_cpu_hour:+.4g}" in ft2_line


def test_marks_sit_at_the_boundaries(result: rp.ReplayResult) -> None:
    marks = report.replay_marks(result)
    boundaries = [datetime.fromtimestamp(a, UTC) for a, _ in result.periods]
    assert marks["ft2"].finetunes == boundaries[::2]
    assert marks["ft2"].promotions == boundaries
    assert marks["static"].promotions == boundaries[:1] and marks["static"].finetunes == []


def test_a_baseline_that_costs_nothing_more_has_no_rate() -> None:
    row = report.CostQuality("free", 0.05, (0.01, 0.09), 1.0, 0.0)
    assert row.per_cpu_hour is None and row.ci95_per_cpu_hour is None
    assert report.CostQuality("x", 0.05, None, 2.0, 1.8).per_cpu_hour == pytest.approx(100.0)


def test_plot_is_a_png(result: rp.ReplayResult, tmp_path: Path) -> None:
    path = report.plot_replay(result, tmp_path / "hr5.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite([r.hr5 for r in result.strategies]).all()
