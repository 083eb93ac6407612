"""A base model for machines that cannot reach a model hub, and loading of any base model.

``bootstrap`` builds a word-level tokenizer whose vocabulary is exactly what prompts can hold (template words,
cluster keywords, share tokens, special tokens) with every cluster's answer form as ONE token, then a small
``LlamaForCausalLM`` from config, trains it (full parameters) on historical triples rendered as prompts, and
saves both with ``save_pretrained``. Because an answer is one token, ranking all clusters for a prompt is one
forward pass (generate.py). ``load_base`` loads this directory, or any causal LM + tokenizer (a local path, or
a hub id where a hub is reachable), the same way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from recupdate_workloads.data.types import Catalogue, PairEvidence, Successor, Triples
from recupdate_workloads.model.examples import RELABEL, EvidenceLookup, build_examples
from recupdate_workloads.model.prompt import (
    BORROWED_MARK,
    NO_EVIDENCE,
    TEMPLATE_VERSION,
    all_answers,
    prompt_hash,
    render,
)
from recupdate_workloads.model.training import encode_examples, fit

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
#: Words inside a whitespace-free chunk: a decimal number, a word (letters, digits, underscore), or one
#: punctuation character.
_WORD_PATTERN = r"\d+\.\d+|\w+|[^\w\s]"
METADATA_FILE = "recupdate_bootstrap.json"


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 512


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=64, layers=1, heads=2, intermediate=128),
    "small": ModelSize(hidden=128, layers=2, heads=4, intermediate=256),
    "medium": ModelSize(hidden=256, layers=4, heads=4, intermediate=512),
}


def _bare_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def _words(tok: Tokenizer, text: str) -> list[str]:
    assert tok.normalizer is not None and tok.pre_tokenizer is not None
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]


def vocabulary_texts(catalogue: Catalogue) -> list[str]:
    """Every text whose words the vocabulary must hold: prompts with and without evidence (one that names
    every cluster, borrowed marks included), descriptions, answers and every share 0.00..1.00."""
    n = len(catalogue)
    succ = tuple(Successor(cluster=c, share=0.5, count=1, score=0.5, borrowed=c % 2 == 1) for c in range(n))
    ev = PairEvidence(c1=0, c2=min(1, n - 1), support=n, successors=succ)
    texts = [
        render(catalogue, 0, min(1, n - 1), ev, True, top_r=n),
        render(catalogue, 0, min(1, n - 1), None, True),
        render(catalogue, 0, min(1, n - 1), None, False),
        BORROWED_MARK,
        NO_EVIDENCE,
    ]
    texts += [c.description for c in catalogue.clusters]
    texts += [c.name for c in catalogue.clusters]
    texts += all_answers(catalogue)
    texts += [f"{i / 100:.2f}" for i in range(101)]
    texts += [str(i) for i in range(10)]
    return texts


def build_tokenizer(catalogue: Catalogue, extra_texts: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The word-level tokenizer: ids 0-3 are [PAD] [UNK] [BOS] [EOS], ids 4..4+n-1 are the clusters' answer
    forms in cluster-id order (each one token), then every other word, sorted. Lower-cases its input."""
    answers = all_answers(catalogue)
    probe = _bare_tokenizer({t: i for i, t in enumerate(SPECIAL_TOKENS)})
    for a in answers:
        if _words(probe, a) != [a]:
            raise ValueError(f"answer form {a!r} is not one word")
    words: set[str] = set()
    for text in (*vocabulary_texts(catalogue), *extra_texts):
        words.update(_words(probe, text))
    rest = sorted(words - set(answers) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *answers, *rest])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bare_tokenizer(vocab),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_model(vocab_size: int, tokenizer: Any, size: str | ModelSize = "small", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size (tied input/output embeddings)."""
    s = SIZES[size] if isinstance(size, str) else size
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def bootstrap(
    catalogue: Catalogue,
    triples: Triples,
    evidence_lookup: EvidenceLookup,
    out_dir: str | os.PathLike[str],
    *,
    size: str | ModelSize = "small",
    epochs: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    evidence_dropout: float = 0.3,
    relabel: float = RELABEL,
    max_examples: int | None = None,
    num_threads: int | None = None,
) -> Path:
    """Build, train (full parameters, loss on the answers) and save a base model for ``catalogue`` from
    historical ``triples``; returns ``out_dir``. Prompts carry evidence from ``evidence_lookup``, except a
    share ``evidence_dropout`` rendered without it. Also writes ``recupdate_bootstrap.json`` (prompt hash,
    sizes, training figures)."""
    prev_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _bootstrap(
            catalogue,
            triples,
            evidence_lookup,
            Path(out_dir),
            size,
            epochs,
            seed,
            batch_size,
            lr,
            evidence_dropout,
            relabel,
            max_examples,
        )
    finally:
        torch.set_num_threads(prev_threads)


def _bootstrap(
    catalogue: Catalogue,
    triples: Triples,
    evidence_lookup: EvidenceLookup,
    out: Path,
    size: str | ModelSize,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    evidence_dropout: float,
    relabel: float,
    max_examples: int | None,
) -> Path:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if max_examples is not None and len(triples) > max_examples:
        triples = triples.select(np.arange(len(triples) - max_examples, len(triples)))  # the most recent
    examples = build_examples(
        catalogue,
        triples,
        evidence_lookup,
        with_evidence=True,
        evidence_dropout=evidence_dropout,
        relabel=relabel,
        seed=seed,
    )
    tokenizer = build_tokenizer(catalogue)
    model = build_model(len(tokenizer), tokenizer, size, seed)
    encoded = encode_examples(tokenizer, examples.prompts, examples.answers)
    stats = fit(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.01,
        seed=seed,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    s = SIZES[size] if isinstance(size, str) else size
    meta = {
        "prompt_hash": prompt_hash(),
        "template_version": TEMPLATE_VERSION,
        "size": asdict(s),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "clusters": len(catalogue),
        "examples": len(examples),
        "epochs": epochs,
        "train_loss": stats.train_loss,
        "epoch_loss": stats.epoch_loss,
        "train_seconds": stats.seconds,
        "tokens_per_second": stats.tokens / stats.seconds if stats.seconds else None,
        "seconds": time.perf_counter() - t0,
        "seed": seed,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_base(
    path_or_id: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of any causal LM: a local directory, or a hub id where a hub is reachable. The
    tokenizer pads on the left (for batched scoring and generation) and has a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model: Any = AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
