"""The change of a new table against its parent (jobs/change.py), on hand-made tables."""

from __future__ import annotations

import pytest

from recupdate_workloads.jobs.change import table_change


def test_identical_tables_do_not_change() -> None:
    t = {(0, 1): [2, 3, 4, 5, 6], (1, 2): [0, 3, 4, 5, 6]}
    ch = table_change(t, dict(t))
    assert (ch.pairs, ch.top1_changed, ch.top5_overlap) == (2, 0.0, 1.0)


def test_top1_and_overlap_over_common_pairs_only() -> None:
    old = {(0, 1): [2, 3, 4, 5, 6], (1, 2): [0, 3, 4, 5, 6], (7, 8): [1, 2, 3, 4, 5]}
    new = {
        (0, 1): [3, 2, 4, 5, 6],  # top-1 changed, same five
        (1, 2): [0, 3, 9, 10, 11],  # top-1 kept, two of five kept
        (5, 6): [1, 2, 3, 4, 7],  # not in the old table: not compared
    }
    ch = table_change(old, new)
    assert ch.pairs == 2
    assert ch.top1_changed == pytest.approx(0.5)
    assert ch.top5_overlap == pytest.approx((5 + 2) / 10)
    assert ch.as_metrics() == {"changePairs": 2, "top1Changed": 0.5, "top5Overlap": pytest.approx(0.7)}


def test_padding_is_ignored_and_no_common_pair_gives_zeros() -> None:
    ch = table_change({(0, 1): [2, -1, -1]}, {(0, 1): [2, 3, -1]})
    assert (ch.top1_changed, ch.top5_overlap) == (0.0, pytest.approx(1 / 5))
    assert table_change({(0, 1): [2]}, {(1, 0): [2]}).pairs == 0
