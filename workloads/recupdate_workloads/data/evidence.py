"""Evidence computed in memory, for the places that need many snapshots at once: training examples carry
the evidence *as of their own time*, and evaluation needs evidence as of the held-out boundary.

Same ranking as the store's frequency scoring (share of the pair's support, ties by count then id); no
neighbour borrowing (that is the store's job, at serving and materialization time).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recupdate_workloads.data.sequences import successor_counts
from recupdate_workloads.data.types import PairEvidence, Successor, Triples


def evidence_of(t: Triples, n_clusters: int, top_r: int, min_support: int) -> dict[tuple[int, int], PairEvidence]:
    c1, c2, cn, cnt = successor_counts(t, n_clusters)
    if not len(c1):
        return {}
    pair = c1.astype(np.int64) * n_clusters + c2
    order = np.lexsort((cn, -cnt, pair))  # by pair, then count desc, then successor id
    pair, c1, c2, cn, cnt = pair[order], c1[order], c2[order], cn[order], cnt[order]
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    support = np.add.reduceat(cnt, starts)
    out: dict[tuple[int, int], PairEvidence] = {}
    bounds = np.r_[starts, len(pair)]
    for j, s in enumerate(starts.tolist()):
        if support[j] < min_support:
            continue
        e = min(bounds[j + 1], s + top_r)
        sup = int(support[j])
        succ = tuple(Successor(int(cn[i]), float(cnt[i]) / sup, int(cnt[i]), float(cnt[i]) / sup) for i in range(s, e))
        out[(int(c1[s]), int(c2[s]))] = PairEvidence(int(c1[s]), int(c2[s]), sup, succ)
    return out


#: f(c1, c2, ts): the evidence of the pair as of time ts, or None.
Lookup = Callable[[int, int, int], PairEvidence | None]


def as_of(t: Triples, n_clusters: int, window: int, step: int, top_r: int, min_support: int) -> Lookup:
    """Evidence lookup f(c1, c2, ts): the snapshot over [b - window, b) for the last step boundary b <= ts,
    i.e. what a refresh every `step` seconds would have published by then."""
    cache: dict[int, dict[tuple[int, int], PairEvidence]] = {}

    def lookup(c1: int, c2: int, ts: int) -> PairEvidence | None:
        b = ts - ts % step
        if b not in cache:
            cache[b] = evidence_of(t.window(b - window, b), n_clusters, top_r, min_support)
        return cache[b].get((c1, c2))

    return lookup


#: Training prompts' evidence is refreshed this many times per retrieval window (see ``training_evidence``).
TRAINING_REFRESHES_PER_WINDOW = 30


def training_step(window: int) -> int:
    """How often the evidence of training prompts is refreshed: 1/30 of the window, at least an hour."""
    return max(window // TRAINING_REFRESHES_PER_WINDOW, 3600)


def training_evidence(
    history: Triples, n_clusters: int, window: int, top_r: int, min_support: int, step: int | None = None
) -> Lookup:
    """The evidence of training prompts (a base's bootstrap, a fine-tune's examples; replay and jobs alike):
    each triple's pair's evidence as of its own time, over the window before it.

    Refreshed often (``training_step``). Refreshed once per window instead, 45% of a bootstrap's prompts on the
    synthetic stream carried no evidence and a pair's evidence never changed within one (1.00 distinct top-1
    per pair), so memorising the pair answered exactly as well as reading it, and the model did not read it."""
    return as_of(history, n_clusters, window, step or training_step(window), top_r, min_support)


def popular_fill(ranked: list[int], popular: np.ndarray, exclude: tuple[int, int], n: int) -> list[int]:
    """The first n of ``ranked`` that are not in ``exclude`` (a pair's own clusters), then the most popular
    others; padded with -1: how a count table answers (replay's ``counts``, the probe's evidence alone)."""
    out = [c for c in ranked if c not in exclude][:n]
    for c in popular.tolist():
        if len(out) >= n:
            break
        if c not in exclude and c not in out:
            out.append(c)
    return out + [-1] * (n - len(out))
