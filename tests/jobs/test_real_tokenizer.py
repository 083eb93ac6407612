"""The real-tokenizer path end to end: a stand-in for a downloaded Hugging Face model (a BPE tokenizer trained
here, a Qwen2 model, every cluster name several tokens) named by ``model.base`` as a user names a model
directory, through the fine-tune job (inline executor), its gates and the materialized table, to the serving
app answering a table hit and, for a pair the table lacks, ranking online with the multi-token names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from recupdate_workloads.contract.serve import user_config
from recupdate_workloads.data.synthetic import DAY, SyntheticSpec, SyntheticStream
from recupdate_workloads.jobs import run as jobs
from recupdate_workloads.jobs.config import RunConfig
from recupdate_workloads.model.generate import cluster_token_ids
from recupdate_workloads.model.standin import METADATA_FILE, StandinSize, build
from recupdate_workloads.serving.app import make_api
from recupdate_workloads.serving.release import load_release
from recupdate_workloads.serving.service import RecommenderService
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store

SPEC = SyntheticSpec(n_interactions=10_000, n_clusters=14, days=360, period_days=90, drift=0.2, seed=5)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _config(store: Store, tmp_path: Path, base: Path, end_day: int) -> dict:
    end = SPEC.start + end_day * DAY
    return {
        "runId": "hf-ft-1",
        "kind": "finetune",
        "storeSchema": store.schema,
        "window": {"start": end - 180 * DAY, "end": end},
        # exactly what a user writes for a downloaded model: its directory, LoRA targets left to the default
        "model": {"base": str(base), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"positiveThreshold": 3.5},
        "retrieval": {"window": "60d", "topSuccessors": 5, "minSupport": 3, "neighbours": 3},
        "gates": {"minExactMatch": 0.9, "minRecall": 0.015, "maxRegression": 0.05},
        "fineTune": {"hyperparameters": {"epochs": 1, "learningRate": 0.003, "batchSize": 64, "withEvidence": True}},
        "executor": "inline",
        "storage": str(tmp_path / "artifacts"),
    }


async def test_standin_model_through_finetune_gates_table_and_serving(
    store: Store, tmp_path: Path, pg_dsn: str
) -> None:
    t0 = time.perf_counter()
    s = SyntheticStream(SPEC)
    cat.save_catalogue(store, s.catalogue, s.item_cluster)
    cat.append_interactions(store, s.generate())
    catalogue, _ = cat.load_catalogue(store)
    base = build(
        tmp_path / "Qwen2-standin", catalogue, size=StandinSize(hidden=64, intermediate=128), n_documents=600, epochs=2
    )
    meta = json.loads((base / METADATA_FILE).read_text())
    assert meta["architecture"] == "qwen2" and meta["answer_tokens"]["min"] >= 2
    t_base = time.perf_counter()

    cfg = RunConfig.parse(json.dumps(_config(store, tmp_path, base, 270)))
    rel = jobs.run_finetune(store, cfg)
    t_ft = time.perf_counter()
    assert rel.base_model == str(base) and rel.state == "candidate"
    adapter = Path(rel.adapter_uri.removeprefix("file://"))  # type: ignore[union-attr]
    trained = json.loads((adapter / "metrics.json").read_text())
    llama_family = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert trained["lora"]["target_modules"] == llama_family  # found in the model: none was configured
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    g = rel.gates
    assert g["exactMatch"]["value"] >= 0.9, g
    assert g["recall"]["value"] > 0.1 and g["passed"], g
    table = tables.load_table(store, rel.table_version).as_dict()  # type: ignore[arg-type]
    assert len(table) == rel.metrics["pairs"] > 20
    for (c1, c2), ranked in table.items():
        ids = [c for c, _, _ in ranked]
        assert len(ids) == 10 and c1 not in ids and c2 not in ids and len(set(ids)) == 10
        assert all(sc < 0 for _, sc, _ in ranked)  # log-probabilities of several tokens + end-of-text
    reg.activate(store, rel.release_id)

    # the serving app, without Ray, from the registry's release
    uc = user_config(rel.release_id, rel.adapter_uri, rel.table_version, store.schema) | {"online_timeout_ms": 30_000}
    service = RecommenderService(loader=lambda c: load_release(c, {"RECUPDATE_STORE_DSN": pg_dsn}), retry_delays_s=())
    assert await service.reconfigure(uc), service.last_error
    bundle = service.loaded
    assert bundle is not None and bundle.model is not None and cluster_token_ids(bundle.tokenizer, catalogue) is None
    n = len(catalogue)
    missing = [(a, b) for a in range(n) for b in range(n) if a != b and (a, b) not in table]
    assert missing, "every pair is in the table: no miss to answer online"
    hit = next(iter(table))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(service)), base_url="http://t") as c:
        r = await c.post("/recommend", json={"recent_clusters": list(hit), "n": 5})
        assert r.status_code == 200, r.text
        assert [e["id"] for e in r.json()["clusters"]] == [cl for cl, _, _ in table[hit][:5]]
        assert {e["source"] for e in r.json()["clusters"]} == {"model"}
        a, b = missing[0]
        r = await c.post("/recommend", json={"recent_clusters": [catalogue.name(a), catalogue.name(b)], "n": 5})
        assert r.status_code == 200, r.text
        got = r.json()["clusters"]
        assert [e["source"] for e in got] == ["model"] * 5, got  # ranked online, not from evidence or popularity
        ids = [e["id"] for e in got]
        assert len(set(ids)) == 5 and a not in ids and b not in ids
        assert [e["score"] for e in got] == sorted((e["score"] for e in got), reverse=True)
        assert np.isclose(bundle.model_cache[(a, b)][0][1], got[0]["score"], rtol=1e-5)
        info = (await c.get("/release")).json()
        assert info["online_generation"] and info["base_model"] == str(base)
    service.shutdown()
    print(f"stand-in {t_base - t0:.1f}s, fine-tune job {t_ft - t_base:.1f}s, total {time.perf_counter() - t0:.1f}s")
    print(json.dumps({"gates": g, "train_seconds": trained["seconds"], "examples": trained["examples"]}))
