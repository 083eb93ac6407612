"""LoRA through Ray Train: a one-worker TorchTrainer run yields a loadable adapter checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.model.bootstrap import bootstrap, load_base
from recupdate_workloads.model.examples import build_examples
from recupdate_workloads.model.generate import cluster_logprobs
from recupdate_workloads.model.prompt import render
from recupdate_workloads.model.toy import rule_a, rule_b, toy_catalogue, toy_triples
from recupdate_workloads.model.train_loop import ADAPTER_FILE, METRICS_FILE, ensure_ray, load_adapter, run_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CAT = toy_catalogue(8)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    import ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_torchtrainer_one_worker_checkpoint(ray_session, tmp_path: Path) -> None:
    base = bootstrap(
        CAT,
        toy_triples(CAT, 600, rule=rule_b, seed=1),
        None,
        tmp_path / "base",
        size="tiny",
        epochs=1,
        evidence_dropout=1.0,
    )
    ex = build_examples(CAT, toy_triples(CAT, 400, rule=rule_a, seed=2), None, with_evidence=False)
    storage = tmp_path / "ray_results"
    res = run_ray(
        {
            "base_model": str(base),
            "examples": ex,
            "output_dir": str(tmp_path / "adapter"),
            "epochs": 2,
            "lr": 2e-2,
            "seed": 0,
        },
        workers=1,
        cpus_per_worker=1,  # one thread: spinning OpenMP threads crawl on a busy shared box
        storage_path=storage,
    )
    out = Path(res.adapter_dir)
    assert (out / ADAPTER_FILE).exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["examples"] == res.metrics["examples"] == 800 and saved["world_size"] == 1
    assert res.metrics["num_threads"] == 1
    assert res.metrics["wall_seconds"] > res.metrics["seconds"] > 0
    assert str(res.metrics["checkpoint_uri"]).startswith(str(storage))  # persisted under storage_path
    assert any(storage.rglob(ADAPTER_FILE))

    base_model, tok = load_base(base)
    prompts = [render(CAT, a, b, None, False) for a, b in [(0, 1), (3, 6), (7, 2)]]
    before = cluster_logprobs(base_model, tok, CAT, prompts)
    tuned = load_adapter(base_model, out)
    after = cluster_logprobs(tuned, tok, CAT, prompts)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)  # trained (LoRA B starts at zero)
    assert np.abs(after - before).max() > 1e-3  # the adapter changes predictions
