"""Ranking by likelihood, free/constrained/beam generation, exact-match mapping on real model output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recupdate_workloads.model.bootstrap import bootstrap, load_base
from recupdate_workloads.model.generate import (
    _multi_token_logprobs,
    answer_token_ids,
    beam_clusters,
    cluster_logprobs,
    cluster_token_ids,
    exact_match_rate,
    generate_names,
    rank_clusters,
)
from recupdate_workloads.model.prompt import render
from recupdate_workloads.model.toy import hit_rate, toy_catalogue, toy_evidence, toy_triples

CAT = toy_catalogue(8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = toy_triples(CAT, 2000, seed=1)
    return bootstrap(
        CAT, t, None, tmp_path_factory.mktemp("gen") / "base", size="tiny", epochs=3, evidence_dropout=1.0, seed=0
    )


@pytest.fixture(scope="module")
def loaded(base: Path):
    return load_base(base)


@pytest.fixture(scope="module")
def test_set():
    t = toy_triples(CAT, 200, seed=9)
    prompts = [render(CAT, int(a), int(b), None, False) for a, b in zip(t.c1, t.c2, strict=True)]
    return t, prompts


def test_rank_clusters_shapes_order_and_calibration(loaded, test_set) -> None:
    model, tok = loaded
    t, prompts = test_set
    assert cluster_token_ids(tok, CAT) is not None
    ids, scores = rank_clusters(model, tok, CAT, prompts, top_n=5, batch_size=32)
    assert ids.shape == (200, 5) and ids.dtype == np.int32 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert all(len(set(r)) == 5 for r in ids.tolist())
    full = cluster_logprobs(model, tok, CAT, prompts)
    assert np.all(full <= 0) and np.all(np.exp(full).sum(1) <= 1 + 1e-5)  # log-probs over the vocabulary
    assert hit_rate(ids, t.c_next, 5) > 0.5  # the base learnt something
    # the pair's own clusters can be excluded
    ex = np.stack([t.c1, t.c2], axis=1)
    ids2, _ = rank_clusters(model, tok, CAT, prompts, top_n=6, exclude=ex)
    assert not np.any(ids2 == t.c1[:, None]) and not np.any(ids2 == t.c2[:, None])


def test_batching_and_left_padding_do_not_change_scores(loaded) -> None:
    model, tok = loaded
    ev = toy_evidence(toy_triples(CAT, 500, seed=3))
    prompts = [render(CAT, 0, 1, None, False), render(CAT, 2, 5, ev.get((2, 5)), True), render(CAT, 3, 4, None, True)]
    together = cluster_logprobs(model, tok, CAT, prompts, batch_size=8)
    alone = np.concatenate([cluster_logprobs(model, tok, CAT, [p]) for p in prompts])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_multi_token_scoring_matches_brute_force(loaded, test_set) -> None:
    """The general path (prompt pass + candidates over the repeated KV cache) equals scoring each full
    sequence on its own; candidates of 1 to 3 tokens, plus EOS."""
    model, tok = loaded
    _, prompts = test_set
    cands = answer_token_ids(tok, CAT)
    cands[1] = cands[1] + cands[2]
    cands[3] = cands[3] + cands[4] + cands[5]
    got = _multi_token_logprobs(model, tok, prompts[:3], cands, batch_size=4)
    eos = tok.eos_token_id
    with torch.no_grad():
        for i, p in enumerate(prompts[:3]):
            pid = tok(p)["input_ids"]
            for j, c in enumerate(cands):
                seq = pid + c + [eos]
                lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], -1)
                want = sum(float(lp[k - 1, seq[k]]) for k in range(len(pid), len(seq)))
                assert got[i, j] == pytest.approx(want, abs=1e-3)


def test_greedy_generation_maps_by_exact_match(loaded, test_set) -> None:
    model, tok = loaded
    _t, prompts = test_set
    names, ids = generate_names(model, tok, CAT, prompts, batch_size=64)
    assert len(names) == 200 and ids.shape == (200,)
    assert exact_match_rate(ids) >= 0.9
    for n, i in zip(names, ids, strict=True):
        assert i == (CAT.lookup(n) if CAT.lookup(n) is not None else -1)
    # greedy agrees with the top-1 of the likelihood ranking (single-token answers)
    top, _ = rank_clusters(model, tok, CAT, prompts, top_n=1)
    ok = ids >= 0
    assert np.mean(ids[ok] == top[ok, 0]) > 0.95
    _, cids = generate_names(model, tok, CAT, prompts[:50], constrained=True)
    assert exact_match_rate(cids) == 1.0


def test_beam_search_top_n(loaded, test_set) -> None:
    model, tok = loaded
    _t, prompts = test_set
    beams = beam_clusters(model, tok, CAT, prompts[:40], num_beams=5)
    assert beams.shape == (40, 5)
    ids, _ = rank_clusters(model, tok, CAT, prompts[:40], top_n=5)
    # the best beam is the most likely cluster
    assert np.mean(beams[:, 0] == ids[:, 0]) > 0.9


def test_broken_adapters_have_low_exact_match(base: Path, test_set) -> None:
    from peft import LoraConfig, get_peft_model

    _, prompts = test_set
    model, tok = load_base(base)
    _, good = generate_names(model, tok, CAT, prompts)
    assert exact_match_rate(good) >= 0.9
    torch.manual_seed(0)
    noisy = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0)
    noisy.eval()
    _, bad = generate_names(noisy, tok, CAT, prompts)
    assert exact_match_rate(bad) < 0.5
