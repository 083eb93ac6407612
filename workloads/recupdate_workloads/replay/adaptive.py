"""The `adaptive` replay strategy: fine-tunes when measured drift calls for it (fineTune.onDrift).

At every boundary it refreshes evidence, as hybrid does, and measures the drift of the evidence window
against the window its adapter was trained on (data/drift.py, as a refresh does). It fine-tunes when the
drift rule fires at or before the boundary: the same function the operator's planner calls
(contract/drift.py). Replay is discrete, so a fire between two boundaries waits for the next one.

Its options, the rule they make and the figure of fine-tunes over time are in replay/timeline.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recupdate_workloads.contract.drift import DriftRule, drift_fire
from recupdate_workloads.data.drift import MIN_SUPPORT, window_drift
from recupdate_workloads.replay.core import UpdateContext
from recupdate_workloads.replay.llm import LLMStrategy, _Shared
from recupdate_workloads.replay.llm import build as build_llm
from recupdate_workloads.replay.timeline import rule_of


@dataclass
class Measurement:
    boundary: int
    excess: float | None
    contexts: int
    fired: str | None  # the rule's reason, when it fine-tuned here


class AdaptiveStrategy(LLMStrategy):
    """Hybrid's evidence refresh every period; a fine-tune only when the drift rule fires."""

    def __init__(
        self,
        shared: _Shared,
        workdir: Path,
        rule: DriftRule,
        executor: str,
        epochs: float,
        min_support: int = MIN_SUPPORT,
    ) -> None:
        super().__init__("adaptive", shared, workdir, None, True, executor, epochs)
        self.rule = rule
        self.min_support = min_support
        self.trained_at: int | None = None  # the boundary of the last fine-tune
        self.trained_window: tuple[int, int] | None = None
        self.measurements: list[Measurement] = []
        self._fire = False

    def _due(self, period: int) -> bool:
        return self.adapter is None or self._fire

    def update(self, ctx: UpdateContext) -> None:
        self._fire = False
        reason: str | None = None  # why it fine-tunes here: initial, drift or maxInterval
        measured = None
        cfg = ctx.config
        if self.trained_window is not None:
            ref_start, ref_end = self.trained_window
            new_start = ctx.boundary - cfg.window
            # Disjoint windows, as a refresh measures: the reference stops where the new window begins.
            ref = ctx.history.window(ref_start, min(ref_end, new_start))
            measured = window_drift(
                ref, ctx.history.window(new_start, ctx.boundary), len(ctx.catalogue), self.min_support
            )
            fire = drift_fire(self.rule, self.trained_at, ctx.boundary, measured.excess)
            if fire is not None and fire.at <= ctx.boundary:
                self._fire, reason = True, fire.reason
        elif self.adapter is None:
            reason = "initial"
        super().update(ctx)
        if reason is not None:
            self.trained_at = ctx.boundary
            self.trained_window = (ctx.boundary - cfg.period * cfg.train_periods, ctx.boundary)
        self.measurements.append(
            Measurement(
                ctx.boundary,
                measured.excess if measured else None,
                measured.contexts if measured else 0,
                reason,
            )
        )


def build(args: argparse.Namespace, workdir: Path, store: Any, period: int) -> AdaptiveStrategy:
    """`adaptive` for `recupdate replay`, on the base the other LLM strategies share (replay.llm caches it
    per workdir: asking it for a strategy is how to reach it)."""
    shared = build_llm("rag", args, workdir, store).shared
    rule = rule_of(args, period)
    executor, epochs = getattr(args, "executor", "ray"), getattr(args, "epochs", None) or 2.0
    return AdaptiveStrategy(shared, workdir, rule, executor, epochs, getattr(args, "drift_min_support", MIN_SUPPORT))
