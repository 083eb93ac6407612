"""The canonical in-memory shapes every stage shares: catalogue, interaction log, triples, evidence.

Arrays, not objects per row: the pipeline is vectorised end to end (numpy), so a 10M-row log is a
handful of contiguous buffers rather than 10M Python objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

_NORM = re.compile(r"[^a-z0-9]+")


def normalize_name(text: str) -> str:
    """Case- and punctuation-insensitive form used for exact-match mapping of generated names."""
    return _NORM.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class Cluster:
    """One interest cluster: a dense integer id, a unique name and keywords that describe it."""

    id: int
    name: str
    keywords: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return ", ".join(self.keywords) if self.keywords else self.name


@dataclass
class Catalogue:
    """Clusters indexed by their dense id (clusters[i].id == i)."""

    clusters: list[Cluster]
    _by_norm: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for i, c in enumerate(self.clusters):
            if c.id != i:
                raise ValueError(f"cluster ids must be dense 0..n-1; position {i} holds id {c.id}")
        self._by_norm = {normalize_name(c.name): c.id for c in self.clusters}
        if len(self._by_norm) != len(self.clusters):
            raise ValueError("cluster names must be unique after normalisation")

    def __len__(self) -> int:
        return len(self.clusters)

    def name(self, cluster_id: int) -> str:
        return self.clusters[cluster_id].name

    def lookup(self, name: str) -> int | None:
        """Exact (normalised) match of a generated name to a cluster id, or None."""
        return self._by_norm.get(normalize_name(name))


@dataclass
class InteractionLog:
    """Interactions as parallel arrays. Items are dense ids 0..n_items-1; item_cluster maps them."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    ts: np.ndarray  # int64, unix seconds
    weight: np.ndarray  # float32 (rating, or 1.0 for implicit feedback)
    item_cluster: np.ndarray  # int32, item id -> cluster id
    catalogue: Catalogue

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> InteractionLog:
        return InteractionLog(
            self.user[mask],
            self.item[mask],
            self.ts[mask],
            self.weight[mask],
            self.item_cluster,
            self.catalogue,
        )

    def window(self, start: int | None, end: int | None) -> InteractionLog:
        """Interactions with start <= ts < end (either bound open when None)."""
        mask = np.ones(len(self), dtype=bool)
        if start is not None:
            mask &= self.ts >= start
        if end is not None:
            mask &= self.ts < end
        return self.select(mask)


@dataclass
class Triples:
    """Training/evaluation examples (c1, c2) -> c_next, with c_next not in {c1, c2}; c2 is the newest."""

    user: np.ndarray  # int64
    ts: np.ndarray  # int64, time of the c_next interaction
    c1: np.ndarray  # int32
    c2: np.ndarray  # int32
    c_next: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.c1)

    def select(self, mask: np.ndarray) -> Triples:
        return Triples(self.user[mask], self.ts[mask], self.c1[mask], self.c2[mask], self.c_next[mask])

    def window(self, start: int | None, end: int | None) -> Triples:
        mask = np.ones(len(self), dtype=bool)
        if start is not None:
            mask &= self.ts >= start
        if end is not None:
            mask &= self.ts < end
        return self.select(mask)


@dataclass(frozen=True)
class Successor:
    """One evidence line: a successor cluster of a pair, its share of the pair's support and its score."""

    cluster: int
    share: float
    count: int
    score: float
    borrowed: bool = False


@dataclass(frozen=True)
class PairEvidence:
    """Evidence for one context pair: ranked successors, support, and where borrowed evidence came from."""

    c1: int
    c2: int
    support: int
    successors: tuple[Successor, ...]
    borrowed_from: tuple[tuple[int, int], ...] = ()

    @property
    def borrowed(self) -> bool:
        return bool(self.borrowed_from)
