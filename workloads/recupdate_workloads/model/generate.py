"""Inference: free generation mapped to clusters by exact match, constrained decoding, and top-N ranking.

Top-N for the transition table is ranking by LIKELIHOOD, not beam search:
- likelihood scores every cluster's name as a continuation of the prompt, so it yields the FULL ranking with
  calibrated scores (log-probabilities under the model) and can only ever return valid clusters;
- with single-token cluster names (the bootstrap tokenizer) that is ONE forward pass per batch of prompts,
  with logits taken only at the last position and only for the cluster tokens; for a general multi-token
  tokenizer it is one prompt pass plus one teacher-forced pass over the candidates' prefix tree on the
  prompt's KV cache (a prefix shared by several names is computed once);
- beam search of width N does N-times the decode work per generated token, returns only N items (some of
  which may map to no cluster), and its scores are pruned-search artefacts rather than a full ranking.
``bench_finetune.py`` measures both (prompts/s), together with plain greedy generation.

Free greedy generation is kept because it is what the exact-match gate measures: does the model, left to
itself, answer with a valid cluster name?
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recupdate_workloads.data.types import Catalogue
from recupdate_workloads.model.prompt import ANSWER_PREFIX, all_answers
from recupdate_workloads.model.training import forward_last, left_pad


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def answer_token_ids(tokenizer: Any, catalogue: Catalogue) -> list[list[int]]:
    """Token ids of each cluster's answer (``ANSWER_PREFIX`` + answer form), without special tokens."""
    ids = tokenizer([ANSWER_PREFIX + a for a in all_answers(catalogue)], add_special_tokens=False)["input_ids"]
    return [list(x) for x in ids]


def cluster_token_ids(tokenizer: Any, catalogue: Catalogue) -> np.ndarray | None:
    """One token id per cluster when every answer is a single, distinct, known token; else None."""
    ids = answer_token_ids(tokenizer, catalogue)
    if any(len(x) != 1 for x in ids):
        return None
    flat = np.array([x[0] for x in ids], dtype=np.int64)
    if len(set(flat.tolist())) != len(flat) or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in flat):
        return None
    return flat


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, ...]:
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return left_pad(ids, tokenizer.pad_token_id, device)


@torch.inference_mode()
def _single_token_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], token_ids: np.ndarray, batch_size: int
) -> np.ndarray:
    device = _device(model)
    tid = torch.as_tensor(token_ids, device=device)
    out = np.empty((len(prompts), len(token_ids)), dtype=np.float32)
    for s in range(0, len(prompts), batch_size):
        ids, mask, pos = _encode_prompts(tokenizer, prompts[s : s + batch_size], device)
        logits = forward_last(model, ids, mask, pos, 1)[:, -1].float()
        # Normalised over the whole vocabulary, then restricted: scores are the model's log-probabilities.
        out[s : s + len(ids)] = torch.log_softmax(logits, -1)[:, tid].cpu().numpy()
    return out


def _cache_kwarg(model: Any) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class _Trie:
    """The candidates' token prefixes as a tree, flattened for one pass over all of them.

    Node i stands for one distinct non-empty prefix; its token is the prefix's last token, at position
    (prompt length + depth - 1). A node attends to the prompt, its ancestors and itself, so its output is the
    next-token distribution after its prefix. Every step of every candidate (a next token after a prefix, the
    end-of-text after the whole candidate) reads one node's distribution: (step_node, step_token, step_cand)."""

    tokens: torch.Tensor  # [T]
    depth: torch.Tensor  # [T], 1 for a first token
    sees: torch.Tensor  # [T, T] bool: node i attends to node j
    first: torch.Tensor  # [C] each candidate's first token, scored at the prompt's last position
    step_node: torch.Tensor  # [S]
    step_token: torch.Tensor  # [S]
    step_cand: torch.Tensor  # [S]


def _trie(candidates: Sequence[Sequence[int]], eos: int | None, device: torch.device) -> _Trie:
    nodes: dict[tuple[int, ...], int] = {}
    for c in candidates:
        for k in range(1, len(c) + 1):
            nodes.setdefault(tuple(c[:k]), len(nodes))  # a parent is always numbered before its children
    order = list(nodes)
    sees = torch.zeros((len(order), len(order)), dtype=torch.bool)
    for i, p in enumerate(order):
        for k in range(1, len(p) + 1):
            sees[i, nodes[p[:k]]] = True
    steps: list[tuple[int, int, int]] = []
    for j, c in enumerate(candidates):
        steps += [(nodes[tuple(c[:k])], c[k], j) for k in range(1, len(c))]
        if eos is not None:
            steps.append((nodes[tuple(c)], eos, j))
    node, token, cand = zip(*steps, strict=True) if steps else ((), (), ())

    def t(x: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(x), dtype=torch.long, device=device)

    return _Trie(
        tokens=t([p[-1] for p in order]),
        depth=t([len(p) for p in order]),
        sees=sees.to(device),
        first=t([c[0] for c in candidates]),
        step_node=t(node),
        step_token=t(token),
        step_cand=t(cand),
    )


def _tree_parts(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output head) when the logits are exactly head(decoder output); None for a model that scales
    or caps them on the way (Gemma's soft-capping, Cohere's logit scale) or does not expose the two."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None else None


def _forward_kwargs(module: Any) -> set[str]:
    return set(inspect.signature(type(module).forward).parameters)


#: Scored positions per tree pass (prompts x trie nodes); bounds the activations and the 4D mask.
TREE_POSITIONS = 16_384
#: Logits materialised at once (positions x vocabulary), e.g. 1,700 positions of a 152k-word vocabulary.
LOGIT_ELEMENTS = 1 << 28


@torch.inference_mode()
def _multi_token_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[Sequence[int]], batch_size: int
) -> np.ndarray:
    """log P(candidate + EOS | prompt) for every (prompt, candidate), teacher-forced, in two passes per batch
    of prompts: the prompt (its last position scores every candidate's first token), then every node of the
    candidates' prefix tree at once over the prompt's KV cache, with a 4D mask that lets a node see its own
    prefix only. A prefix shared by several candidates is computed once, the cache is not copied per
    candidate, and the vocabulary projection is applied in slices. Models whose logits are not the head of
    the decoder output take ``_multi_token_logprobs_repeat``."""
    parts = _tree_parts(model)
    if parts is None:
        return _multi_token_logprobs_repeat(model, tokenizer, prompts, candidates, batch_size)
    decoder, head = parts
    device = _device(model)
    trie = _trie(candidates, tokenizer.eos_token_id, device)
    n_nodes, n_c = len(trie.tokens), len(candidates)
    kw = "cache" if "cache" in _forward_kwargs(decoder) else "past_key_values"
    dtype = head.weight.dtype if head.weight.is_floating_point() else torch.float32
    vocab = head.weight.shape[0]
    per_step = max(1, min(batch_size, TREE_POSITIONS // max(1, n_nodes)))
    out = np.empty((len(prompts), n_c), dtype=np.float32)
    for s in range(0, len(prompts), per_step):
        ids, mask, pos = _encode_prompts(tokenizer, prompts[s : s + per_step], device)
        b, p_len = ids.shape
        res = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        total = torch.log_softmax(head(res.last_hidden_state[:, -1]).float(), -1)[:, trie.first]  # [b, C]
        if len(trie.step_node):
            cache = getattr(res, "cache", None) or res.past_key_values
            see = torch.cat([mask.bool()[:, None, :].expand(b, n_nodes, p_len), trie.sees.expand(b, -1, -1)], dim=2)
            att = torch.zeros(see.shape, dtype=dtype, device=device).masked_fill_(~see, torch.finfo(dtype).min)
            tpos = mask.sum(1, keepdim=True) + trie.depth[None, :] - 1
            inp = trie.tokens[None, :].expand(b, -1)
            hidden = decoder(
                input_ids=inp, attention_mask=att[:, None], position_ids=tpos, use_cache=True, **{kw: cache}
            ).last_hidden_state  # [b, T, H]
            rows = max(1, LOGIT_ELEMENTS // max(1, n_nodes * vocab))
            for r in range(0, b, rows):
                logits = head(hidden[r : r + rows])  # [rows, T, V]
                lse = torch.logsumexp(logits.float(), -1)  # [rows, T]
                step = logits[:, trie.step_node, trie.step_token].float() - lse[:, trie.step_node]  # [rows, S]
                total[r : r + rows].index_add_(1, trie.step_cand, step)
        out[s : s + b] = total.cpu().numpy()
    return out


@torch.inference_mode()
def _multi_token_logprobs_repeat(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[Sequence[int]], batch_size: int
) -> np.ndarray:
    """The same scores as ``_multi_token_logprobs`` through the model's own forward only: a prompt pass, then
    every candidate as its own row over the prompt's KV cache repeated once per candidate."""
    device = _device(model)
    eos = tokenizer.eos_token_id
    cands = [list(c) + ([eos] if eos is not None else []) for c in candidates]
    n_c, l_max = len(cands), max(len(c) for c in cands)
    cand = torch.full((n_c, l_max), tokenizer.pad_token_id, dtype=torch.long, device=device)
    cmask = torch.zeros((n_c, l_max), dtype=torch.long, device=device)
    for j, c in enumerate(cands):
        cand[j, : len(c)] = torch.as_tensor(c, device=device)
        cmask[j, : len(c)] = 1
    kw = _cache_kwarg(model)
    sub = max(1, batch_size * 4 // n_c)  # prompts per step: the candidate pass has sub * n_c rows
    out = np.empty((len(prompts), n_c), dtype=np.float32)
    for s in range(0, len(prompts), sub):
        ids, mask, pos = _encode_prompts(tokenizer, prompts[s : s + sub], device)
        b = ids.shape[0]
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), -1)[:, cand[:, 0]]  # [b, n_c]
        total = first
        if l_max > 1:
            cache = getattr(res, "cache", None) or res.past_key_values
            cache.batch_repeat_interleave(n_c)
            inp = cand[:, :-1].repeat(b, 1)
            att = torch.cat([mask.repeat_interleave(n_c, 0), cmask[:, :-1].repeat(b, 1)], dim=1)
            cpos = mask.sum(1).repeat_interleave(n_c)[:, None] + torch.arange(l_max - 1, device=device)[None, :]
            r2 = model(input_ids=inp, attention_mask=att, position_ids=cpos, use_cache=True, **{kw: cache})
            lp = torch.log_softmax(r2.logits.float(), -1)  # [b*n_c, l_max-1, V]
            tgt = cand[:, 1:].repeat(b, 1)
            tok_lp = lp.gather(-1, tgt[..., None])[..., 0] * cmask[:, 1:].repeat(b, 1)
            total = total + tok_lp.sum(-1).view(b, n_c)
        out[s : s + b] = total.cpu().numpy()
    return out


def cluster_logprobs(
    model: Any, tokenizer: Any, catalogue: Catalogue, prompts: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """float32[n_prompts, n_clusters]: log-likelihood of each cluster's answer given each prompt. Single-token
    answers: log P(token); multi-token answers: log P(tokens + EOS)."""
    if not prompts:
        return np.empty((0, len(catalogue)), dtype=np.float32)
    single = cluster_token_ids(tokenizer, catalogue)
    if single is not None:
        return _single_token_logprobs(model, tokenizer, prompts, single, batch_size)
    return _multi_token_logprobs(model, tokenizer, prompts, answer_token_ids(tokenizer, catalogue), batch_size)


def rank_clusters(
    model: Any,
    tokenizer: Any,
    catalogue: Catalogue,
    prompts: Sequence[str],
    top_n: int,
    batch_size: int = 64,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-N clusters per prompt by likelihood: (ids int32[n, top_n], scores float32[n, top_n]), best first,
    scores being log-probabilities. ``exclude`` (int[n, k], -1 = none), e.g. the pair's own (c1, c2), removes
    those clusters from a row's ranking (score -inf) so the top-N holds novel clusters only."""
    lp = cluster_logprobs(model, tokenizer, catalogue, prompts, batch_size)
    return top_ranked(excluded(lp, exclude), top_n)


def excluded(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """``scores`` (float[n, n_clusters], changed in place) with the clusters of ``exclude`` (int[n, k], -1 =
    none) set to -inf."""
    if exclude is not None:
        ex = np.asarray(exclude)
        rows = np.repeat(np.arange(len(scores)), ex.shape[1])
        cols = ex.reshape(-1)
        ok = cols >= 0
        scores[rows[ok], cols[ok]] = -np.inf
    return scores


def top_ranked(scores: np.ndarray, top_n: int, tie_break: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[n, top_n], scores float32[n, top_n]) of the highest scores per row, best first. Ties break
    by ``tie_break`` (higher first) where given, then by cluster id, deterministically."""
    top_n = min(top_n, scores.shape[1])
    if tie_break is None:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_n]
    else:
        order = np.lexsort((-tie_break, -scores), axis=1)[:, :top_n]
    return order.astype(np.int32), np.take_along_axis(scores, order, axis=1).astype(np.float32)


#: The model's weight in a blend never goes below this, so at ``blend=1`` the model still orders the clusters
#: that the evidence leaves tied (those it does not list), instead of leaving them unranked.
MIN_MODEL_WEIGHT = 1e-6


def blend_logprobs(logprobs: np.ndarray, shares: np.ndarray, blend: float) -> tuple[np.ndarray, np.ndarray]:
    """Mix the model's likelihood with the evidence: log((1 - blend) * p_model + blend * share).

    ``logprobs`` (float[n, n_clusters], -inf for excluded clusters) become p_model, renormalised over the
    clusters left; ``shares`` (float[n, n_clusters]) are the evidence lines' shares of their pair's support
    (0 for clusters the evidence does not list; a row of zeros for a pair without evidence, which then keeps
    the model's order). Excluded clusters stay -inf. Returns (blended log-scores, p_model), p_model being the
    tie-break for ``top_ranked``. ``blend=0`` is the model alone: the same order as ``logprobs``."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], not {blend}")
    lp = np.asarray(logprobs, dtype=np.float64)
    allowed = np.isfinite(lp)
    top = np.where(allowed, lp, -np.inf).max(axis=1, keepdims=True)
    p = np.where(allowed, np.exp(lp - np.where(np.isfinite(top), top, 0.0)), 0.0)
    p /= np.maximum(p.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    mixed = max(1.0 - blend, MIN_MODEL_WEIGHT) * p + blend * np.where(allowed, shares, 0.0)
    with np.errstate(divide="ignore"):
        out = np.where(allowed, np.log(mixed), -np.inf)
    return out.astype(np.float32), p


def _prefix_fn(candidates: Sequence[Sequence[int]], eos: int, prompt_len: int) -> Callable[..., list[int]]:
    """prefix_allowed_tokens_fn for generate(): only continuations along a trie of the candidates (+ EOS)."""
    trie: dict[tuple[int, ...], set[int]] = {}
    for c in candidates:
        seq = [*c, eos]
        for k in range(len(seq)):
            trie.setdefault(tuple(seq[:k]), set()).add(seq[k])
    allowed = {k: sorted(v) for k, v in trie.items()}

    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return allowed.get(tuple(input_ids[prompt_len:].tolist()), [eos])

    return fn


@torch.inference_mode()
def _generate(
    model: Any,
    tokenizer: Any,
    catalogue: Catalogue,
    prompts: Sequence[str],
    *,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int | None,
    constrained: bool,
) -> list[list[str]]:
    device = _device(model)
    cands = answer_token_ids(tokenizer, catalogue)
    new_tokens = max_new_tokens or max(len(c) for c in cands) + 1
    texts: list[list[str]] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, _ = _encode_prompts(tokenizer, prompts[s : s + batch_size], device)
        kwargs: dict[str, Any] = {}
        if constrained:
            kwargs["prefix_allowed_tokens_fn"] = _prefix_fn(cands, tokenizer.eos_token_id, ids.shape[1])
        if num_beams > 1:
            kwargs.update(num_beams=num_beams, num_return_sequences=num_beams, early_stopping=True)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        per = max(1, num_beams)
        texts.extend([t.strip() for t in decoded[i : i + per]] for i in range(0, len(decoded), per))
    return texts


def map_names(catalogue: Catalogue, names: Sequence[str]) -> np.ndarray:
    """int32 cluster ids by exact normalised match (``Catalogue.lookup``), -1 where a name matches none."""
    return np.array([-1 if (c := catalogue.lookup(n)) is None else c for n in names], dtype=np.int32)


def generate_names(
    model: Any,
    tokenizer: Any,
    catalogue: Catalogue,
    prompts: Sequence[str],
    batch_size: int = 64,
    *,
    max_new_tokens: int | None = None,
    constrained: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Greedy answers (decoded, stripped) and their cluster ids by exact match (-1 for misses). With
    ``constrained`` decoding is restricted to cluster names (a trie over their tokens), so it never misses;
    the exact-match gate uses the free mode."""
    texts = _generate(
        model,
        tokenizer,
        catalogue,
        prompts,
        batch_size=batch_size,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        constrained=constrained,
    )
    names = [t[0] for t in texts]
    return names, map_names(catalogue, names)


def beam_clusters(
    model: Any,
    tokenizer: Any,
    catalogue: Catalogue,
    prompts: Sequence[str],
    num_beams: int = 5,
    batch_size: int = 16,
    *,
    constrained: bool = False,
) -> np.ndarray:
    """Top-N by beam search of width ``num_beams`` (the alternative to ``rank_clusters``, kept to measure it):
    int32[n, num_beams] of mapped cluster ids, best beam first, -1 where a beam's text matches no cluster."""
    texts = _generate(
        model,
        tokenizer,
        catalogue,
        prompts,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=None,
        constrained=constrained,
    )
    return np.stack([map_names(catalogue, t) for t in texts]) if texts else np.empty((0, num_beams), np.int32)


def exact_match_rate(ids: np.ndarray) -> float:
    """Share of generated answers that mapped to a cluster (ids from ``generate_names``)."""
    return float((np.asarray(ids) >= 0).mean()) if len(ids) else 0.0
