"""From interactions to (c1, c2, c_next) triples, vectorised.

A user's state is their last k=2 distinct clusters, from positive interactions only, with
consecutive repeats collapsed. After collapsing, neighbouring entries always differ, so the
context of entry i is simply (entry i-2, entry i-1); the example counts only when entry i is novel
(differs from both).
"""

from __future__ import annotations

import numpy as np

from recupdate_workloads.data.types import InteractionLog, Triples

CONTEXT_LENGTH = 2
#: successor_counts counts densely up to this many (c1, c2, c_next) keys (8 bytes each), else sorts.
DENSE_COUNT_LIMIT = 1 << 24
#: period_edges refuses more periods than this: their number comes from data values (a timestamp span), so
#: without a bound one far-off timestamp would allocate without limit.
MAX_PERIODS = 100_000


def collapsed_sequences(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    weight: np.ndarray,
    item_cluster: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive interactions, ordered per user by time (ties by item id), repeats collapsed.

    Returns (user, cluster, ts) of the collapsed sequence, grouped by user.
    """
    pos = weight >= threshold
    user, item, ts = user[pos], item[pos], ts[pos]
    if not _is_sorted(user, ts, item):  # the store streams rows sorted: skip the sort (the costliest step)
        order = np.lexsort((item, ts, user))
        user, item, ts = user[order], item[order], ts[order]
    cluster = item_cluster[item].astype(np.int32, copy=False)
    keep = np.ones(len(user), dtype=bool)
    if len(user) > 1:
        keep[1:] = (user[1:] != user[:-1]) | (cluster[1:] != cluster[:-1])
    return user[keep], cluster[keep], ts[keep]


def _is_sorted(user: np.ndarray, ts: np.ndarray, item: np.ndarray) -> bool:
    """Whether the rows are ordered by (user, ts, item)."""
    if len(user) < 2:
        return True
    du, dt, di = np.diff(user), np.diff(ts), np.diff(item)
    return bool(np.all((du > 0) | ((du == 0) & ((dt > 0) | ((dt == 0) & (di >= 0))))))


def triples_from_arrays(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    weight: np.ndarray,
    item_cluster: np.ndarray,
    threshold: float,
) -> Triples:
    """All novel-successor triples in the given interactions (which must hold whole user histories)."""
    u, c, t = collapsed_sequences(user, item, ts, weight, item_cluster, threshold)
    if len(u) < CONTEXT_LENGTH + 1:
        empty = np.zeros(0, dtype=np.int32)
        return Triples(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty.copy(), empty.copy())
    same_user = (u[2:] == u[1:-1]) & (u[1:-1] == u[:-2])
    novel = c[2:] != c[:-2]
    m = same_user & novel
    return Triples(
        user=u[2:][m].astype(np.int64, copy=False),
        ts=t[2:][m].astype(np.int64, copy=False),
        c1=c[:-2][m],
        c2=c[1:-1][m],
        c_next=c[2:][m],
    )


def triples(log: InteractionLog, threshold: float) -> Triples:
    """Triples of a whole log. Filter the result by time with Triples.window, so contexts may span
    the window's start (a user's state carries over from before the window)."""
    return triples_from_arrays(log.user, log.item, log.ts, log.weight, log.item_cluster, threshold)


def pair_key(c1: np.ndarray, c2: np.ndarray, n_clusters: int) -> np.ndarray:
    """Dense int64 key of an ordered pair, for grouping with numpy."""
    return c1.astype(np.int64) * n_clusters + c2.astype(np.int64)


def successor_counts(t: Triples, n_clusters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of (c1, c2, c_next) over the triples: returns (c1, c2, c_next, count), sorted by key."""
    key = pair_key(t.c1, t.c2, n_clusters) * n_clusters + t.c_next.astype(np.int64)
    if n_clusters**3 <= DENSE_COUNT_LIMIT:  # a bincount over every key: no sort
        dense = np.bincount(key, minlength=n_clusters**3)
        uniq = np.flatnonzero(dense)
        counts = dense[uniq]
    else:
        uniq, counts = np.unique(key, return_counts=True)
    pair, nxt = np.divmod(uniq, n_clusters)
    c1, c2 = np.divmod(pair, n_clusters)
    return c1.astype(np.int32), c2.astype(np.int32), nxt.astype(np.int32), counts.astype(np.int64)


def period_count(start: int, end: int, period: int) -> int:
    """How many periods of `period` seconds from `start` it takes to reach `end` (at least one)."""
    if period <= 0:
        raise ValueError("period must be positive")
    return max(1, -(-(end - start) // period))


def period_edges(start: int, end: int, period: int) -> list[int]:
    """Boundaries start, start+period, ... up to and including the first boundary >= end.

    ValueError (not an allocation proportional to the span) when that is more than MAX_PERIODS periods."""
    n = period_count(start, end, period)
    if n > MAX_PERIODS:
        raise ValueError(
            f"the data spans {n} periods of {period}s (from {start} to {end}), more than {MAX_PERIODS}: "
            "use a longer period"
        )
    return [start + i * period for i in range(n + 1)]
