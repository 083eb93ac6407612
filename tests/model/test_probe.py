"""The evidence-use probe (model/probe.py) at a small setting: a real bootstrap on the synthetic drift stream,
scored on held-out pairs shown evidence that no training prompt held."""

from __future__ import annotations

import numpy as np
import pytest

from recupdate_workloads.data import evidence as evidence_mem
from recupdate_workloads.model.probe import ProbeSetting, before_fix, copy_targets, probe_data, run_probe

#: Small enough for the suite: one base (about 12.8k training prompts, 3 epochs of the small model), scored on
#: the held-out pairs whose evidence has a support of 10 or more (below it, see docs/rag.md).
SMALL = ProbeSetting(held_out_support=10, epochs=3, runs=("copy",))


@pytest.mark.slow
def test_a_bootstrapped_base_copies_the_evidence_it_is_shown(one_torch_thread: None) -> None:
    out = run_probe(SMALL)
    assert out["held_out_pairs"] >= 100
    # Trained to answer the evidence's top-1, the model must follow the evidence of pairs it never saw with it.
    assert out["copy_agreement"] >= 0.9, out


def test_copy_targets_are_the_evidences_top1_where_there_is_evidence() -> None:
    data = probe_data(ProbeSetting(interactions=20_000))
    t = data.history
    ct = copy_targets(t, data.lookup)
    for i in range(0, len(t), 97):
        e = data.lookup(int(t.c1[i]), int(t.c2[i]), int(t.ts[i]))
        want = e.successors[0].cluster if e is not None and e.successors else int(t.c_next[i])
        assert ct.c_next[i] == want
    # the held-out pairs all carry evidence published at the boundary, which no training prompt held
    assert all((int(a), int(b)) in data.evidence for a, b in data.pairs)
    assert int(data.test.ts.min()) >= int(data.history.ts.max())


def test_before_fix_is_the_once_per_window_evidence() -> None:
    s = before_fix(ProbeSetting())
    assert s.evidence_step_days == s.period_days and s.bootstrap_kwargs["relabel"] == 0.0
    # training evidence refreshed often: a pair's evidence changes within a window
    assert evidence_mem.training_step(90 * 86_400) == 3 * 86_400
    assert np.isclose(evidence_mem.training_step(3600), 3600)
