"""A loaded release's model (base + LoRA adapter) that ranks clusters for context pairs.

One place that turns pairs + evidence into prompts and prompts into rankings, shared by materialization,
evaluation, replay and online generation in serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recupdate_workloads.data.types import Catalogue, PairEvidence
from recupdate_workloads.model.generate import exact_match_rate, generate_names, rank_clusters
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

    def rank(self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-n novel clusters per pair (the pair's own clusters excluded), by likelihood."""
        if len(c1) == 0:
            return np.zeros((0, n), np.int32), np.zeros((0, n), np.float32)
        exclude = np.stack([c1, c2], axis=1).astype(np.int64)
        ids, scores = rank_clusters(
            self.model, self.tokenizer, self.catalogue, self.prompts(c1, c2, evidence), n, self.batch_size, exclude
        )
        ids[~np.isfinite(scores)] = -1  # n above the number of novel clusters: pad, never list c1 or c2
        return ids, scores

    def exact_match(self, c1: np.ndarray, c2: np.ndarray, evidence: Evidence | None, sample: int = 256) -> float:
        """Share of free greedy answers that name a cluster exactly (on at most `sample` pairs)."""
        if len(c1) == 0:
            return 0.0
        idx = np.random.default_rng(0).permutation(len(c1))[:sample]
        _, ids = generate_names(self.model, self.tokenizer, self.catalogue, self.prompts(c1[idx], c2[idx], evidence))
        return exact_match_rate(ids)
