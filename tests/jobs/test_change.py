"""The change of a candidate table against the active one (jobs/change.py), on hand-made tables."""

from __future__ import annotations

import pytest

from recupdate_workloads.jobs.change import table_change


def test_identical_tables_do_not_change() -> None:
    t = {(0, 1): [2, 3, 4, 5, 6], (1, 2): [3, 4]}
    c = table_change(t, dict(t))
    assert (c.pairs, c.top1_changed, c.top_k_overlap, c.new_pairs, c.dropped_pairs) == (2, 0.0, 1.0, 0, 0)


def test_top1_share_and_top5_overlap_by_hand() -> None:
    active = {
        (0, 1): [2, 3, 4, 5, 6],
        (0, 2): [1, 3, 4, 5, 6],
        (1, 2): [0, 3, 4, 5, 6],
        (3, 4): [0, 1, 2, 5, 6],
    }
    candidate = {
        (0, 1): [3, 2, 4, 5, 6],  # top-1 changed, same five: overlap 5/5
        (0, 2): [1, 3, 4, 7, 8],  # top-1 kept, 3 of 5 shared
        (1, 2): [7, 8, 9, 10, 11],  # top-1 changed, nothing shared
        (5, 6): [0, 1, 2, 3, 4],  # new: neither changed nor kept
    }
    c = table_change(candidate, active)
    assert c.pairs == 3 and c.new_pairs == 1 and c.dropped_pairs == 1
    assert c.top1_changed == pytest.approx(2 / 3)
    assert c.top_k_overlap == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert c.as_dict() == {
        "pairs": 3,
        "top1Changed": round(2 / 3, 6),
        "top5Overlap": round(1.6 / 3, 6),
        "newPairs": 1,
        "droppedPairs": 1,
    }


def test_short_lists_padding_and_k() -> None:
    # fewer than k clusters: identical lists still overlap fully; -1 pads and is ignored
    c = table_change({(0, 1): [2, 3, -1, -1]}, {(0, 1): [2, 3]})
    assert (c.top1_changed, c.top_k_overlap) == (0.0, 1.0)
    # one empty side: its top-1 is missing, so it changed, and nothing is shared
    c = table_change({(0, 1): []}, {(0, 1): [2]})
    assert (c.top1_changed, c.top_k_overlap) == (1.0, 0.0)
    # k=1: the overlap is 1 - the top-1 share
    c = table_change({(0, 1): [2, 3], (0, 2): [4]}, {(0, 1): [3, 2], (0, 2): [4]}, k=1)
    assert (c.top1_changed, c.top_k_overlap, c.as_dict()["top1Overlap"]) == (0.5, 0.5, 0.5)


def test_no_shared_pairs_and_bad_k() -> None:
    c = table_change({(0, 1): [2]}, {})
    assert (c.pairs, c.top1_changed, c.top_k_overlap, c.new_pairs) == (0, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="k must be"):
        table_change({}, {}, k=0)
