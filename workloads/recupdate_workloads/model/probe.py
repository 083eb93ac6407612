"""The evidence-use probe: does a base model bootstrapped the way the product bootstraps it read its evidence?

RAG rests on the model reading the evidence in its prompt. The probe bootstraps bases on the synthetic drift
stream's history (``model.bootstrap.bootstrap`` with the product's evidence lookup, ``training_evidence``)
and scores them on the next period's pairs, shown the evidence published at the boundary (a snapshot no
training prompt held):

- ``copy_agreement``: a base trained where every evidence-bearing answer is the evidence's top-1; the share of
  held-out pairs whose top-1 is the top-1 of the evidence shown. It tells whether the model *can* learn to copy.
- ``swap_follow``: a base trained on the real answers, shown another pair's evidence (one whose top-1 differs
  from the pair's own and is not c1 or c2); the share whose top-1 is the shown evidence's top-1.
- ``rag_change``: that base's top-1 with the evidence against without any evidence block (the paper: RAG
  outputs differed from non-RAG ones 92% of the time), next to ``seed_change``: two bases trained alike with
  different seeds, both without evidence, i.e. the change that is noise.

It also measures what the training prompts carry (the suspects when a model ignores its evidence): the share of
examples whose evidence is ``none``, how old it is, how often its top-1 is the answer, against how often the
pair's own most frequent answer in the training set is (what a model gets by memorising pairs), and hit rates
of the real base on the held-out triples, with and without evidence, against the evidence alone (``counts``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recupdate_workloads.data import evidence as evidence_mem
from recupdate_workloads.data.sequences import period_edges, triples
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.data.types import Catalogue, PairEvidence, Triples
from recupdate_workloads.model.prompt import DEFAULT_TOP_R, render_many

DAY = 86_400


@dataclass(frozen=True)
class ProbeSetting:
    """What the probe trains and scores. The defaults are the synthetic replay's first boundary."""

    interactions: int = 100_000
    data_seed: int = 7
    clusters: int = 30
    period_days: int = 90
    train_periods: int = 2
    min_support: int = 3
    #: held-out pairs only where the evidence shown has at least this support (0: every pair with evidence)
    held_out_support: int = 0
    top_r: int = DEFAULT_TOP_R
    #: refresh step of the training prompts' evidence (days); None: the product's (``training_step``)
    evidence_step_days: int | None = None
    size: str = "small"
    epochs: int = 8
    max_examples: int = 40_000
    seeds: tuple[int, int] = (0, 1)
    #: keyword arguments passed on to ``bootstrap`` (lr, evidence_dropout, ...): the knobs under test.
    bootstrap_kwargs: dict[str, Any] = field(default_factory=dict)
    #: bases to train: "copy" (copy_agreement), "real" (swap_follow, rag_change), "seed" (seed_change).
    runs: tuple[str, ...] = ("copy", "real", "seed")


@dataclass
class ProbeData:
    catalogue: Catalogue
    history: Triples  # every triple before the boundary
    lookup: evidence_mem.Lookup  # the training prompts' evidence, as the product's bootstrap builds it
    test: Triples  # the period after the boundary
    evidence: dict[tuple[int, int], PairEvidence]  # published at the boundary
    pairs: np.ndarray  # int32[n, 2]: held-out pairs (test pairs with evidence)
    popular: np.ndarray  # clusters by popularity over the window before the boundary


def probe_data(s: ProbeSetting) -> ProbeData:
    spec = SyntheticSpec(
        n_interactions=s.interactions, n_clusters=s.clusters, period_days=s.period_days, seed=s.data_seed
    )
    stream = SyntheticStream(spec)
    t = triples(stream.generate(), 3.5)
    period = s.period_days * DAY
    edges = period_edges(int(t.ts.min()), int(t.ts.max()) + 1, period)
    if len(edges) < s.train_periods + 2:
        raise ValueError(f"the data spans {len(edges) - 1} periods; the probe needs {s.train_periods + 1}")
    boundary = edges[s.train_periods]
    history = t.window(None, boundary)
    k = len(stream.catalogue)
    step = s.evidence_step_days * DAY if s.evidence_step_days else None
    lookup = evidence_mem.training_evidence(history, k, period, s.top_r, s.min_support, step)
    recent = t.window(boundary - period, boundary)
    evidence = evidence_mem.evidence_of(recent, k, s.top_r, s.min_support)
    test = t.window(boundary, boundary + period)
    pairs = np.unique(np.stack([test.c1, test.c2], axis=1), axis=0).astype(np.int32)
    pairs = pairs[
        [(e := evidence.get((int(a), int(b)))) is not None and e.support >= s.held_out_support for a, b in pairs]
    ]
    popular = np.argsort(-np.bincount(recent.c_next, minlength=k), kind="stable").astype(np.int32)
    return ProbeData(stream.catalogue, history, lookup, test, evidence, pairs, popular)


def copy_targets(t: Triples, lookup: evidence_mem.Lookup) -> Triples:
    """The same triples, each answer that has evidence replaced by the evidence's top-1."""
    nxt = t.c_next.copy()
    for i in range(len(t)):
        e = lookup(int(t.c1[i]), int(t.c2[i]), int(t.ts[i]))
        if e is not None and e.successors:
            nxt[i] = e.successors[0].cluster
    return Triples(t.user, t.ts, t.c1, t.c2, nxt)


def training_evidence_stats(t: Triples, lookup: evidence_mem.Lookup, n_clusters: int, step: int) -> dict[str, float]:
    """What the training prompts carry: share with no evidence, its age, and how well its top-1 predicts the
    answer against the pair's most frequent answer in the same triples (what memorising pairs gives)."""
    top1 = np.full(len(t), -1, np.int64)
    for i in range(len(t)):
        e = lookup(int(t.c1[i]), int(t.c2[i]), int(t.ts[i]))
        if e is not None and e.successors:
            top1[i] = e.successors[0].cluster
    has = top1 >= 0
    key = t.c1.astype(np.int64) * n_clusters + t.c2
    counts = np.zeros((n_clusters * n_clusters, n_clusters), np.int64)
    np.add.at(counts, (key, t.c_next), 1)
    memo = counts[key].argmax(1)
    # distinct evidence top-1s per pair: 1 means a pair's evidence never disagrees with itself
    per_pair: dict[int, set[int]] = {}
    for k_, e in zip(key[has].tolist(), top1[has].tolist(), strict=True):
        per_pair.setdefault(k_, set()).add(e)
    return {
        "examples": float(len(t)),
        "share_none": float(1 - has.mean()) if len(t) else 0.0,
        "age_days_median": float(np.median((t.ts % step) / DAY)) if len(t) else 0.0,
        "evidence_top1_hit": float((top1 == t.c_next).mean()) if len(t) else 0.0,
        "evidence_top1_hit_where_present": float((top1[has] == t.c_next[has]).mean()) if has.any() else 0.0,
        "pair_memo_top1_hit": float((memo == t.c_next).mean()) if len(t) else 0.0,
        "distinct_top1_per_pair": float(np.mean([len(v) for v in per_pair.values()])) if per_pair else 0.0,
    }


def top_ids(
    model: Any,
    tokenizer: Any,
    catalogue: Catalogue,
    pairs: np.ndarray,
    evidence: Sequence[PairEvidence | None] | None,
    with_evidence: bool,
    n: int = 5,
    top_r: int = DEFAULT_TOP_R,
) -> np.ndarray:
    """Top-n novel clusters per pair by likelihood, each pair shown ``evidence[i]`` (the product's ranking)."""
    from recupdate_workloads.model.generate import rank_clusters

    plist = [(int(a), int(b)) for a, b in pairs]
    prompts = render_many(catalogue, plist, evidence, with_evidence, top_r)
    ids, _ = rank_clusters(model, tokenizer, catalogue, prompts, n, 128, pairs.astype(np.int64))
    return ids


def swap_partners(pairs: np.ndarray, evidence: dict[tuple[int, int], PairEvidence], seed: int = 0) -> np.ndarray:
    """For each pair, another pair whose evidence's top-1 differs from its own and is neither c1 nor c2
    (-1 where none is found), so that following the shown evidence is told apart from the pair's own."""
    rng = np.random.default_rng(seed)
    own = np.array([evidence[(int(a), int(b))].successors[0].cluster for a, b in pairs])
    out = np.full(len(pairs), -1, np.int64)
    for i, (a, b) in enumerate(pairs.tolist()):
        for j in rng.permutation(len(pairs))[:64].tolist():
            if j != i and own[j] != own[i] and own[j] not in (a, b):
                out[i] = j
                break
    return out


def _hits(ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hit = ids == truth[:, None]
    return float(hit[:, 0].mean()), float(hit.any(1).mean())


def _evaluate_real(data: ProbeData, model: Any, tok: Any, s: ProbeSetting) -> dict[str, Any]:
    cat, pairs, ev = data.catalogue, data.pairs, data.evidence
    own = [ev[(int(a), int(b))] for a, b in pairs]
    own_top1 = np.array([e.successors[0].cluster for e in own])
    with_ev = top_ids(model, tok, cat, pairs, own, True, 1, s.top_r)[:, 0]
    without = top_ids(model, tok, cat, pairs, None, False, 1, s.top_r)[:, 0]
    partner = swap_partners(pairs, ev)
    ok = partner >= 0
    shown = [own[j] for j in partner[ok]]
    swapped = top_ids(model, tok, cat, pairs[ok], shown, True, 1, s.top_r)[:, 0]
    shown_top1 = own_top1[partner[ok]]
    # hit rates on the held-out triples: evidence (own, or none for pairs without), no evidence, the evidence alone
    test = data.test
    tp = np.stack([test.c1, test.c2], axis=1).astype(np.int32)
    uniq, inv = np.unique(tp, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    u_ev = [ev.get((int(a), int(b))) for a, b in uniq]
    r_ev = top_ids(model, tok, cat, uniq, u_ev, True, 5, s.top_r)[inv]
    r_no = top_ids(model, tok, cat, uniq, None, False, 5, s.top_r)[inv]
    counts = np.stack(
        [_evidence_top(e, data.popular, (int(a), int(b)), 5) for (a, b), e in zip(uniq, u_ev, strict=True)]
    )[inv]
    return {
        "swap_follow": float((swapped == shown_top1).mean()) if ok.any() else 0.0,
        "swap_keeps_own": float((swapped == own_top1[ok]).mean()) if ok.any() else 0.0,
        "swap_pairs": int(ok.sum()),
        "own_follow": float((with_ev == own_top1).mean()),
        "rag_change": float((with_ev != without).mean()),
        "hr_with_evidence": _hits(r_ev, test.c_next),
        "hr_without_evidence": _hits(r_no, test.c_next),
        "hr_counts": _hits(counts, test.c_next),
        "_no_evidence_top1": without,
    }


def _evidence_top(e: PairEvidence | None, popular: np.ndarray, pair: tuple[int, int], n: int) -> np.ndarray:
    ranked = [s.cluster for s in e.successors] if e is not None else []
    return np.array(evidence_mem.popular_fill(ranked, popular, pair, n), np.int64)


#: Support buckets of ``copy_agreement_by_support``: held-out pairs are mostly sparse, training triples are not.
SUPPORT_BUCKETS = ((3, 5), (5, 10), (10, 30), (30, None))


def _by_support(agree: np.ndarray, support: np.ndarray) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for lo, hi in SUPPORT_BUCKETS:
        m = (support >= lo) & (support < hi if hi is not None else True)
        out[f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"] = float(agree[m].mean()) if m.any() else None
    return out


def _step(s: ProbeSetting) -> int:
    return s.evidence_step_days * DAY if s.evidence_step_days else evidence_mem.training_step(s.period_days * DAY)


def run_probe(s: ProbeSetting, workdir: str | Path | None = None) -> dict[str, Any]:
    """Train the bases of ``s.runs`` and return the probe's figures (see the module doc)."""
    from recupdate_workloads.model.bootstrap import bootstrap, load_base

    data = probe_data(s)
    k = len(data.catalogue)
    out: dict[str, Any] = {
        "setting": {**asdict(s), "seeds": list(s.seeds), "runs": list(s.runs)},
        "held_out_pairs": len(data.pairs),
        "held_out_triples": len(data.test),
        "training": training_evidence_stats(data.history, data.lookup, k, _step(s)),
    }
    tmp = tempfile.TemporaryDirectory(prefix="recupdate-probe-") if workdir is None else None
    root = Path(tmp.name if tmp else workdir)  # type: ignore[arg-type]
    common = {"size": s.size, "epochs": s.epochs, "max_examples": s.max_examples, **s.bootstrap_kwargs}
    seconds: dict[str, float] = {}
    try:
        if "copy" in s.runs:
            t0 = time.process_time()
            d = bootstrap(
                data.catalogue,
                copy_targets(data.history, data.lookup),
                data.lookup,
                root / "copy",
                seed=s.seeds[0],
                **common,
            )
            model, tok = load_base(d)
            own = [data.evidence[(int(a), int(b))] for a, b in data.pairs]
            top1 = top_ids(model, tok, data.catalogue, data.pairs, own, True, 1, s.top_r)[:, 0]
            agree = top1 == np.array([e.successors[0].cluster for e in own])
            out["copy_agreement"] = float(agree.mean())
            out["copy_agreement_by_support"] = _by_support(agree, np.array([e.support for e in own]))
            seconds["copy"] = time.process_time() - t0
        no_ev: list[np.ndarray] = []
        for name, seed in (("real", s.seeds[0]), ("seed", s.seeds[1])):
            if name not in s.runs:
                continue
            t0 = time.process_time()
            d = bootstrap(data.catalogue, data.history, data.lookup, root / name, seed=seed, **common)
            model, tok = load_base(d)
            if name == "real":
                res = _evaluate_real(data, model, tok, s)
                no_ev.append(res.pop("_no_evidence_top1"))
                out |= res
            else:
                no_ev.append(top_ids(model, tok, data.catalogue, data.pairs, None, False, 1, s.top_r)[:, 0])
            seconds[name] = time.process_time() - t0
        if len(no_ev) == 2:
            out["seed_change"] = float((no_ev[0] != no_ev[1]).mean())
    finally:
        if tmp is not None:
            tmp.cleanup()
    out["cpu_seconds"] = seconds
    return out


def before_fix(s: ProbeSetting) -> ProbeSetting:
    """``s`` with the bootstrap as it was before the fix: training evidence refreshed once per window, and no
    relabelled examples."""
    from dataclasses import replace

    return replace(s, evidence_step_days=s.period_days, bootstrap_kwargs={**s.bootstrap_kwargs, "relabel": 0.0})
