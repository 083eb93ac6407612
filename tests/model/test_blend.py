"""Blending the model's likelihood with the evidence's shares (retrieval.blend) in the ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.data.types import PairEvidence, Successor
from recupdate_workloads.jobs.materialize import materialize
from recupdate_workloads.model.bootstrap import bootstrap
from recupdate_workloads.model.generate import blend_logprobs, top_ranked
from recupdate_workloads.model.predictor import Predictor, evidence_shares
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples

CAT = toy_catalogue(8)


def test_blend_zero_keeps_the_models_order_one_gives_the_evidences() -> None:
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(8), size=50)).astype(np.float32)
    lp[:, 0] = -np.inf  # an excluded cluster
    shares = np.zeros_like(lp)
    listed = rng.permutation(np.arange(1, 8))[:3]
    shares[:, listed] = [0.5, 0.3, 0.2]
    s0, _ = blend_logprobs(lp, shares, 0.0)
    np.testing.assert_array_equal(np.argsort(-s0, 1, kind="stable"), np.argsort(-lp, 1, kind="stable"))
    s1, p = blend_logprobs(lp, shares, 1.0)
    ids, sc = top_ranked(s1, 8, tie_break=p)
    assert (ids[:, :3] == listed).all()  # the evidence's order first
    rest = ids[:, 3:7]  # then the model orders the clusters the evidence does not list
    assert all(list(r) == sorted(r, key=lambda c, i=i: -lp[i, c]) for i, r in enumerate(rest))
    assert (ids[:, 7] == 0).all() and np.isneginf(sc[:, 7]).all()  # excluded stays excluded, last
    # in between: a cluster the model ranks first but the evidence does not list loses ground as blend grows
    mid, _ = blend_logprobs(lp, shares, 0.5)
    assert np.isfinite(mid[:, 1:]).all() and np.all(np.exp(mid[:, 1:]).sum(1) <= 1 + 1e-5)
    with pytest.raises(ValueError, match="blend"):
        blend_logprobs(lp, shares, 1.5)


def test_evidence_shares_hold_every_line_borrowed_included() -> None:
    ev = {
        (0, 1): PairEvidence(0, 1, 10, (Successor(3, 0.6, 6, 0.6), Successor(4, 0.4, 4, 0.4, borrowed=True))),
    }
    sh = evidence_shares(np.array([0, 2]), np.array([1, 3]), ev, 8)
    assert sh[0, 3] == pytest.approx(0.6) and sh[0, 4] == pytest.approx(0.4) and sh[0].sum() == pytest.approx(1.0)
    assert not sh[1].any()  # no evidence: the model alone


@pytest.mark.usefixtures("one_torch_thread")
def test_materialized_table_blends_and_reports_the_model_alone_too(tmp_path: Path) -> None:
    t = toy_triples(CAT, 1500, seed=0, noise=0.3)
    ev = toy_evidence(t)
    base = bootstrap(CAT, t, ev, tmp_path / "base", size="tiny", epochs=1, seed=0)
    pred = Predictor.load(str(base), None, CAT)
    alone = materialize(pred, ev, top_n=6)
    same = materialize(pred, ev, top_n=6, blend=0.0)
    np.testing.assert_array_equal(alone.ids, same.ids)
    full = materialize(pred, ev, top_n=6, blend=1.0)
    for (a, b), row in zip(zip(full.c1.tolist(), full.c2.tolist(), strict=True), full.ids, strict=True):
        share = {s.cluster: s.share for s in ev[(a, b)].successors if s.cluster not in (a, b)}
        head = row[: min(6, len(share))].tolist()
        assert set(head) <= set(share)  # the evidence's clusters first, by share (ties: the model's order)
        assert [share[c] for c in head] == sorted((share[c] for c in head), reverse=True)
        assert a not in row and b not in row
    (llm, _), (mixed, _) = pred.rank_blends(alone.c1, alone.c2, ev, 6, (0.0, 1.0))
    np.testing.assert_array_equal(llm, alone.ids)
    np.testing.assert_array_equal(mixed, full.ids)
