import json
import time
from pathlib import Path

import numpy as np

from recupdate_operator.cli import main
from recupdate_workloads.data.sequences import triples
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.replay import core as rp
from recupdate_workloads.replay.drift import drift
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store.db import Store

DAY = 86_400


def _run(store: Store, drift_amount: float) -> dict[str, rp.StrategyResult]:
    changes = 3 if drift_amount else 0  # trends and late clusters are drift too: none in the stable run
    spec = SyntheticSpec(
        n_interactions=40_000,
        n_clusters=20,
        drift=drift_amount,
        n_trends=changes,
        n_late_clusters=changes,
        days=450,
        period_days=90,
        seed=11,
    )
    s = SyntheticStream(spec)
    log = s.generate()
    cat.save_catalogue(store, s.catalogue, s.item_cluster)
    config = rp.ReplayConfig(period=90 * DAY, window=90 * DAY, train_periods=1, bootstrap=300, min_support=3)
    t = triples(log, 3.5)
    strategies = [rp.CountsStrategy("static", False), rp.CountsStrategy("counts", True), rp.PopularStrategy()]
    result = rp.replay(
        t, s.catalogue, strategies, config, rp.store_evidence(store, t, s.catalogue, config), progress=False
    )
    return {r.name: r for r in result.strategies}


def test_counts_beats_static_under_drift_but_not_without(store: Store) -> None:
    drifting = _run(store, 0.6)
    lo, _ = drifting["counts"].ci95_hr5_vs_static  # type: ignore[misc]
    assert lo > 0.0, "refreshing evidence must beat a frozen table when the data drifts"
    assert drifting["counts"].hr5 > drifting["popular"].hr5
    stable = _run(store, 0.0)
    # with no drift a frozen table is as good as a fresh one: the gain is not a constant of the harness
    assert abs(stable["counts"].diff_hr5_vs_static) < 0.02  # type: ignore[arg-type]
    assert stable["counts"].diff_hr5_vs_static < drifting["counts"].diff_hr5_vs_static - 0.05  # type: ignore[operator]


def test_paired_bootstrap_detects_known_difference() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 10)
    a = rng.random(2000) < 0.6
    b = rng.random(2000) < 0.4
    diff, (lo, hi) = rp.paired_bootstrap(users, a, b, 500, 0)
    assert lo < diff < hi and lo > 0.1 and hi < 0.3
    same, (lo, hi) = rp.paired_bootstrap(users, a, a, 500, 0)
    assert same == 0.0 and lo == hi == 0.0


def test_drift_detects_drift_above_noise() -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=60_000, n_clusters=10, drift=0.8, seed=2))
    t = triples(s.generate(), 3.5)
    observed, floor = drift(t, 10, 90 * DAY, min_support=20)
    assert observed.comparisons > 50
    assert observed.mean < floor.mean - 0.05
    s0 = SyntheticStream(
        SyntheticSpec(n_interactions=60_000, n_clusters=10, drift=0.0, n_trends=0, n_late_clusters=0, seed=2)
    )
    observed0, floor0 = drift(triples(s0.generate(), 3.5), 10, 90 * DAY, min_support=20)
    assert abs(observed0.mean - floor0.mean) < 0.05


def test_replay_cli_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    rc = main(["replay", "--interactions", "20000", "--no-progress", "--bootstrap", "100", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "static" in printed and "counts" in printed and "hr5.png" in printed
    assert "ΔHR@5 per CPU-hour" in printed.split("results:")[1]  # the cost-quality table, beside the plot
    data = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in data["strategies"]] == ["static", "counts", "popular"]
    assert (out / "hr5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _SharesWork(rp.PopularStrategy):
    """Popular, plus one piece of shared work on its first update (as the LLM strategies' bootstrap)."""

    def __init__(self, name: str, shared: list[bool]) -> None:
        super().__init__()
        self.name, self.shared = name, shared

    def update(self, ctx: rp.UpdateContext) -> None:
        super().update(ctx)
        if not self.shared:
            self.shared.append(True)
            t0 = time.perf_counter()
            time.sleep(0.3)
            ctx.shared_cost["wall_seconds"] = time.perf_counter() - t0


def test_shared_work_is_reported_apart_not_charged_to_the_first_strategy() -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=5_000, n_clusters=8, days=270, period_days=90, seed=2))
    config = rp.ReplayConfig(period=90 * DAY, window=90 * DAY, train_periods=1, bootstrap=50)
    t = triples(s.generate(), 3.5)
    flag: list[bool] = []
    result = rp.replay(
        t, s.catalogue, [_SharesWork("a", flag), _SharesWork("b", flag)], config, lambda start, end: {}, progress=False
    )
    a, b = result.strategies
    assert result.shared_cost["wall_seconds"] >= 0.3
    assert a.wall_seconds < 0.2 and b.wall_seconds < 0.2  # the 0.3 s sleep is in neither row
    assert "bootstrap" in rp.format_table(result)


class _TwoRows(rp.PopularStrategy):
    """One update, two rows: popular, and its ranking reversed (as an LLM strategy alone and blended)."""

    name = "two"
    variants = ("two", "two+rev")

    def predict_variants(self, c1: np.ndarray, c2: np.ndarray, n: int) -> dict[str, np.ndarray]:
        fwd = rp.EvidenceTable({}, self.popular).predict(c1, c2, n)
        rev = rp.EvidenceTable({}, self.popular[::-1].copy()).predict(c1, c2, n)
        return {"two": fwd, "two+rev": rev}


def test_a_strategy_with_variants_is_scored_once_per_row() -> None:
    s = SyntheticStream(SyntheticSpec(n_interactions=8_000, n_clusters=12, days=270, period_days=90, seed=3))
    config = rp.ReplayConfig(period=90 * DAY, window=90 * DAY, train_periods=1, bootstrap=50)
    t = triples(s.generate(), 3.5)
    strategies = [rp.CountsStrategy("static", False), rp.PopularStrategy(), _TwoRows()]
    ev = {}
    result = rp.replay(t, s.catalogue, strategies, config, lambda a, b: ev, progress=False)
    rows = {r.name: r for r in result.strategies}
    assert list(rows) == ["static", "popular", "two", "two+rev"]
    assert rows["two"].hr5 == rows["popular"].hr5  # the first variant is popular itself
    assert rows["two+rev"].hr5 < rows["two"].hr5  # the reversed ranking is scored on its own
    assert rows["two+rev"].diff_hr5_vs_static is not None and rows["two+rev"].ci95_hr5_vs_static is not None
    assert rows["two+rev"].cpu_seconds == rows["two"].cpu_seconds  # one update, charged to each row
    assert "two+rev" in rp.format_table(result)


def test_replay_cli_runs_the_llm_strategies_with_their_shared_base(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "replay",
        "--interactions",
        "5000",
        "--strategies",
        "static,rag,hybrid",
        "--finetune-every",
        "2",
        "--executor",
        "inline",
        "--model-size",
        "tiny",
        "--bootstrap-epochs",
        "1",
        "--epochs",
        "1",
        "--bootstrap",
        "50",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {s["name"]: s for s in data["strategies"]}
    assert data["shared_cost"]["cpu_seconds"] > 0  # the base was bootstrapped once, and reported apart
    assert rows["rag"]["extra"]["finetunes"] == 1.0  # rag: one adapter, evidence refreshed every period
    assert rows["rag"]["extra"]["refreshes"] == len(data["periods"])
    assert rows["hybrid"]["extra"]["finetunes"] > 1.0
    assert rows["hybrid"]["extra"]["training_tokens"] > rows["rag"]["extra"]["training_tokens"] > 0
    # every LLM row twice: the model alone, and blended with the evidence (--blend, default 0.5)
    assert {"rag+blend0.5", "hybrid+blend0.5"} <= set(rows)
    assert rows["rag+blend0.5"]["extra"] == rows["rag"]["extra"]
