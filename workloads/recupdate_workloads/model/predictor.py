"""A loaded release's model (base + LoRA adapter) that ranks clusters for context pairs.

One place that turns pairs + evidence into prompts and prompts into rankings, shared by materialization,
evaluation, replay and online generation in serving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recupdate_workloads.data.types import Catalogue, PairEvidence
from recupdate_workloads.model.generate import (
    blend_logprobs,
    cluster_logprobs,
    exact_match_rate,
    excluded,
    generate_names,
    top_ranked,
)
from recupdate_workloads.model.prompt import render_many

Evidence = Mapping[tuple[int, int], PairEvidence]


def local_path(uri: str) -> str:
    """Adapter and model URIs are local paths or file:// URIs here (object stores where Ray supports them)."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


@dataclass
class Predictor:
    model: Any
    tokenizer: Any
    catalogue: Catalogue
    with_evidence: bool = True
    top_r: int = 5
    batch_size: int = 128

    @classmethod
    def load(
        cls, base: str, adapter_uri: str | None, catalogue: Catalogue, with_evidence: bool = True, top_r: int = 5
    ) -> Predictor:
        import torch

        from recupdate_workloads.model.bootstrap import load_base
        from recupdate_workloads.model.hf import default_device, default_dtype
        from recupdate_workloads.model.train_loop import load_adapter

        torch.set_num_threads(max(1, torch.get_num_threads()))
        device = default_device()  # bulk inference on the job's GPU when it has one
        model, tok = load_base(local_path(base), device=device, dtype=default_dtype(device))
        if adapter_uri:
            model = load_adapter(model, local_path(adapter_uri), merge=True)  # merged: faster bulk inference
        return cls(model, tok, catalogue, with_evidence, top_r)

    def prompts(self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None) -> list[str]:
        pairs = list(zip(c1.tolist(), c2.tolist(), strict=True))
        ev = [evidence.get(p) for p in pairs] if evidence is not None and self.with_evidence else None
        return render_many(self.catalogue, pairs, ev, self.with_evidence, self.top_r)

    def rank(
        self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, n: int, blend: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n novel clusters per pair (the pair's own clusters excluded), by likelihood; with ``blend`` > 0
        by the likelihood mixed with the evidence's shares (``blend_logprobs``)."""
        return self.rank_blends(c1, c2, evidence, n, (blend,))[0]

    def rank_blends(
        self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, n: int, blends: Sequence[float]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``rank`` at each of ``blends``, from one forward pass: e.g. (0, b) gives the LLM alone and blended.
        The evidence blended in is the pair's, also when the prompt carries none (``with_evidence`` False)."""
        if len(c1) == 0:
            return [(np.zeros((0, n), np.int32), np.zeros((0, n), np.float32)) for _ in blends]
        exclude = np.stack([c1, c2], axis=1).astype(np.int64)
        lp = cluster_logprobs(
            self.model, self.tokenizer, self.catalogue, self.prompts(c1, c2, evidence), self.batch_size
        )
        lp = excluded(lp, exclude)
        shares = evidence_shares(c1, c2, evidence, len(self.catalogue)) if any(b > 0 for b in blends) else None
        out = []
        for b in blends:
            if b > 0 and shares is not None:
                scores, p_model = blend_logprobs(lp, shares, b)
                ids, sc = top_ranked(scores, n, tie_break=p_model)
            else:
                ids, sc = top_ranked(lp.copy(), n)
            ids[~np.isfinite(sc)] = -1  # n above the number of novel clusters: pad, never list c1 or c2
            out.append((ids, sc))
        return out

    def exact_match(self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, sample: int = 256) -> float:
        """Share of free greedy answers that name a cluster exactly (on at most `sample` pairs)."""
        if len(c1) == 0:
            return 0.0
        idx = np.random.default_rng(0).permutation(len(c1))[:sample]
        _, ids = generate_names(self.model, self.tokenizer, self.catalogue, self.prompts(c1[idx], c2[idx], evidence))
        return exact_match_rate(ids)


def evidence_shares(c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, n_clusters: int) -> np.ndarray:
    """float32[n, n_clusters]: each pair's evidence lines' shares (borrowed lines too), 0 elsewhere."""
    out = np.zeros((len(c1), n_clusters), np.float32)
    if evidence is None:
        return out
    for i, key in enumerate(zip(c1.tolist(), c2.tolist(), strict=True)):
        e = evidence.get(key)
        if e is not None:
            for s in e.successors:
                out[i, s.cluster] = max(out[i, s.cluster], min(max(s.share, 0.0), 1.0))
    return out
