"""The training examples that teach a model to read its evidence (model/examples.py): relabelled examples."""

from __future__ import annotations

import re

from recupdate_workloads.model.examples import build_examples
from recupdate_workloads.model.prompt import answer_text, render
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples

CAT = toy_catalogue(12)
T = toy_triples(CAT, 400, seed=3)
EV = toy_evidence(T)
NAME = {answer_text(CAT, i): i for i in range(len(CAT))}


def _evidence_names(prompt: str) -> list[int]:
    m = re.search(r"Recent successors with share: (.*)\.\n", prompt)
    assert m is not None, prompt
    return [NAME[line.split(" ")[0]] for line in m.group(1).split(", ")]


def test_no_relabel_no_drawn_answers_is_the_plain_rendering() -> None:
    ex = build_examples(CAT, T, EV)
    for i in range(0, len(T), 37):
        c1, c2 = int(T.c1[i]), int(T.c2[i])
        assert ex.prompts[i] == render(CAT, c1, c2, EV.get((c1, c2)))
        assert ex.answers[i] == answer_text(CAT, int(T.c_next[i]))


def test_relabelled_examples_rename_every_cluster_consistently() -> None:
    plain = build_examples(CAT, T, EV)
    ex = build_examples(CAT, T, EV, relabel=1.0, seed=1)
    changed = 0
    for i in range(len(T)):
        c1, c2 = int(T.c1[i]), int(T.c2[i])
        ev = EV.get((c1, c2))
        if ev is None or not ev.successors:
            assert ex.prompts[i] == plain.prompts[i]
            continue
        changed += ex.prompts[i] != plain.prompts[i]
        # the answer keeps its place among the evidence lines (or stays off them) under the renaming
        shown, orig = _evidence_names(ex.prompts[i]), [s.cluster for s in ev.successors]
        real = int(T.c_next[i])
        answer = NAME[ex.answers[i]]
        if real in orig:
            assert shown[orig.index(real)] == answer
        else:
            assert answer not in shown
    assert changed > len(T) // 2
