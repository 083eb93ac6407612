"""How much a new transition table changes the recommendations of the one it would replace.

A refresh keeps the adapter and changes only the evidence in the prompt, so the share of pairs whose top-1
changed is its ``rag_change``: the paper's measure of whether the LLM reads its evidence (its RAG outputs
differed from non-RAG ones 92% of the time). A figure near 0 on a refresh means the model ignores the
evidence it is given, and the refresh was wasted work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Table = Mapping[tuple[int, int], Sequence[int]]


@dataclass(frozen=True)
class TableChange:
    """The change from an old table to a new one, over the pairs both hold."""

    pairs: int  #: pairs in both tables (the figures' denominator)
    top1_changed: float  #: share of those pairs whose top-1 differs
    top5_overlap: float  #: mean |old top-5 ∩ new top-5| / 5

    def as_metrics(self) -> dict[str, float | int]:
        return {"changePairs": self.pairs, "top1Changed": self.top1_changed, "top5Overlap": self.top5_overlap}


def table_change(old: Table, new: Table, k: int = 5) -> TableChange:
    """Compare two tables pair by pair (ids < 0 are padding and ignored). No common pair: zeros."""
    changed = overlap = n = 0
    for pair, new_ids in new.items():
        old_ids = old.get(pair)
        if old_ids is None:
            continue
        a = [int(c) for c in old_ids if c >= 0]
        b = [int(c) for c in new_ids if c >= 0]
        n += 1
        changed += a[:1] != b[:1]
        overlap += len(set(a[:k]) & set(b[:k]))
    if n == 0:
        return TableChange(0, 0.0, 0.0)
    return TableChange(n, changed / n, overlap / (n * k))
