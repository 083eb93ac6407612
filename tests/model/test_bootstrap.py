"""The word-level tokenizer, the bootstrapped base model, and loading it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recupdate_workloads.model.bootstrap import (
    METADATA_FILE,
    bootstrap,
    build_model,
    build_tokenizer,
    load_base,
)
from recupdate_workloads.model.examples import build_examples
from recupdate_workloads.model.prompt import ANSWER_PREFIX, all_answers, prompt_hash, render
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples
from recupdate_workloads.model.training import answer_batch_loss, encode_examples, left_pad

CAT = toy_catalogue(8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tokenizer_covers_prompts_and_answers_are_single_tokens() -> None:
    tok = build_tokenizer(CAT)
    t = toy_triples(CAT, 300, seed=0)
    ev = toy_evidence(t)
    ex = build_examples(CAT, t, ev, evidence_dropout=0.3)
    ids = tok(ex.prompts)["input_ids"]
    assert all(tok.unk_token_id not in x for x in ids)
    assert all(x[0] == tok.bos_token_id for x in ids)
    answer_ids = tok([ANSWER_PREFIX + a for a in all_answers(CAT)], add_special_tokens=False)["input_ids"]
    assert [len(a) for a in answer_ids] == [1] * len(CAT)
    # clusters sit at contiguous ids after the 4 special tokens, in cluster order
    assert [a[0] for a in answer_ids] == list(range(4, 4 + len(CAT)))
    assert tok.decode(answer_ids[3]) == all_answers(CAT)[3]
    assert tok.padding_side == "left"
    # case-insensitive input
    assert tok("NEXT New interest:")["input_ids"] == tok("next new interest:")["input_ids"]


def test_save_load_round_trip_same_ids_and_logits(tmp_path) -> None:
    tok = build_tokenizer(CAT)
    model = build_model(len(tok), tok, "tiny", seed=3)
    model.eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = load_base(tmp_path)
    prompts = [render(CAT, a, b, None, False) for a, b in [(0, 1), (5, 2), (7, 6)]]
    ids1 = tok(prompts)["input_ids"]
    assert tok2(prompts)["input_ids"] == ids1
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tok2.padding_side == "left"
    x, m, p = left_pad(ids1, tok.pad_token_id)
    with torch.no_grad():
        l1 = model(input_ids=x, attention_mask=m, position_ids=p).logits
        l2 = model2(input_ids=x, attention_mask=m, position_ids=p).logits
    torch.testing.assert_close(l1, l2)


def test_bootstrap_trains_and_records_metadata(tmp_path) -> None:
    t = toy_triples(CAT, 1200, seed=0, noise=0.1)
    ev = toy_evidence(t)
    out = bootstrap(CAT, t, ev, tmp_path / "base", size="tiny", epochs=2, seed=0)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["prompt_hash"] == prompt_hash()
    assert meta["clusters"] == 8 and meta["examples"] == 1200
    assert meta["epoch_loss"][1] < meta["epoch_loss"][0]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model, _tok = load_base(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64


def test_answer_loss_matches_full_logits_cross_entropy() -> None:
    """Logits only at the answer positions (left padding, logits_to_keep) give the same loss as masking
    full-sequence logits; answers of different lengths included."""
    tok = build_tokenizer(CAT)
    model = build_model(len(tok), tok, "tiny", seed=1).eval()
    prompts = [render(CAT, 0, 1, None, False), render(CAT, 2, 3, None, True), "next new interest:"]
    answers = ["animation_comedy", "drama fantasy horror", "dark light"]
    enc = encode_examples(tok, prompts, answers)
    assert enc.answer_lens == [2, 4, 3]  # answer tokens + EOS
    with torch.no_grad():
        loss, n = answer_batch_loss(model, enc.sequences, enc.answer_lens, tok.pad_token_id, torch.device("cpu"))
        total, count = 0.0, 0
        for seq, a in zip(enc.sequences, enc.answer_lens, strict=True):
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            lp = torch.log_softmax(logits, -1)
            for pos in range(len(seq) - a, len(seq)):
                total -= float(lp[pos - 1, seq[pos]])
                count += 1
    assert n == count == 9
    assert float(loss) == pytest.approx(total, rel=1e-4)


def test_left_pad_positions_count_real_tokens() -> None:
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert np.array_equal(pos[1, -1:].numpy(), [0])
