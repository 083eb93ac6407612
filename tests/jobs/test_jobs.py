"""The fine-tune and refresh entrypoints against a real store: runs, candidates, gates, tables."""

import json
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from safetensors.numpy import load_file, save_file

from recupdate_workloads.data.synthetic import DAY, SyntheticSpec, SyntheticStream
from recupdate_workloads.jobs import run as jobs
from recupdate_workloads.jobs.change import table_change
from recupdate_workloads.jobs.config import RunConfig
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store

SPEC = SyntheticSpec(n_interactions=30_000, n_clusters=10, days=360, period_days=90, drift=0.2, seed=5)


@pytest.fixture
def loaded(store: Store) -> Store:
    s = SyntheticStream(SPEC)
    cat.save_catalogue(store, s.catalogue, s.item_cluster)
    cat.append_interactions(store, s.generate())
    return store


def _config(store: Store, tmp_path: Path, run_id: str, kind: str, end_day: int, **extra: object) -> dict:
    end = SPEC.start + end_day * DAY
    return {
        "runId": run_id,
        "kind": kind,
        "storeSchema": store.schema,
        "window": {"start": end - 180 * DAY, "end": end},
        "model": {"base": "", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"positiveThreshold": 3.5},
        "retrieval": {"window": "60d", "topSuccessors": 5, "minSupport": 3, "neighbours": 3},
        "gates": {"minExactMatch": 0.9, "minRecall": 0.015, "maxRegression": 0.05},
        "fineTune": {"hyperparameters": {"epochs": 2, "learningRate": 0.003, "batchSize": 64, "withEvidence": True}},
        "executor": "inline",
        "storage": str(tmp_path / "artifacts"),
        "modelSize": "tiny",
        **extra,
    }


def test_finetune_registers_a_gated_candidate_and_refresh_follows(loaded: Store, tmp_path: Path) -> None:
    cfg = RunConfig.parse(json.dumps(_config(loaded, tmp_path, "p-ft-1", "finetune", 270)))
    rel = jobs.run_finetune(loaded, cfg)
    run = reg.get_run(loaded, "p-ft-1")
    assert run is not None and run.status == "succeeded" and run.cost["examples"] > 100 and run.cost["tokens"] > 0
    assert rel.state == "candidate" and rel.run_id == "p-ft-1"
    assert (Path(rel.adapter_uri.removeprefix("file://")) / "adapter_model.safetensors").exists()  # type: ignore[union-attr]
    g = rel.gates
    assert {"exactMatch", "recall", "passed"} <= set(g)
    assert g["exactMatch"]["value"] >= 0.9 and g["recall"]["value"] > 0.1, g
    table = tables.load_table(loaded, rel.table_version).as_dict()  # type: ignore[arg-type]
    assert len(table) == rel.metrics["pairs"] > 20
    for (c1, c2), ranked in table.items():  # novel clusters only, best first
        assert c1 not in [c for c, _, _ in ranked] and c2 not in [c for c, _, _ in ranked]
        assert [s for _, s, _ in ranked] == sorted((s for _, s, _ in ranked), reverse=True)
    # the controller activates; then a refresh reuses the active adapter with newer evidence
    reg.activate(loaded, rel.release_id)
    rcfg = RunConfig.parse(
        json.dumps(_config(loaded, tmp_path, "p-rf-1", "refresh", 300, activeRelease=rel.release_id))
    )
    ref = jobs.run_refresh(loaded, rcfg)
    assert ref.adapter_uri == rel.adapter_uri and ref.table_version > rel.table_version  # type: ignore[operator]
    assert ref.snapshot_id != rel.snapshot_id and ref.metrics["refreshOf"] == rel.release_id
    assert "regression" in ref.gates  # paired against the active release
    # the change against the active table, stored with the release; the first release had nothing to compare
    assert "change" not in rel.metrics
    change = ref.metrics["change"]
    ids = {k: [c for c, _, _ in v] for k, v in tables.load_table(loaded, ref.table_version).as_dict().items()}  # type: ignore[arg-type]
    old = {k: [c for c, _, _ in v] for k, v in table.items()}
    assert change == table_change(ids, old).as_dict() | {"against": rel.release_id}
    assert change["pairs"] > 0 and 0.0 <= change["top1Changed"] <= 1.0 and 0.0 <= change["top5Overlap"] <= 1.0
    # the fine-tune records what trained its adapter; the refresh measures drift against it (SPEC drifts)
    assert rel.metrics["adapter"] == {
        "run": "p-ft-1",
        "scheduledAt": cfg.window_end,
        "trainStart": cfg.window_start,
        "trainEnd": cfg.holdout_start,
    }
    drift = ref.metrics["drift"]
    assert ref.metrics["adapter"] == rel.metrics["adapter"] and drift["adapterRun"] == "p-ft-1"
    assert drift["measuredAt"] == rcfg.window_end and drift["contexts"] > 10
    assert drift["excess"] == pytest.approx(drift["floorJaccard"] - drift["jaccard"], abs=2e-4)
    assert drift["excess"] > 0.0, drift
    assert reg.active_release(loaded).release_id == rel.release_id  # type: ignore[union-attr]  # jobs never activate


def test_gates_reject_a_broken_adapter(loaded: Store, tmp_path: Path) -> None:
    cfg = RunConfig.parse(json.dumps(_config(loaded, tmp_path, "p-ft-2", "finetune", 270)))
    good = jobs.run_finetune(loaded, cfg)
    assert good.gates["passed"], good.gates
    # Break the adapter: large noise in every LoRA matrix derails generation.
    adapter = Path(good.adapter_uri.removeprefix("file://"))  # type: ignore[union-attr]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    rng = np.random.default_rng(0)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {k: (rng.normal(size=v.shape) * 3).astype(v.dtype) for k, v in weights.items()},
        str(broken / "adapter_model.safetensors"),
    )
    catalogue, _ = cat.load_catalogue(loaded)
    cfg.run_id = "p-ft-broken"
    reg.start_run(loaded, cfg.run_id, "finetune")
    bad = jobs._candidate(loaded, cfg, good.base_model, f"file://{broken}", catalogue, True, {}, {})
    assert not bad.gates["passed"]
    assert bad.gates["exactMatch"]["value"] < good.gates["exactMatch"]["value"]


def test_entrypoint_exit_codes(loaded: Store, tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    # a refresh with no active release fails, is recorded as failed, and exits non-zero
    cfg = _config(loaded, tmp_path, "p-rf-0", "refresh", 300)
    assert jobs.main("refresh", ["--config", json.dumps(cfg)]) == 1
    run = reg.get_run(loaded, "p-rf-0")
    assert run is not None and run.status == "failed" and "active release" in (run.error or "")
    with pytest.raises(ValueError, match="window"):
        RunConfig.parse(json.dumps({"runId": "x"}))


def test_refresh_publishes_atomically_under_a_concurrent_reader(loaded: Store, tmp_path: Path, pg_dsn: str) -> None:
    cfg = RunConfig.parse(json.dumps(_config(loaded, tmp_path, "p-ft-3", "finetune", 240)))
    rel = jobs.run_finetune(loaded, cfg)
    reg.activate(loaded, rel.release_id)
    stop, errors, reads = threading.Event(), [], []

    def reader() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{loaded.schema}", public')
            while not stop.is_set():
                try:
                    v, pairs = conn.execute(
                        "SELECT table_version, pairs FROM transition_tables WHERE state = 'published'"
                        " ORDER BY table_version DESC LIMIT 1"
                    ).fetchone()  # type: ignore[misc]
                    n = conn.execute(f"SELECT count(DISTINCT (c1, c2)) FROM transitions_v{v}").fetchone()[0]  # type: ignore[index]
                    reads.append(v)
                    if n != pairs:
                        errors.append(f"version {v}: {n} of {pairs} pairs")
                except Exception as exc:
                    errors.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i, day in enumerate((250, 260, 270)):
            c = _config(loaded, tmp_path, f"p-rf-{i}", "refresh", day, activeRelease=rel.release_id)
            jobs.run_refresh(loaded, RunConfig.parse(json.dumps(c)))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert len(set(reads)) >= 2  # the reader saw versions change, and every one it saw was whole


def test_config_reads_blend_and_refuses_one_out_of_range(tmp_path: Path) -> None:
    base = {"runId": "x", "window": {"start": 0, "end": 86_400}}
    assert RunConfig.parse(json.dumps(base)).blend == 0.0  # the LLM alone unless the policy says otherwise
    assert RunConfig.parse(json.dumps({**base, "retrieval": {"blend": 0.25}})).blend == 0.25
    with pytest.raises(ValueError, match="blend"):
        RunConfig.parse(json.dumps({**base, "retrieval": {"blend": 2}}))
