import numpy as np
import pytest

from recupdate_workloads.data import sequences
from recupdate_workloads.data.sequences import collapsed_sequences, period_edges, successor_counts, triples
from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog

CAT = Catalogue([Cluster(i, n) for i, n in enumerate("ABCDE")])
A, B, C, D, E = range(5)


def _log(rows: list[tuple[int, int, int, float]]) -> InteractionLog:
    arr = np.array(rows, dtype=np.float64)
    return InteractionLog(
        user=arr[:, 0].astype(np.int64),
        item=arr[:, 1].astype(np.int64),  # item i belongs to cluster i
        ts=arr[:, 2].astype(np.int64),
        weight=arr[:, 3].astype(np.float32),
        item_cluster=np.arange(5, dtype=np.int32),
        catalogue=CAT,
    )


def test_triples_on_hand_made_sequences() -> None:
    log = _log(
        [
            # user 1: A A B (negative C) A C D  -> collapsed A B A C D
            (1, A, 10, 5),
            (1, A, 11, 5),
            (1, B, 12, 4),
            (1, C, 13, 1),
            (1, A, 14, 5),
            (1, C, 15, 5),
            (1, D, 16, 5),
            # user 2, given out of order: times 3,1,2 -> B C E ; tie at ts 3 broken by item id (D < E)
            (2, E, 3, 5),
            (2, B, 1, 5),
            (2, C, 2, 5),
            (2, D, 3, 5),
        ]
    )
    t = triples(log, threshold=3.5)
    got = sorted(zip(t.user.tolist(), t.c1.tolist(), t.c2.tolist(), t.c_next.tolist(), t.ts.tolist(), strict=True))
    # user 1: (A,B)->A not novel; (B,A)->C ; (A,C)->D.  user 2: B C D E: (B,C)->D, (C,D)->E
    assert got == [(1, A, C, D, 16), (1, B, A, C, 15), (2, B, C, D, 3), (2, C, D, E, 3)]


def test_collapse_and_positive_filter() -> None:
    log = _log([(1, A, 1, 5), (1, A, 2, 5), (1, B, 3, 2), (1, A, 4, 5), (1, C, 5, 5)])
    u, c, _ = collapsed_sequences(log.user, log.item, log.ts, log.weight, log.item_cluster, 3.5)
    assert c.tolist() == [A, C]  # the negative B does not break the A run
    assert u.tolist() == [1, 1]


def test_no_triples_across_users() -> None:
    log = _log([(1, A, 1, 5), (1, B, 2, 5), (2, C, 3, 5), (2, D, 4, 5)])
    assert len(triples(log, 3.5)) == 0


def test_successor_counts_and_windows() -> None:
    log = _log([(u, i, 10 * u + j, 5) for u in range(1, 4) for j, i in enumerate((A, B, C))])
    t = triples(log, 3.5)
    c1, c2, cn, cnt = successor_counts(t, 5)
    assert (c1.tolist(), c2.tolist(), cn.tolist(), cnt.tolist()) == ([A], [B], [C], [3])
    assert len(t.window(20, 30)) == 1
    assert period_edges(0, 10, 4) == [0, 4, 8, 12]


def test_sorted_and_shuffled_input_and_both_counting_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    n, k = 20_000, 12
    user = rng.integers(0, 300, n)
    ts = rng.integers(0, 50, n)  # many ties: broken by item id
    item = rng.integers(0, 40, n)
    weight = rng.choice([1.0, 4.0, 5.0], n).astype(np.float32)
    item_cluster = rng.integers(0, k, 40).astype(np.int32)
    cat = Catalogue([Cluster(i, f"c{i}") for i in range(k)])
    order = np.lexsort((item, ts, user))
    shuffled = InteractionLog(user, item, ts, weight, item_cluster, cat)
    ordered = InteractionLog(user[order], item[order], ts[order], weight[order], item_cluster, cat)
    a, b = triples(shuffled, 3.5), triples(ordered, 3.5)
    assert len(a) > 1000
    for f in ("user", "ts", "c1", "c2", "c_next"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    dense = successor_counts(a, k)
    monkeypatch.setattr(sequences, "DENSE_COUNT_LIMIT", 0)  # the sorting path
    for x, y in zip(dense, successor_counts(a, k), strict=True):
        assert np.array_equal(x, y)
