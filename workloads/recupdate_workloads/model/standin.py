"""A stand-in for a downloaded Hugging Face model, for machines that cannot reach a model hub.

``model.base`` names a Hugging Face model id or a directory. Everything past ``from_pretrained`` must then
work for a real tokenizer, where a cluster name is several tokens, and for a real architecture, whose layers
are not named like Llama's. This module builds a directory that exercises exactly that, loaded the way a
downloaded model is:

- a byte-level BPE tokenizer trained here with ``tokenizers`` on the catalogue's text and natural-language
  prompts, split first by Qwen2's pre-tokenizer pattern (GPT-2's for the ``gpt2`` architecture), with
  ``<|endoftext|>`` as its end-of-text and padding token and no BOS, as Qwen2's base models have;
- a small ``Qwen2ForCausalLM`` (or ``GPT2LMHeadModel``) from config, its vocabulary padded to a multiple of
  64 as released models pad theirs;
- every cluster's answer form is at least two tokens: a merge that would make one whole answer form a single
  token is dropped from the trained tokenizer, so the general (multi-token) scoring and decoding paths run for
  every cluster, as they do with a real tokenizer for most names;
- the model is "pretrained" for a few epochs (plain next-token loss over every position) on documents that
  look like the product's prompts followed by a uniformly random novel cluster name and end-of-text. So it
  knows the catalogue's words and the prompt's shape, and nothing of which cluster follows which: that is the
  fine-tune's job, as with a real pretrained model.

``build(out_dir, catalogue)`` writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the
tokenizer files and ``recupdate_standin.json`` with ``save_pretrained``; point ``model.base`` (or a run
config's ``base_model``) at the directory exactly as at a downloaded model. From the command line:

    python -m recupdate_workloads.model.standin OUT_DIR --synthetic 30
    python -m recupdate_workloads.model.standin OUT_DIR --schema movies     # the catalogue of a store schema
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recupdate_workloads.data.types import Catalogue, PairEvidence, Successor
from recupdate_workloads.model.prompt import (
    ANSWER_PREFIX,
    DEFAULT_TOP_R,
    TEMPLATE_VERSION,
    all_answers,
    answer_text,
    prompt_hash,
    render,
)

EOT = "<|endoftext|>"
METADATA_FILE = "recupdate_standin.json"
ARCHS = ("qwen2", "gpt2")
#: Qwen2's pre-tokenizer: letters with one leading non-letter, single digits, punctuation runs, newlines.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: A little text that is not a prompt, so the tokenizer is not one for prompts alone.
GENERAL_TEXT = (
    "A recommender suggests what a user may like next, from what they liked recently.",
    "Interests change over time: new releases appear, and old favourites fade.",
    "The model reads the two most recent interests and names the next new one.",
    "Recent successors are the interests that other users moved to after the same two.",
    "A share is the fraction of those users; a borrowed line comes from a similar pair.",
)


@dataclass(frozen=True)
class StandinSize:
    """The model's shape: small enough to train on one CPU core in seconds."""

    hidden: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 1024


def _random_evidence(catalogue: Catalogue, c1: int, c2: int, rng: np.random.Generator) -> PairEvidence:
    n = len(catalogue)
    others = [c for c in range(n) if c not in (c1, c2)]
    k = int(rng.integers(1, min(DEFAULT_TOP_R, len(others)) + 1))
    picked = rng.choice(others, size=k, replace=False)
    shares = np.sort(rng.dirichlet(np.ones(k + 1))[:k])[::-1]
    succ = tuple(
        Successor(cluster=int(c), share=float(s), count=1, score=float(s), borrowed=bool(rng.random() < 0.2))
        for c, s in zip(picked, shares, strict=True)
    )
    return PairEvidence(c1=c1, c2=c2, support=k, successors=succ)


def documents(catalogue: Catalogue, n: int, seed: int = 0) -> list[str]:
    """``n`` pretraining documents: a prompt for a random pair (a third without an evidence block, a third
    with ``none``, a third with random evidence lines), then a random novel cluster's answer form. No
    transition is learnable from them; the format and the names are."""
    if len(catalogue) < 3:
        raise ValueError("the stand-in needs a catalogue of at least 3 clusters")
    rng = np.random.default_rng(seed)
    size = len(catalogue)
    out: list[str] = []
    for i in range(n):
        c1 = int(rng.integers(0, size))
        c2 = int((c1 + rng.integers(1, size)) % size)
        kind = i % 3
        ev = _random_evidence(catalogue, c1, c2, rng) if kind == 2 else None
        prompt = render(catalogue, c1, c2, ev, with_evidence=kind > 0)
        answer = int(rng.choice([c for c in range(size) if c not in (c1, c2)]))
        out.append(prompt + ANSWER_PREFIX + answer_text(catalogue, answer))
    return out


def catalogue_texts(catalogue: Catalogue) -> list[str]:
    """A line per cluster (answer form, name, description) and every share a prompt can hold."""
    lines = [f"{answer_text(catalogue, c.id)}: {c.name} ({c.description})" for c in catalogue.clusters]
    return [*lines, " ".join(f"{i / 100:.2f}" for i in range(101)), *GENERAL_TEXT]


def _pre_tokenizer(arch: str) -> Any:
    if arch == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _split_answers(tok: Tokenizer, answers: Sequence[str]) -> Tokenizer:
    """The tokenizer without the merges that would turn a whole answer form into one token."""
    whole: set[str] = set()
    for a in answers:
        enc = tok.encode(ANSWER_PREFIX + a, add_special_tokens=False)
        if len(enc.ids) == 1:
            whole.add(enc.tokens[0])
    if not whole:
        return tok
    spec = json.loads(tok.to_str())
    merges = spec["model"]["merges"]
    keep = []
    for m in merges:
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        if left + right not in whole:
            keep.append(m)
    spec["model"]["merges"] = keep  # the tokens stay in the vocabulary, unreachable
    return Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(
    catalogue: Catalogue, texts: Sequence[str], *, arch: str = "qwen2", vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (and the catalogue's), every answer form at least two
    tokens; pads on the left, ``<|endoftext|>`` ends and pads, no BOS."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(arch)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*catalogue_texts(catalogue), *texts], trainer)
    answers = all_answers(catalogue)
    tok = _split_answers(tok, answers)
    single = [a for a in answers if len(tok.encode(ANSWER_PREFIX + a, add_special_tokens=False).ids) < 2]
    if single:
        raise ValueError(f"answer forms {single[:5]} stayed single tokens")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=EOT,
        padding_side="left",
        model_max_length=StandinSize().max_positions,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: Any, *, arch: str = "qwen2", size: StandinSize | None = None, seed: int = 0) -> Any:
    """A randomly initialised model of a real architecture for ``tokenizer``: tied embeddings, the vocabulary
    padded to a multiple of 64 (the extra rows are no token), SDPA attention."""
    s = size or StandinSize()
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    eot = tokenizer.eos_token_id
    torch.manual_seed(seed)
    sdpa: dict[str, Any] = {"attn_implementation": "sdpa"}
    model: Any
    cfg: Any
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            max_position_embeddings=s.max_positions,
            tie_word_embeddings=True,
            bos_token_id=eot,
            eos_token_id=eot,
            **sdpa,
        )
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=s.max_positions,
            n_embd=s.hidden,
            n_layer=s.layers,
            n_head=s.heads,
            n_inner=s.intermediate,
            bos_token_id=eot,
            eos_token_id=eot,
            **sdpa,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHS)}")
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Next-token loss over every position of each text + end-of-text (AdamW, linear warm-up and decay);
    returns the loss per epoch, tokens and seconds."""
    eot = tokenizer.eos_token_id
    seqs = [[*ids, eot] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = max(1, math.ceil(len(seqs) / batch_size) * epochs)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (steps - k) / max(1, steps - warm))
    )
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(seqs))
        total, count = 0.0, 0
        for s in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[s : s + batch_size]]
            t = max(len(x) for x in batch)
            ids = torch.full((len(batch), t), eot, dtype=torch.long)
            mask = torch.zeros((len(batch), t), dtype=torch.long)
            for i, x in enumerate(batch):  # right-padded: positions count from 0 in every row
                ids[i, : len(x)] = torch.as_tensor(x)
                mask[i, : len(x)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            n = int(mask.sum()) - len(batch)
            total += float(out.loss.detach()) * n
            count += n
            tokens += int(mask.sum())
        losses.append(total / max(1, count))
    model.eval()
    return {"epoch_loss": losses, "tokens": tokens, "seconds": time.perf_counter() - t0}


def build(
    out_dir: str | os.PathLike[str],
    catalogue: Catalogue,
    *,
    arch: str = "qwen2",
    size: StandinSize | None = None,
    vocab_size: int = 1024,
    n_documents: int = 3000,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-3,
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Build the stand-in for ``catalogue`` in ``out_dir`` (tokenizer, model, metadata; see the module
    docstring) and return the directory. Deterministic for a seed on one machine."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    prev = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        docs = documents(catalogue, n_documents, seed)
        tokenizer = train_tokenizer(catalogue, docs, arch=arch, vocab_size=vocab_size)
        model = build_model(tokenizer, arch=arch, size=size, seed=seed)
        stats = pretrain(model, tokenizer, docs, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    finally:
        torch.set_num_threads(prev)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    lengths = [len(x) for x in tokenizer([ANSWER_PREFIX + a for a in all_answers(catalogue)])["input_ids"]]
    meta = {
        "architecture": model.config.model_type,
        "size": asdict(size or StandinSize()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": model.config.vocab_size,
        "clusters": len(catalogue),
        "answer_tokens": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
        "documents": len(docs),
        "prompt_hash": prompt_hash(),
        "template_version": TEMPLATE_VERSION,
        "seed": seed,
        **{f"pretrain_{k}": v for k, v in stats.items()},
        "seconds": time.perf_counter() - t0,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _catalogue(args: argparse.Namespace) -> Catalogue:
    if args.synthetic:
        from recupdate_workloads.data.synthetic import synthetic_catalogue

        return synthetic_catalogue(args.synthetic)
    if args.toy:
        from recupdate_workloads.model.toy import toy_catalogue

        return toy_catalogue(args.toy)
    from recupdate_workloads.store.catalogue import load_catalogue
    from recupdate_workloads.store.db import open_store

    store = open_store(args.schema, data_dir=args.store_dir)
    try:
        catalogue, _ = load_catalogue(store)
    finally:
        store.close()
    if not len(catalogue):
        raise SystemExit(f"schema {args.schema} has no catalogue")
    return catalogue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recupdate_workloads.model.standin",
        description="Build a stand-in for a downloaded Hugging Face model (BPE tokenizer + Qwen2 or GPT-2) in "
        "a directory, for model.base on machines without a model hub.",
    )
    p.add_argument("out_dir", help="the directory to write (model.base then names it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="the synthetic catalogue of N clusters")
    src.add_argument("--toy", type=int, metavar="N", help="the toy catalogue of N clusters (tests)")
    src.add_argument("--schema", help="the catalogue of this store schema ($RECUPDATE_STORE_DSN or --store-dir)")
    p.add_argument("--store-dir", default=None, help="embedded PostgreSQL dir when $RECUPDATE_STORE_DSN is unset")
    p.add_argument("--arch", choices=ARCHS, default="qwen2")
    p.add_argument("--hidden", type=int, default=StandinSize.hidden)
    p.add_argument("--layers", type=int, default=StandinSize.layers)
    p.add_argument("--intermediate", type=int, default=StandinSize.intermediate, help="MLP width")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (at most)")
    p.add_argument("--documents", type=int, default=3000, help="pretraining documents")
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = StandinSize(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)
    out = build(
        args.out_dir,
        _catalogue(args),
        arch=args.arch,
        size=size,
        vocab_size=args.vocab_size,
        n_documents=args.documents,
        epochs=args.epochs,
        seed=args.seed,
    )
    meta = json.loads((out / METADATA_FILE).read_text())
    print(json.dumps({"dir": str(out.absolute()), **{k: meta[k] for k in ("architecture", "parameters")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
