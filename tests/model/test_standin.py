"""The stand-in for a downloaded Hugging Face model: a BPE tokenizer trained here and a Qwen2 (or GPT-2) model,
loaded back with ``from_pretrained`` like any model directory; multi-token scoring and trie-constrained
decoding on it; LoRA targets found per architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from recupdate_workloads.model.bootstrap import load_base
from recupdate_workloads.model.examples import build_examples
from recupdate_workloads.model.generate import (
    _multi_token_logprobs,
    _multi_token_logprobs_repeat,
    answer_token_ids,
    cluster_logprobs,
    cluster_token_ids,
    exact_match_rate,
    generate_names,
    rank_clusters,
)
from recupdate_workloads.model.hf import linear_module_names, lora_target_modules, resolve_dtype
from recupdate_workloads.model.prompt import ANSWER_PREFIX, all_answers, render
from recupdate_workloads.model.standin import METADATA_FILE, StandinSize, build, build_model, main, train_tokenizer
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples
from recupdate_workloads.model.train_loop import load_adapter, run_inline

CAT = toy_catalogue(8)
TINY = StandinSize(hidden=64, intermediate=128)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("standin") / "qwen2", CAT, size=TINY, n_documents=600, epochs=3)


@pytest.fixture(scope="module")
def loaded(standin: Path):
    return load_base(standin)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    t = toy_triples(CAT, 40, seed=9)
    ev = toy_evidence(toy_triples(CAT, 400, seed=3))
    return [
        render(CAT, int(a), int(b), ev.get((int(a), int(b))), i % 2 == 0)
        for i, (a, b) in enumerate(zip(t.c1, t.c2, strict=True))
    ]


def test_directory_loads_like_a_downloaded_model(standin: Path, prompts: list[str]) -> None:
    meta = json.loads((standin / METADATA_FILE).read_text())
    assert meta["pretrain_epoch_loss"][-1] < meta["pretrain_epoch_loss"][0]
    model = AutoModelForCausalLM.from_pretrained(standin)
    tok = AutoTokenizer.from_pretrained(standin)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_key_value_heads == 2
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok) > 256
    # AutoTokenizer (which picks the architecture's tokenizer class) encodes as the trained tokenizer.json
    raw = Tokenizer.from_file(str(standin / "tokenizer.json"))
    ids = tok(prompts, add_special_tokens=True)["input_ids"]
    assert ids == [e.ids for e in raw.encode_batch(prompts)]
    assert tok.bos_token_id is None and all(x[0] != tok.eos_token_id for x in ids)  # no BOS, as Qwen2's base
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    answers = answer_token_ids(tok, CAT)
    assert min(len(a) for a in answers) >= 2 and cluster_token_ids(tok, CAT) is None
    for a, form in zip(answers, all_answers(CAT), strict=True):
        assert tok.decode(a) == ANSWER_PREFIX + form and CAT.lookup(tok.decode(a)) is not None
    # the whole prompt is covered by learnt merges, not spelt out byte by byte
    assert np.mean([len(x) for x in ids]) < 0.5 * np.mean([len(p) for p in prompts])


def test_multi_token_scores_are_full_sequence_log_likelihoods(loaded, prompts: list[str]) -> None:
    model, tok = loaded
    got = cluster_logprobs(model, tok, CAT, prompts[:3], batch_size=2)
    eos = tok.eos_token_id
    with torch.no_grad():
        for i, p in enumerate(prompts[:3]):
            pid = tok(p)["input_ids"]
            for j, c in enumerate(answer_token_ids(tok, CAT)):
                seq = pid + c + [eos]
                lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
                want = sum(float(lp[k - 1, seq[k]]) for k in range(len(pid), len(seq)))
                assert got[i, j] == pytest.approx(want, abs=1e-3)
    # batching and left padding change nothing
    together = cluster_logprobs(model, tok, CAT, prompts[:6], batch_size=8)
    alone = np.concatenate([cluster_logprobs(model, tok, CAT, [p]) for p in prompts[:6]])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert np.all(np.exp(together).sum(1) <= 1 + 1e-5)


def test_prefix_tree_pass_equals_one_row_per_candidate(loaded, prompts: list[str]) -> None:
    """Shared prefixes computed once over the prompt's cache (4D mask) give what scoring every candidate in
    its own row over a copy of the cache gives; also for a candidate that is a prefix of another, and with
    prompts split over several steps."""
    model, tok = loaded
    answers = answer_token_ids(tok, CAT)
    cands = [*answers, answers[0][:1], answers[0] + answers[1], answers[2] + answers[2][1:]]
    tree = _multi_token_logprobs(model, tok, prompts[:7], cands, batch_size=3)
    rows = _multi_token_logprobs_repeat(model, tok, prompts[:7], cands, batch_size=3)
    np.testing.assert_allclose(tree, rows, atol=1e-4)


def test_ranking_and_trie_constrained_decoding(loaded, prompts: list[str]) -> None:
    model, tok = loaded
    ex = np.array([[0, 1]] * len(prompts))
    ids, scores = rank_clusters(model, tok, CAT, prompts, top_n=4, exclude=ex)
    assert ids.shape == (len(prompts), 4) and not np.isin(ids, [0, 1]).any()
    assert np.all(np.diff(scores, axis=1) <= 0)
    names, cids = generate_names(model, tok, CAT, prompts, constrained=True)
    assert exact_match_rate(cids) == 1.0 and all(n in all_answers(CAT) for n in names)
    # the pretrained stand-in already answers with a name, free: what the exact-match gate measures
    _, free = generate_names(model, tok, CAT, prompts)
    assert exact_match_rate(free) >= 0.9
    # constrained greedy follows the trie: its first token is the best of the names' first tokens
    answers = answer_token_ids(tok, CAT)
    firsts = sorted({a[0] for a in answers})
    with torch.no_grad():
        for p, c in zip(prompts[:10], cids[:10], strict=True):
            last = model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
            assert answers[c][0] == firsts[int(torch.argmax(last[firsts]))]


def test_lora_targets_per_architecture(tmp_path: Path) -> None:
    tok = train_tokenizer(CAT, ["User interests: a then b."], vocab_size=300)
    qwen = build_model(tok, arch="qwen2", size=TINY)
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert linear_module_names(qwen) == names
    assert lora_target_modules(qwen, None) == lora_target_modules(qwen, "all-linear") == names
    assert lora_target_modules(qwen, ["self_attn.q_proj", "v_proj"]) == ["self_attn.q_proj", "v_proj"]
    gpt2 = build_model(train_tokenizer(CAT, ["x"], arch="gpt2", vocab_size=300), arch="gpt2", size=TINY)
    assert lora_target_modules(gpt2, []) == ["c_attn", "c_fc", "c_proj"]  # Conv1D layers, the head left out
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not linear layers of this gpt2 model.*c_attn"):
        lora_target_modules(gpt2, ["q_proj", "c_attn"])
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_gpt2_standin_from_the_cli_fine_tunes_with_auto_targets(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpt2"
    assert (
        main([str(out), "--toy", "8", "--arch", "gpt2", "--hidden", "48", "--documents", "300", "--epochs", "1"]) == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["architecture"] == "gpt2" and printed["dir"] == str(out.absolute())
    model, tok = load_base(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and cluster_token_ids(tok, CAT) is None
    prompts = [render(CAT, 0, 1, None, False), render(CAT, 4, 2, None, False), render(CAT, 7, 3, None, False)]
    before = cluster_logprobs(model, tok, CAT, prompts)
    alone = np.concatenate([cluster_logprobs(model, tok, CAT, [p]) for p in prompts])
    np.testing.assert_allclose(before, alone, atol=1e-4)  # absolute positions under left padding
    cands = answer_token_ids(tok, CAT)
    rows = _multi_token_logprobs_repeat(model, tok, prompts, cands, batch_size=2)
    np.testing.assert_allclose(before, rows, atol=1e-4)  # the prefix tree under GPT-2's attention too
    ex = build_examples(CAT, toy_triples(CAT, 200, seed=4), None, with_evidence=False)
    res = run_inline(
        {"base_model": str(out), "examples": ex.to_records(), "output_dir": str(tmp_path / "a"), "epochs": 1}
    )
    assert res.metrics["lora"]["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    tuned = load_adapter(load_base(out)[0], res.adapter_dir, merge=True)
    after = cluster_logprobs(tuned, tok, CAT, prompts)
    assert not np.allclose(before, after, atol=1e-3)  # the adapter moved the scores
    _, cids = generate_names(tuned, tok, CAT, prompts, constrained=True)
    assert exact_match_rate(cids) == 1.0
