"""A tiny deterministic recommendation task for model tests and benchmarks (not the drift generator).

Clusters 0..n-1 carry genre-like names and keywords; the next cluster follows a fixed rule of (c1, c2), with
an optional share of random noise, so a model that learns the rule scores a known hit rate.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from recupdate_workloads.data.types import Catalogue, Cluster, PairEvidence, Successor, Triples

_WORDS = [
    "action",
    "adventure",
    "animation",
    "comedy",
    "crime",
    "documentary",
    "drama",
    "fantasy",
    "horror",
    "musical",
    "mystery",
    "romance",
    "thriller",
    "war",
    "western",
    "noir",
]
_MOODS = [
    "dark",
    "light",
    "epic",
    "quiet",
    "fast",
    "slow",
    "warm",
    "cold",
    "loud",
    "gentle",
    "bold",
    "odd",
    "sharp",
    "soft",
    "wild",
    "calm",
]

Rule = Callable[[int, int, int], int]


def rule_a(c1: int, c2: int, n: int) -> int:
    """The default rule: (c1 + 2*c2) mod n."""
    return (c1 + 2 * c2) % n


def rule_b(c1: int, c2: int, n: int) -> int:
    """Another rule, for "the world changed" tests: (3*c1 + c2 + 1) mod n."""
    return (3 * c1 + c2 + 1) % n


def rule_shift(k: int) -> Rule:
    """c_next = c2 + k (mod n): a rule a tiny model learns in a few hundred steps."""

    def rule(c1: int, c2: int, n: int) -> int:
        return (c2 + k) % n

    return rule


def toy_catalogue(n: int = 10) -> Catalogue:
    """n clusters (3 <= n <= 240) named "<Word>|<Word>" with those two words and a mood as keywords."""
    w = len(_WORDS)
    if not 3 <= n <= w * (w - 1):
        raise ValueError(f"n must be in 3..{w * (w - 1)}")
    clusters = []
    for i in range(n):
        a, b = _WORDS[i % w], _WORDS[(i % w + 1 + i // w) % w]
        clusters.append(Cluster(i, f"{a.title()}|{b.title()}", (a, b, _MOODS[i % len(_MOODS)])))
    return Catalogue(clusters)


def next_cluster(rule: Rule, c1: int, c2: int, n: int) -> int:
    """The rule's answer, moved forward past c1 and c2 so it is always novel."""
    c = rule(c1, c2, n) % n
    while c in (c1, c2):
        c = (c + 1) % n
    return c


def toy_triples(
    catalogue: Catalogue,
    size: int,
    *,
    rule: Rule = rule_a,
    noise: float = 0.0,
    seed: int = 0,
    users: int = 1000,
) -> Triples:
    """``size`` triples with uniform random pairs and c_next = rule (or, with prob. ``noise``, a random novel
    cluster). Timestamps increase with the row index."""
    n = len(catalogue)
    rng = np.random.default_rng(seed)
    c1 = rng.integers(0, n, size)
    c2 = (c1 + rng.integers(1, n, size)) % n
    nxt = np.array([next_cluster(rule, int(a), int(b), n) for a, b in zip(c1, c2, strict=True)], dtype=np.int64)
    noisy = rng.random(size) < noise
    for i in np.flatnonzero(noisy):
        choices = [c for c in range(n) if c not in (c1[i], c2[i])]
        nxt[i] = choices[int(rng.integers(0, len(choices)))]
    return Triples(
        user=rng.integers(0, users, size).astype(np.int64),
        ts=np.arange(size, dtype=np.int64) + 1_600_000_000,
        c1=c1.astype(np.int32),
        c2=c2.astype(np.int32),
        c_next=nxt.astype(np.int32),
    )


def toy_evidence(triples: Triples, top_r: int = 5) -> dict[tuple[int, int], PairEvidence]:
    """Frequency evidence per pair counted over ``triples`` (one snapshot)."""
    counts: dict[tuple[int, int], Counter[int]] = defaultdict(Counter)
    for a, b, c in zip(triples.c1, triples.c2, triples.c_next, strict=True):
        counts[(int(a), int(b))][int(c)] += 1
    out: dict[tuple[int, int], PairEvidence] = {}
    for (a, b), cnt in counts.items():
        support = sum(cnt.values())
        succ = tuple(
            Successor(cluster=c, share=k / support, count=k, score=k / support) for c, k in cnt.most_common(top_r)
        )
        out[(a, b)] = PairEvidence(c1=a, c2=b, support=support, successors=succ)
    return out


def hit_rate(ranked: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true cluster is among the first k ranked ids."""
    if len(truth) == 0:
        return 0.0
    return float((ranked[:, :k] == np.asarray(truth)[:, None]).any(axis=1).mean())
