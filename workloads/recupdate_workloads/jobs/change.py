"""How much a new transition table changes what is served, against the active one (pure, no I/O).

Two figures over the context pairs both tables hold: the share of pairs whose top-1 cluster changed, and the
mean overlap of the top-k lists (k = 5 by default): |A ∩ B| / max(|A|, |B|), so two identical lists overlap
1 even when a pair has fewer than k clusters. Pairs only one table holds are counted apart (new, dropped): they are neither changed
nor kept. A fine-tune's and a refresh's candidate are measured the same way, and so can any other caller
with two tables of ranked cluster ids (e.g. a refresh's RAG change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Pair = tuple[int, int]
RankedTable = Mapping[Pair, Sequence[int]]


@dataclass(frozen=True)
class TableChange:
    """The change of a candidate table against the active one."""

    pairs: int  # pairs both tables hold (the figures are over these)
    top1_changed: float  # share of those whose top-1 cluster differs (0 when there are none)
    top_k_overlap: float  # mean |A ∩ B| / max(|A|, |B|) of the top-k lists over those (1 when there are none)
    new_pairs: int  # pairs only the candidate holds
    dropped_pairs: int  # pairs only the active table holds
    k: int = 5

    def as_dict(self) -> dict[str, Any]:
        """The camelCase record stored with the release (releases.metrics.change) and shown in status."""
        return {
            "pairs": self.pairs,
            "top1Changed": round(self.top1_changed, 6),
            f"top{self.k}Overlap": round(self.top_k_overlap, 6),
            "newPairs": self.new_pairs,
            "droppedPairs": self.dropped_pairs,
        }


def table_change(candidate: RankedTable, active: RankedTable, k: int = 5) -> TableChange:
    """The change from `active` to `candidate`; each maps a context pair to its clusters, best first.
    Ids < 0 are padding and ignored."""
    if k < 1:
        raise ValueError("k must be at least 1")
    shared = candidate.keys() & active.keys()
    changed = 0
    overlap = 0.0
    for pair in shared:
        a = [int(c) for c in candidate[pair] if c >= 0][:k]
        b = [int(c) for c in active[pair] if c >= 0][:k]
        if (a[0] if a else None) != (b[0] if b else None):
            changed += 1
        longest = max(len(a), len(b))
        overlap += len(set(a) & set(b)) / longest if longest else 1.0
    n = len(shared)
    return TableChange(
        pairs=n,
        top1_changed=changed / n if n else 0.0,
        top_k_overlap=overlap / n if n else 1.0,
        new_pairs=len(candidate.keys() - shared),
        dropped_pairs=len(active.keys() - shared),
        k=k,
    )
