"""LoRA fine-tuning through the in-process executor: it learns, it saves an adapter, it loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.model.bootstrap import bootstrap, load_base
from recupdate_workloads.model.examples import Examples, build_examples
from recupdate_workloads.model.generate import exact_match_rate, generate_names, rank_clusters
from recupdate_workloads.model.prompt import render
from recupdate_workloads.model.toy import hit_rate, rule_shift, toy_catalogue, toy_triples
from recupdate_workloads.model.train_loop import ADAPTER_FILE, METRICS_FILE, load_adapter, run_inline

CAT = toy_catalogue(8)
OLD, NEW = rule_shift(1), rule_shift(3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base that learnt an OLD transition rule (c2 + 1), without evidence."""
    t = toy_triples(CAT, 1500, rule=OLD, seed=1)
    return bootstrap(
        CAT, t, None, tmp_path_factory.mktemp("lora") / "base", size="tiny", epochs=2, evidence_dropout=1.0, seed=0
    )


def _eval(model, tok, rule) -> tuple[float, float, float]:
    t = toy_triples(CAT, 300, rule=rule, seed=99)  # held out: other users and times than training
    prompts = [render(CAT, int(a), int(b), None, False) for a, b in zip(t.c1, t.c2, strict=True)]
    ids, _ = rank_clusters(model, tok, CAT, prompts, top_n=5)
    _, gen = generate_names(model, tok, CAT, prompts)
    return hit_rate(ids, t.c_next, 1), hit_rate(ids, t.c_next, 5), exact_match_rate(gen)


def test_lora_learns_the_new_rule(base: Path, tmp_path: Path) -> None:
    """The world moved to a NEW rule; fine-tuning on NEW triples (10% noise) lifts HR@1 and HR@5 on held-out
    NEW triples well above the untrained adapter (LoRA B = 0: exactly the base)."""
    train = toy_triples(CAT, 1000, rule=NEW, seed=2, noise=0.1)
    ex = build_examples(CAT, train, None, with_evidence=False)
    model, tok = load_base(base)
    hr1_0, hr5_0, _ = _eval(model, tok, NEW)

    cfg = {
        "base_model": str(base),
        "examples": ex.to_records(),
        "output_dir": str(tmp_path / "adapter"),
        "epochs": 6,
        "lr": 2e-2,
        "batch_size": 64,
        "lora": {"r": 8, "alpha": 16},
        "seed": 0,
    }
    res = run_inline(cfg)
    out = Path(res.adapter_dir)
    assert (out / ADAPTER_FILE).exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()  # adapter only
    assert (out / ADAPTER_FILE).stat().st_size < 200_000
    m = res.metrics
    assert m["examples"] == 1000 * 6 and m["tokens"] > m["examples"] * 20
    assert m["epoch_loss"][-1] < m["epoch_loss"][0]
    assert m["seconds"] > 0 and m["cpu_seconds"] > 0 and m["wall_seconds"] >= m["seconds"]
    assert json.loads((out / METRICS_FILE).read_text())["examples"] == m["examples"]

    tuned = load_adapter(load_base(base)[0], out)
    hr1, hr5, em = _eval(tuned, tok, NEW)
    assert hr1 >= hr1_0 + 0.4, (hr1_0, hr1)
    assert hr5 >= hr5_0 + 0.15, (hr5_0, hr5)
    assert hr1 >= 0.6 and em >= 0.9
    # an untrained adapter is the base
    untrained = run_inline({**cfg, "epochs": 0, "output_dir": str(tmp_path / "untrained")})
    assert _eval(load_adapter(load_base(base)[0], untrained.adapter_dir), tok, NEW)[:2] == (hr1_0, hr5_0)


def test_examples_from_jsonl_and_merged_adapter(base: Path, tmp_path: Path) -> None:
    train = toy_triples(CAT, 200, rule=NEW, seed=5)
    path = build_examples(CAT, train, None, with_evidence=False).save_jsonl(tmp_path / "ex.jsonl")
    assert len(Examples.load(path)) == 200
    res = run_inline(
        {"base_model": str(base), "examples_path": str(path), "output_dir": str(tmp_path / "a"), "epochs": 1}
    )
    assert res.metrics["examples"] == 200
    base_model, tok = load_base(base)
    prompts = [render(CAT, 0, 1, None, False), render(CAT, 4, 2, None, False)]
    peft_model = load_adapter(base_model, res.adapter_dir)
    _, s1 = rank_clusters(peft_model, tok, CAT, prompts, top_n=8)
    merged = load_adapter(str(base), res.adapter_dir, merge=True)
    _, s2 = rank_clusters(merged, tok, CAT, prompts, top_n=8)
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="base_model"):
        run_inline({"examples": [], "output_dir": "/tmp/x"})
    with pytest.raises(ValueError, match="examples"):
        run_inline({"base_model": "/nowhere", "output_dir": "/tmp/x"})
