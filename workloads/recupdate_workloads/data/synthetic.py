"""A deterministic synthetic interaction stream with known, controlled interest drift.

Ground truth is a per-period transition structure P_t(c_next | c1, c2):
- every period a fixed fraction of contexts (`drift`) re-draw their preferred successors, so what
  was true last period is partly wrong now (the reason to refresh evidence);
- trends: a few clusters get a popularity bump that rises and fades over a few periods;
- some clusters appear only after a birth period (new interests);
- a slowly-moving long-term component that only a model trained on long history picks up.

Users walk a Markov chain over clusters driven by P_t at each interaction's time, emitting items of
the current cluster, some repeats and some negative ratings (to exercise the positive filter).
Everything is drawn from numpy's PCG64 with a fixed seed, so a size and a seed give the same log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog

DAY = 86_400
EPOCH = 1_577_836_800  # 2020-01-01T00:00:00Z: synthetic time starts here

_WORDS = [
    "noir",
    "western",
    "space",
    "opera",
    "heist",
    "romance",
    "horror",
    "comedy",
    "musical",
    "documentary",
    "anime",
    "war",
    "sports",
    "mystery",
    "fantasy",
    "cyberpunk",
    "satire",
    "thriller",
    "biopic",
    "family",
    "courtroom",
    "disaster",
    "spy",
    "zombie",
    "superhero",
    "samurai",
    "pirate",
    "detective",
    "robot",
    "dinosaur",
    "vampire",
    "ghost",
    "alien",
    "dragon",
    "wizard",
    "knight",
    "cowboy",
    "ninja",
    "monster",
    "chef",
    "dancer",
    "surfer",
    "racer",
    "boxer",
    "hacker",
    "astronaut",
]
_FLAVOURS = ("classic", "indie", "epic", "dark", "light", "retro", "modern", "cult")


def synthetic_catalogue(n_clusters: int) -> Catalogue:
    """Deterministic, unique cluster names such as 'dark heist', each with three keywords."""
    clusters = []
    for i in range(n_clusters):
        word = _WORDS[i % len(_WORDS)]
        flavour = _FLAVOURS[(i // len(_WORDS)) % len(_FLAVOURS)]
        name = word if i < len(_WORDS) else f"{flavour} {word}"
        if i >= len(_WORDS) * (1 + len(_FLAVOURS)):
            name = f"{name} {i}"
        kw = (word, flavour, _WORDS[(i * 7 + 3) % len(_WORDS)])
        clusters.append(Cluster(id=i, name=name, keywords=kw))
    return Catalogue(clusters)


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and drift of the synthetic stream. Defaults give ~100k interactions over two years."""

    n_interactions: int = 100_000
    n_clusters: int = 30
    items_per_cluster: int = 20
    steps_per_user: int = 50
    days: int = 720
    period_days: int = 90
    drift: float = 0.35  # fraction of contexts whose preferred successors change each period
    concentration: float = 4.0  # how peaked a context's successor distribution is
    n_trends: int = 3
    n_late_clusters: int = 2
    negative_rate: float = 0.15
    repeat_rate: float = 0.2
    seed: int = 7

    @property
    def n_users(self) -> int:
        return max(1, self.n_interactions // self.steps_per_user)

    @property
    def n_periods(self) -> int:
        return -(-self.days // self.period_days)

    @property
    def start(self) -> int:
        return EPOCH

    @property
    def end(self) -> int:
        return EPOCH + self.days * DAY


def transition_structure(spec: SyntheticSpec) -> np.ndarray:
    """P[period, c1, c2, c_next] (float32), rows normalised, c_next in {c1, c2} impossible."""
    rng = np.random.default_rng([spec.seed, 1])
    k, n_p = spec.n_clusters, spec.n_periods
    # Long-term taste: a stable low-rank affinity, the part a fine-tuned model can learn once.
    emb = rng.normal(size=(k, 4))
    longterm = (emb @ emb.T)[None, :, :] * 0.5 + (emb @ emb.T)[:, None, :] * 0.8  # [c1, c2, next]
    pref = rng.normal(size=(k, k, k)) * spec.concentration
    logits = np.empty((n_p, k, k, k), dtype=np.float32)
    birth = np.zeros(k, dtype=int)
    if spec.n_late_clusters:
        late = rng.choice(k, size=min(spec.n_late_clusters, k - 3), replace=False)
        birth[late] = rng.integers(max(1, n_p // 3), max(2, n_p), size=len(late))
    trend_cluster = rng.choice(k, size=spec.n_trends, replace=False) if spec.n_trends else np.zeros(0, int)
    trend_peak = rng.integers(0, n_p, size=len(trend_cluster))
    for p in range(n_p):
        if p > 0:
            moved = rng.random((k, k)) < spec.drift
            pref[moved] = rng.normal(size=(int(moved.sum()), k)) * spec.concentration
        lg = pref + longterm
        for c, peak in zip(trend_cluster, trend_peak, strict=True):
            lg[:, :, c] += 2.5 * np.exp(-0.5 * (p - peak) ** 2)
        lg[:, :, birth > p] = -np.inf
        logits[p] = lg
    idx = np.arange(k)
    logits[:, idx, :, idx] = -np.inf  # c_next == c1
    logits[:, :, idx, idx] = -np.inf  # c_next == c2
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.nan_to_num(probs).astype(np.float32)


class SyntheticStream:
    """Generates the log in chunks of whole users, so 10M interactions never sit in memory at once."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.catalogue = synthetic_catalogue(spec.n_clusters)
        self.P = transition_structure(spec)
        k = spec.n_clusters
        self.item_cluster = np.repeat(np.arange(k, dtype=np.int32), spec.items_per_cluster)

    def chunks(self, users_per_chunk: int = 20_000) -> Iterator[InteractionLog]:
        s = self.spec
        for first in range(0, s.n_users, users_per_chunk):
            n = min(users_per_chunk, s.n_users - first)
            yield self._users(first, n)

    def generate(self) -> InteractionLog:
        parts = list(self.chunks())
        return InteractionLog(
            user=np.concatenate([p.user for p in parts]),
            item=np.concatenate([p.item for p in parts]),
            ts=np.concatenate([p.ts for p in parts]),
            weight=np.concatenate([p.weight for p in parts]),
            item_cluster=self.item_cluster,
            catalogue=self.catalogue,
        )

    def _users(self, first: int, n: int) -> InteractionLog:
        s = self.spec
        rng = np.random.default_rng([s.seed, 2, first])
        steps, k = s.steps_per_user, s.n_clusters
        span = s.days * DAY
        # Each user is active over a stretch of the timeline, so every period sees fresh sequences.
        active = rng.uniform(0.05, 0.3, size=n) * span
        start = rng.uniform(0, span - active)
        ts = np.sort(rng.uniform(0, 1, size=(n, steps)), axis=1) * active[:, None] + start[:, None]
        ts = ts.astype(np.int64)
        period = np.minimum(ts // (s.period_days * DAY), s.n_periods - 1)
        # Users start in two distinct clusters that exist from the first period on.
        born = np.flatnonzero(self.P[0].sum(axis=(0, 1)) > 0)
        c = np.empty((n, steps), dtype=np.int32)
        first_two = np.argsort(rng.random((n, len(born))), axis=1)[:, :2]
        c[:, :2] = born[first_two]
        for j in range(2, steps):
            p = self.P[period[:, j], c[:, j - 2], c[:, j - 1]]
            cdf = np.cumsum(p, axis=1)
            draw = (cdf < rng.random(n)[:, None] * cdf[:, -1:]).sum(axis=1)
            c[:, j] = np.minimum(draw, k - 1)
            repeat = rng.random(n) < s.repeat_rate
            c[repeat, j] = c[repeat, j - 1]
        items = c * s.items_per_cluster + rng.integers(0, s.items_per_cluster, size=(n, steps))
        weight = rng.choice(np.array([4.0, 4.5, 5.0], dtype=np.float32), size=(n, steps))
        neg = rng.random((n, steps)) < s.negative_rate
        weight[neg] = rng.choice(np.array([1.0, 2.0], dtype=np.float32), size=int(neg.sum()))
        user = np.repeat(np.arange(first, first + n, dtype=np.int64), steps)
        return InteractionLog(
            user=user,
            item=items.reshape(-1).astype(np.int64),
            ts=ts.reshape(-1) + s.start,
            weight=weight.reshape(-1),
            item_cluster=self.item_cluster,
            catalogue=self.catalogue,
        )
