"""The drift measure (data/drift.py) against hand-made successor sets, and the drift rule (contract/drift.py)."""

import math

import numpy as np
import pytest

from recupdate_workloads.contract.drift import DriftFire, DriftRule, drift_fire
from recupdate_workloads.data.drift import top_sets, window_drift
from recupdate_workloads.data.sequences import pair_key
from recupdate_workloads.data.types import Triples

K = 20  # clusters


def _triples(rows: list[tuple[int, int, list[int]]], ts: int = 0) -> Triples:
    """Triples from (c1, c2, successors): one triple per successor listed (repeat one to weight it)."""
    c1, c2, nxt = [], [], []
    for a, b, succ in rows:
        c1 += [a] * len(succ)
        c2 += [b] * len(succ)
        nxt += succ
    n = len(nxt)
    return Triples(
        np.arange(n, dtype=np.int64),
        np.full(n, ts, np.int64),
        np.asarray(c1, np.int32),
        np.asarray(c2, np.int32),
        np.asarray(nxt, np.int32),
    )


def test_top_sets_are_the_five_most_frequent_ties_by_id() -> None:
    # successor 9 twice, 8 twice, then 3, 4, 5, 6 once: the top 5 is {9, 8} and the three smallest ids
    t = _triples([(0, 1, [9, 9, 8, 8, 6, 5, 4, 3])])
    key = pair_key(t.c1, t.c2, K)
    sets = top_sets(key, np.zeros(len(t), np.int64), t.c_next, min_support=1)
    assert sets == {(int(key[0]), 0): {9, 8, 3, 4, 5}}
    assert top_sets(key, np.zeros(len(t), np.int64), t.c_next, min_support=9) == {}  # 8 triples < 9


def test_window_drift_of_known_sets() -> None:
    # Context (0, 1): {2..6} then {4..8}: Jaccard 3/7. Context (2, 3): the same set twice: 1.
    # Context (4, 5) has too few triples in the new window and does not count.
    ref = _triples([(0, 1, [2, 3, 4, 5, 6] * 10), (2, 3, [7, 8, 9, 10, 11] * 2), (4, 5, [1, 2, 3] * 4)])
    new = _triples([(0, 1, [4, 5, 6, 7, 8] * 10), (2, 3, [7, 8, 9, 10, 11] * 2), (4, 5, [6])], ts=1)
    w = window_drift(ref, new, K, min_support=10, seed=3)
    assert w.contexts == 2
    assert w.jaccard == pytest.approx((3 / 7 + 1.0) / 2)
    assert w.drift == pytest.approx(1 - (3 / 7 + 1.0) / 2)
    # Shuffled windows mix the two sets of (0, 1): both top 5s hold 4, 5, 6 (20 triples each against 10 for
    # the others), so they overlap at least 3/7; the unchanged context contributes 1 to both.
    assert w.floor_jaccard >= w.jaccard
    assert w.excess == pytest.approx(w.floor_jaccard - w.jaccard)
    record = w.as_dict()
    assert record["contexts"] == 2 and record["excess"] == round(w.excess, 4)


def test_no_change_means_no_excess_and_no_support_means_none() -> None:
    rows = [(a, a + 1, [a + 2, a + 3, a + 4, a + 5, a + 6] * 3) for a in range(0, 10, 2)]
    same = window_drift(_triples(rows), _triples(rows, ts=1), K, min_support=10)
    assert same.jaccard == 1.0 and same.floor_jaccard == 1.0 and same.excess == 0.0 and same.contexts == 5
    empty = window_drift(_triples(rows), _triples([]), K, min_support=10)
    assert empty.contexts == 0 and empty.excess is None and math.isnan(empty.jaccard)
    assert empty.as_dict() == {
        "jaccard": None,
        "floorJaccard": None,
        "drift": None,
        "floor": None,
        "excess": None,
        "contexts": 0,
    }


def test_complete_change_is_far_beyond_the_floor() -> None:
    rng = np.random.default_rng(0)
    old = [(a, a + 1, list(rng.choice([2, 3, 4, 5, 6], 40))) for a in range(0, 10, 2)]
    new = [(a, a + 1, list(rng.choice([11, 12, 13, 14, 15], 40))) for a in range(0, 10, 2)]
    w = window_drift(_triples(old), _triples(new, ts=1), K, min_support=10)
    assert w.jaccard == 0.0 and w.contexts == 5
    # The shuffled windows each draw top 5s from all ten successors: they overlap by chance, the real ones never.
    assert w.excess is not None and w.excess > 0.25


RULE = DriftRule(threshold=0.1, min_interval=100, max_interval=1000)


@pytest.mark.parametrize(
    ("rule", "last", "measured_at", "excess", "expected"),
    [
        (RULE, None, 500, 0.9, None),  # never fine-tuned: the initial run is not the rule's business
        (RULE, 0, 500, 0.05, DriftFire(1000, "maxInterval")),  # below the threshold: only the cap
        (RULE, 0, 500, 0.1, DriftFire(500, "drift")),  # at the threshold: fires at the measurement
        (RULE, 0, 50, 0.3, DriftFire(100, "drift")),  # too soon after the last: waits for minInterval
        (RULE, 0, 0, 0.3, DriftFire(1000, "maxInterval")),  # the measurement that triggered it: not again
        (RULE, 600, 500, 0.3, DriftFire(1600, "maxInterval")),  # measured before the last fine-tune
        (RULE, 0, None, None, DriftFire(1000, "maxInterval")),  # nothing measured (too little support)
        (DriftRule(0.1, 100), 0, 500, 0.05, None),  # no cap, no drift: nothing fires
        (DriftRule(0.1, 1000, 1000), 0, 500, 0.5, DriftFire(1000, "drift")),  # a tie: drift says why
    ],
)
def test_drift_rule(
    rule: DriftRule, last: int | None, measured_at: int | None, excess: float | None, expected: DriftFire | None
) -> None:
    assert drift_fire(rule, last, measured_at, excess) == expected


def test_drift_rule_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_interval"):
        DriftRule(0.1, 100, 50)
    with pytest.raises(ValueError, match="min_interval"):
        DriftRule(0.1, -1)
