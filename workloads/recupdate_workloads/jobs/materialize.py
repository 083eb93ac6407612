"""Bulk inference over all pairs into a versioned transition table (the paper's serving design).

Pairs are those with evidence in the current snapshot (support in the window, own or borrowed), or every
ordered pair of the catalogue with `all_pairs`. In-process by default; `materialize_ray` fans batches out
with Ray Data `map_batches` when running on a Ray cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from recupdate_workloads.data.types import Catalogue
from recupdate_workloads.model.predictor import Evidence, Predictor
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store


@dataclass
class Materialized:
    c1: np.ndarray
    c2: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    source: np.ndarray  # 0 model, 1 evidence
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return len(self.c1) / self.seconds if self.seconds else 0.0

    def as_table(self) -> dict[tuple[int, int], list[int]]:
        return {
            (int(a), int(b)): [int(x) for x in row if x >= 0]
            for a, b, row in zip(self.c1, self.c2, self.ids, strict=True)
        }


def pairs_to_score(evidence: Evidence, catalogue: Catalogue, all_pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if all_pairs:
        n = len(catalogue)
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        keep = a != b
        return a[keep].astype(np.int32), b[keep].astype(np.int32)
    keys = sorted(evidence)
    arr = np.asarray(keys, dtype=np.int32).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def materialize(
    predictor: Predictor,
    evidence: Evidence,
    top_n: int = 10,
    all_pairs: bool = False,
    progress: bool = False,
    blend: float = 0.0,
) -> Materialized:
    """Rank the pairs with the predictor; ``blend`` (0..1, the policy's ``retrieval.blend``) mixes the
    model's likelihood with the evidence's shares (``model.generate.blend_logprobs``); 0 is the LLM alone."""

    c1, c2 = pairs_to_score(evidence, predictor.catalogue, all_pairs)
    t0 = time.perf_counter()
    ids, scores = [], []
    step = max(predictor.batch_size * 8, 1)
    for s in tqdm(range(0, len(c1), step), desc="materialize", unit="batch", disable=not progress):
        i, sc = predictor.rank(c1[s : s + step], c2[s : s + step], evidence, top_n, blend)
        ids.append(i)
        scores.append(sc)
    ids_a = np.concatenate(ids) if ids else np.zeros((0, top_n), np.int32)
    sc_a = np.concatenate(scores) if scores else np.zeros((0, top_n), np.float32)
    return Materialized(c1, c2, ids_a, sc_a, np.zeros(len(c1), np.int8), time.perf_counter() - t0)


def from_evidence(evidence: Evidence, top_n: int = 10) -> Materialized:
    """A table straight from the evidence (no model): the fallback source, and the counts baseline."""
    keys = sorted(evidence)
    ids = np.full((len(keys), top_n), -1, np.int32)
    scores = np.zeros((len(keys), top_n), np.float32)
    for i, k in enumerate(keys):
        for j, s in enumerate(evidence[k].successors[:top_n]):
            ids[i, j], scores[i, j] = s.cluster, s.share
    arr = np.asarray(keys, dtype=np.int32).reshape(-1, 2)
    return Materialized(arr[:, 0], arr[:, 1], ids, scores, np.ones(len(keys), np.int8), 0.0)


def publish(store: Store, m: Materialized, snapshot_id: int | None, adapter_uri: str | None) -> int:
    """Write the table as a new version (atomic: readers only ever see published versions)."""
    return tables.publish_table(store, m.c1, m.c2, m.ids, m.scores, m.source, snapshot_id, adapter_uri)


class _RankBatch:
    """Ray Data UDF: each actor loads the release once and ranks the batches it is given."""

    def __init__(
        self,
        base: str,
        adapter_uri: str | None,
        catalogue: Catalogue,
        evidence: Evidence,
        top_n: int,
        blend: float = 0.0,
    ):
        self.predictor = Predictor.load(base, adapter_uri, catalogue)
        self.evidence = evidence
        self.top_n = top_n
        self.blend = blend

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, scores = self.predictor.rank(batch["c1"], batch["c2"], self.evidence, self.top_n, self.blend)
        return {"c1": batch["c1"], "c2": batch["c2"], "ids": ids, "scores": scores}


def materialize_ray(
    base: str,
    adapter_uri: str | None,
    catalogue: Catalogue,
    evidence: Evidence,
    top_n: int = 10,
    all_pairs: bool = False,
    concurrency: int = 1,
    batch_size: int = 512,
    blend: float = 0.0,
) -> Materialized:
    """The same bulk inference through Ray Data `map_batches` (actors hold the model)."""
    import ray.data

    c1, c2 = pairs_to_score(evidence, catalogue, all_pairs)
    t0 = time.perf_counter()
    ds = ray.data.from_numpy({"c1": c1, "c2": c2})  # type: ignore[arg-type]
    out: Any = ds.map_batches(
        _RankBatch,
        fn_constructor_args=(base, adapter_uri, catalogue, dict(evidence), top_n, blend),
        batch_size=batch_size,
        concurrency=concurrency,
        batch_format="numpy",
    ).to_numpy_refs()
    parts = ray.get(out)
    c1o = np.concatenate([p["c1"] for p in parts])
    c2o = np.concatenate([p["c2"] for p in parts])
    ids = np.concatenate([p["ids"] for p in parts])
    scores = np.concatenate([p["scores"] for p in parts])
    order = np.lexsort((c2o, c1o))
    return Materialized(
        c1o[order], c2o[order], ids[order], scores[order], np.zeros(len(c1o), np.int8), time.perf_counter() - t0
    )
