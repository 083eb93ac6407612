"""Replay's `adaptive` strategy: the drift rule of the planner (contract.drift) over measured drift, with the
LLM's training replaced by a stand-in that only notes when it was asked to train (the decision is under
test, not the model), and the fine-tune timeline figure."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from recupdate_workloads.contract.drift import DriftRule
from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.replay import core as rp
from recupdate_workloads.replay import timeline as tl
from recupdate_workloads.replay.adaptive import AdaptiveStrategy
from recupdate_workloads.replay.llm import LLMStrategy, _Shared

DAY = 86_400
PERIOD = 60 * DAY


class _Untrained(LLMStrategy):
    """Stands in for the LLM's fine-tune and inference: notes each fine-tune, predicts popularity."""

    def update(self, ctx: rp.UpdateContext) -> None:
        if self._due(ctx.period):
            self.adapter = f"adapter-{ctx.period}"
            ctx.extra_cost["finetunes"] = 1.0
        self.popular = rp.popularity(ctx.history, len(ctx.catalogue))

    def predict(self, c1: np.ndarray, c2: np.ndarray, n: int) -> np.ndarray:
        return rp.EvidenceTable({}, self.popular).predict(c1, c2, n)


class _Adaptive(AdaptiveStrategy, _Untrained):
    pass


def _replay(drift: float, rule: DriftRule, tmp_path: Path) -> tuple[_Adaptive, tl.Recorded, rp.ReplayResult]:
    changes = 3 if drift else 0
    spec = SyntheticSpec(
        n_interactions=30_000,
        n_clusters=8,
        drift=drift,
        n_trends=changes,
        n_late_clusters=0,
        days=600,
        period_days=60,
        seed=3,
    )
    s = SyntheticStream(spec)
    t = triples(s.generate(), 3.5)
    shared = _Shared(tmp_path, "tiny", 1)
    adaptive = _Adaptive(shared, tmp_path, rule, "inline", 1.0, min_support=10)
    recorded = tl.Recorded(adaptive)
    config = rp.ReplayConfig(period=PERIOD, window=PERIOD, train_periods=2, bootstrap=20)
    result = rp.replay(t, s.catalogue, [recorded], config, lambda start, end: {}, progress=False)
    return adaptive, recorded, result


def test_adaptive_fine_tunes_on_drift_not_on_a_stable_stream(tmp_path: Path) -> None:
    rule = DriftRule(threshold=0.08, min_interval=2 * PERIOD, max_interval=None)
    drifting, rec_d, result = _replay(0.6, rule, tmp_path)
    stable, rec_s, _ = _replay(0.0, rule, tmp_path)
    assert len(result.periods) == 8
    # the first boundary bootstraps the adapter; then drift fires only where it was measured beyond the rule
    assert rec_d.finetuned[0] and rec_s.finetuned[0]
    fired = [m.boundary for m in drifting.measurements if m.fired == "drift"]
    assert len(fired) >= 2, drifting.measurements
    for m in drifting.measurements[1:]:
        if m.fired == "drift":
            assert m.excess is not None and m.excess >= rule.threshold
    assert all(b - a >= rule.min_interval for a, b in itertools.pairwise(fired))
    assert [m.fired is not None for m in drifting.measurements] == rec_d.finetuned
    # no drift beyond noise: the adapter is never replaced, and every measurement had the support to say so
    assert sum(rec_s.finetuned) == 1
    assert all(m.excess is not None and m.excess < rule.threshold for m in stable.measurements[1:])


def test_max_interval_forces_fine_tunes_and_the_timeline_plots(tmp_path: Path) -> None:
    rule = DriftRule(threshold=1.0, min_interval=PERIOD, max_interval=3 * PERIOD)  # drift can never reach 1
    adaptive, recorded, result = _replay(0.0, rule, tmp_path)
    assert [m.fired for m in adaptive.measurements] == [
        "initial",
        None,
        None,
        "maxInterval",
        None,
        None,
        "maxInterval",
        None,
    ]
    assert tl.finetune_summary([recorded]) == "fine-tunes: adaptive 3"
    drift = tl.data_drift(
        triples(SyntheticStream(SyntheticSpec(n_interactions=2000, n_clusters=8, seed=3)).generate(), 3.5),
        [b for b, _ in result.periods],
        PERIOD,
        8,
    )
    png = tl.plot_finetunes(result, [recorded], adaptive, drift, tmp_path / "finetunes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rule_of_the_cli_defaults_to_hybrids_cadence() -> None:
    args = argparse.Namespace(finetune_every=3, drift_min_interval=None, drift_max_interval=None, drift_threshold=0.2)
    assert tl.rule_of(args, PERIOD) == DriftRule(0.2, 3 * PERIOD, 6 * PERIOD)
    args = argparse.Namespace(finetune_every=3, drift_min_interval="30d", drift_max_interval="90d", drift_threshold=0.1)
    assert tl.rule_of(args, PERIOD) == DriftRule(0.1, 30 * DAY, 90 * DAY)
