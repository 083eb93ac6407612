"""Training examples: curation of triples and their rendering as (prompt, answer) pairs.

Pure numpy + the prompt template: no torch, so the controller side (and tests) can build examples cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recupdate_workloads.data.types import Catalogue, PairEvidence, Triples
from recupdate_workloads.model.prompt import DEFAULT_TOP_R, render_example

#: Evidence for a triple: ``f(c1, c2, ts) -> PairEvidence | None`` (evidence as of the triple's time), or a
#: mapping ``(c1, c2) -> PairEvidence`` (one snapshot for all), or None (no evidence anywhere).
EvidenceLookup = Callable[[int, int, int], PairEvidence | None] | Mapping[tuple[int, int], PairEvidence] | None


def get_evidence(lookup: EvidenceLookup, c1: int, c2: int, ts: int) -> PairEvidence | None:
    if lookup is None:
        return None
    if isinstance(lookup, Mapping):
        return lookup.get((c1, c2))
    return lookup(c1, c2, ts)


def curate(triples: Triples, max_per_pair: int | None = None, seed: int = 0) -> Triples:
    """Training triples against popularity bias: drop duplicate (user, c1, c2, c_next) rows (the first
    occurrence is kept), then keep at most ``max_per_pair`` rows per context pair (c1, c2), sampled uniformly
    with ``seed``. Triples are positives already. The result keeps the input order."""
    n = len(triples)
    if n == 0:
        return triples
    key = np.stack(
        [
            triples.user.astype(np.int64),
            triples.c1.astype(np.int64),
            triples.c2.astype(np.int64),
            triples.c_next.astype(np.int64),
        ],
        axis=1,
    )
    _, first = np.unique(key, axis=0, return_index=True)
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    if max_per_pair is not None:
        if max_per_pair < 1:
            raise ValueError("max_per_pair must be >= 1")
        idx = np.flatnonzero(keep)
        rng = np.random.default_rng(seed)
        # Random order, then stable sort by pair: the first max_per_pair of each pair are a uniform sample.
        idx = idx[rng.permutation(len(idx))]
        pair = triples.c1[idx].astype(np.int64) * (1 << 32) + triples.c2[idx].astype(np.int64)
        order = np.argsort(pair, kind="stable")
        idx, pair = idx[order], pair[order]
        starts = np.r_[0, np.flatnonzero(np.diff(pair)) + 1]
        rank = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
        keep[:] = False
        keep[idx[rank < max_per_pair]] = True
    return triples.select(keep)


@dataclass
class Examples:
    """Prompts and their answer texts (parallel lists)."""

    prompts: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def to_records(self) -> list[dict[str, str]]:
        return [{"prompt": p, "answer": a} for p, a in zip(self.prompts, self.answers, strict=True)]

    def save_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w") as f:
            for rec in self.to_records():
                f.write(json.dumps(rec) + "\n")
        return path

    @classmethod
    def from_records(cls, records: list[dict[str, str]]) -> Examples:
        return cls([r["prompt"] for r in records], [r["answer"] for r in records])

    @classmethod
    def load(cls, path: str | Path) -> Examples:
        """Read a .jsonl (one {"prompt", "answer"} object a line) or a .parquet with those two columns."""
        path = Path(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["prompt", "answer"])
            return cls(table.column("prompt").to_pylist(), table.column("answer").to_pylist())
        with path.open() as f:
            return cls.from_records([json.loads(line) for line in f if line.strip()])


#: Share of the evidence-bearing training examples that are relabelled (``build_examples``): every cluster of
#: the example (c1, c2, the evidence lines, the answer) renamed by one random permutation of the catalogue.
#: In a relabelled example only the evidence predicts the answer, so a model cannot get by on memorising
#: pairs; on the synthetic stream it raised the share of held-out pairs whose top-1 copies low-support
#: evidence (support 5-10) from 0.60 to 0.77 (docs/rag.md).
RELABEL = 0.5


def _relabelled(ev: PairEvidence, pi: np.ndarray) -> PairEvidence:
    succ = tuple(replace(s, cluster=int(pi[s.cluster])) for s in ev.successors)
    frm = tuple((int(pi[a]), int(pi[b])) for a, b in ev.borrowed_from)
    return PairEvidence(int(pi[ev.c1]), int(pi[ev.c2]), ev.support, succ, frm)


def build_examples(
    catalogue: Catalogue,
    triples: Triples,
    evidence_lookup: EvidenceLookup = None,
    *,
    with_evidence: bool = True,
    evidence_dropout: float = 0.0,
    relabel: float = 0.0,
    top_r: int = DEFAULT_TOP_R,
    seed: int = 0,
) -> Examples:
    """Render each triple as (prompt, answer). With ``with_evidence`` each prompt carries the pair's evidence
    as of the triple's time; ``evidence_dropout`` renders that fraction without the evidence block, so one
    model serves both the RAG and the fine-tune-only prompt."""
    rng = np.random.default_rng(seed)
    drop = rng.random(len(triples)) < evidence_dropout
    swap = rng.random(len(triples)) < relabel
    n = len(catalogue)
    prompts: list[str] = []
    answers: list[str] = []
    for i in range(len(triples)):
        c1, c2, nxt, ts = int(triples.c1[i]), int(triples.c2[i]), int(triples.c_next[i]), int(triples.ts[i])
        use_ev = with_evidence and not drop[i]
        ev = get_evidence(evidence_lookup, c1, c2, ts) if use_ev else None
        if swap[i] and ev is not None and ev.successors:
            pi = rng.permutation(n)
            c1, c2, nxt, ev = int(pi[c1]), int(pi[c2]), int(pi[nxt]), _relabelled(ev, pi)
        p, a = render_example(catalogue, c1, c2, ev, use_ev, nxt, top_r)
        prompts.append(p)
        answers.append(a)
    return Examples(prompts, answers)
