"""A small, fully populated store for trying, testing and benchmarking the Serve application.

``build_demo_store`` writes a toy catalogue (with embeddings, so pairs can borrow evidence), one evidence
snapshot, two transition tables that answer from disjoint cluster sets (so a response shows which table
produced it), optionally a tiny bootstrapped base model with a LoRA adapter, and two releases, the first
active. Some pairs are left out of the tables on purpose (online misses), one of them also out of the
evidence (it borrows from neighbour pairs at serving time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recupdate_workloads.contract.serve import user_config
from recupdate_workloads.data.types import Catalogue, Cluster
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store

#: Pairs absent from both tables: answered online. The first keeps its own evidence, the second has none
#: in the snapshot (it borrows from neighbours).
MISSING_PAIRS = ((6, 7), (5, 7))


@dataclass
class DemoStore:
    schema: str
    n_clusters: int
    sets: dict[str, frozenset[int]]  # release id -> the clusters its table can answer
    releases: dict[str, dict[str, Any]]  # release id -> user_config
    table_versions: dict[str, int]
    adapter_uri: str | None
    base_model: str | None
    snapshot_id: int
    timings: dict[str, float] = field(default_factory=dict)


def demo_catalogue(n: int) -> Catalogue:
    """The toy catalogue (genre-pair names) up to 16 clusters; beyond, numbered topics."""
    if n <= 16:
        return toy_catalogue(n)
    return Catalogue([Cluster(i, f"Topic {i:03d}", (f"topic{i:03d}", f"group{i % 7}")) for i in range(n)])


def _table(n: int, allowed: list[int], missing: set[tuple[int, int]], top: int) -> tuple[np.ndarray, ...]:
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b and (a, b) not in missing]
    c1 = np.array([p[0] for p in pairs], np.int32)
    c2 = np.array([p[1] for p in pairs], np.int32)
    ids = np.full((len(pairs), top), -1, np.int32)
    scores = np.zeros((len(pairs), top), np.float32)
    for i, (a, b) in enumerate(pairs):
        # a deterministic, pair-dependent order, so different pairs get different rankings
        def order(c: int, a: int = a, b: int = b) -> int:
            return (c * 7 + a * 3 + b) % len(allowed)

        row = sorted((c for c in allowed if c not in (a, b)), key=order)
        row = row[:top]
        ids[i, : len(row)] = row
        scores[i, : len(row)] = -np.arange(1, len(row) + 1, dtype=np.float32) / 2
    return c1, c2, ids, scores, np.zeros(len(pairs), np.int8)


def build_demo_store(
    store: Store,
    *,
    n_clusters: int = 8,
    model_dir: str | Path | None = None,
    triples: int = 1200,
    seed: int = 0,
    embed: bool = False,
    top_n: int = 10,
) -> DemoStore:
    """Populate ``store`` (a migrated, empty schema). With ``model_dir``, also bootstrap a tiny base model and
    train a LoRA adapter there (seconds on CPU; at most 16 clusters); without, releases have no adapter. Rows of
    the tables hold at most ``top_n`` clusters. ``embed`` embeds cluster descriptions with MiniLM (seconds to
    load); otherwise clusters get fixed pseudo-random unit vectors, which is all evidence borrowing needs to
    find neighbours."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    catalogue = demo_catalogue(n_clusters)
    cat.save_catalogue(store, catalogue, np.arange(n_clusters, dtype=np.int32), embed=embed)
    if not embed:
        vec = np.random.default_rng(1234).normal(size=(n_clusters, 384)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        with store.tx() as c:
            for i in range(n_clusters):
                c.execute("UPDATE clusters SET embedding = %s WHERE cluster = %s", (vec[i], i))
    timings["catalogue"] = time.perf_counter() - t0

    t = toy_triples(catalogue, triples, seed=seed, noise=0.1)
    no_evidence = MISSING_PAIRS[1]
    keep = ~((t.c1 == no_evidence[0]) & (t.c2 == no_evidence[1]))
    counts = ev.Counts.of(t.select(keep), n_clusters)
    t1 = time.perf_counter()
    snap = ev.build_snapshot(store, counts, (0, 1), ev.EvidenceParams(top_r=5, min_support=3))
    timings["snapshot"] = time.perf_counter() - t1

    half = n_clusters // 2
    sets = {"rel-a": list(range(half)), "rel-b": list(range(half, n_clusters))}
    missing = set(MISSING_PAIRS)
    versions = {}
    t3 = time.perf_counter()
    for rid, allowed in sets.items():
        c1, c2, ids, scores, source = _table(n_clusters, allowed, missing, top=min(half, top_n))
        versions[rid] = tables.publish_table(store, c1, c2, ids, scores, source, snap.snapshot_id, None)
    timings["tables"] = time.perf_counter() - t3

    adapter_uri: str | None = None
    base_model: str | None = None
    if model_dir is not None:
        t2 = time.perf_counter()
        adapter_uri, base_model = _tiny_model(catalogue, t, toy_evidence(t), Path(model_dir), seed)
        timings["model"] = time.perf_counter() - t2

    from recupdate_workloads.model.prompt import prompt_hash

    releases = {}
    for rid in sets:
        reg.register_release(
            store,
            reg.Release(
                release_id=rid,
                base_model=base_model or "none",
                adapter_uri=adapter_uri,
                snapshot_id=snap.snapshot_id,
                table_version=versions[rid],
                prompt_hash=prompt_hash(),
            ),
        )
        releases[rid] = user_config(rid, adapter_uri, versions[rid], store.schema)
    reg.activate(store, "rel-a")
    timings["total"] = time.perf_counter() - t0
    return DemoStore(
        schema=store.schema,
        n_clusters=n_clusters,
        sets={k: frozenset(v) for k, v in sets.items()},
        releases=releases,
        table_versions=versions,
        adapter_uri=adapter_uri,
        base_model=base_model,
        snapshot_id=snap.snapshot_id,
        timings=timings,
    )


def _tiny_model(catalogue: Any, triples: Any, evidence: Any, out: Path, seed: int) -> tuple[str, str]:
    from recupdate_workloads.model.bootstrap import bootstrap
    from recupdate_workloads.model.examples import build_examples
    from recupdate_workloads.model.train_loop import run_inline

    base = bootstrap(catalogue, triples, evidence, out / "base", size="tiny", epochs=1, seed=seed, num_threads=1)
    examples = build_examples(catalogue, triples, evidence, evidence_dropout=0.3, seed=seed)
    res = run_inline(
        {
            "base_model": str(base),
            "examples": examples.to_records()[:400],
            "output_dir": str(out / "adapter"),
            "epochs": 1,
            "num_threads": 1,
            "device": "cpu",
            "lora": {"r": 4, "alpha": 8},
        }
    )
    return res.adapter_dir, str(base)
