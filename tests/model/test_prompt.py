"""Prompt template, prompt hash, curation and exact-match mapping (no model needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from recupdate_workloads.data.types import Catalogue, Cluster, PairEvidence, Successor, Triples
from recupdate_workloads.model import prompt
from recupdate_workloads.model.examples import Examples, build_examples, curate
from recupdate_workloads.model.toy import toy_catalogue, toy_evidence, toy_triples


@pytest.fixture
def cat() -> Catalogue:
    return Catalogue(
        [
            Cluster(0, "Drama|Comedy", ("drama", "comedy", "feel-good")),
            Cluster(1, "Sci-Fi|War", ("science fiction", "war")),
            Cluster(2, "Film-Noir", ("noir", "crime")),
            Cluster(3, "Animation|Children", ("animation", "kids")),
        ]
    )


def test_render_holds_descriptions_and_evidence(cat: Catalogue) -> None:
    ev = PairEvidence(
        c1=1,
        c2=0,
        support=100,
        successors=(
            Successor(cluster=2, share=0.3149, count=31, score=0.31),
            Successor(cluster=3, share=0.126, count=12, score=0.12, borrowed=True),
        ),
        borrowed_from=((1, 3),),
    )
    p = prompt.render(cat, 1, 0, ev, with_evidence=True)
    assert "science fiction, war" in p and "drama, comedy, feel-good" in p
    # c1 comes first, c2 (the newest) second
    assert p.index("sci_fi_war") < p.index("drama_comedy")
    assert "film_noir 0.31" in p
    assert "animation_children 0.13 borrowed" in p
    assert "film_noir 0.31 borrowed" not in p
    assert p.endswith("Next new interest:")

    no_rag = prompt.render(cat, 1, 0, ev, with_evidence=False)
    assert "film_noir" not in no_rag and "successors" not in no_rag.lower()
    empty = prompt.render(cat, 1, 0, None, with_evidence=True)
    assert "successors with share: none." in empty


def test_top_r_limits_evidence_lines(cat: Catalogue) -> None:
    succ = tuple(Successor(cluster=c, share=0.25, count=1, score=0.25) for c in (2, 3, 0, 1))
    ev = PairEvidence(c1=0, c2=1, support=4, successors=succ)
    p = prompt.render(cat, 0, 1, ev, True, top_r=2)
    lines = p.split("share: ")[1].split(".\n")[0]
    assert lines == "film_noir 0.25, animation_children 0.25"


def test_render_example_and_answer_form(cat: Catalogue) -> None:
    p, a = prompt.render_example(cat, 0, 1, None, False, answer=2)
    assert a == "film_noir"
    assert cat.lookup(a) == 2  # the answer form maps back by exact normalised match
    assert all(cat.lookup(x) == i for i, x in enumerate(prompt.all_answers(cat)))
    assert p == prompt.render(cat, 0, 1, None, False)


def test_prompt_hash_is_stable_across_processes() -> None:
    h = prompt.prompt_hash()
    assert len(h) == 64 and h == prompt.prompt_hash()
    code = "from recupdate_workloads.model.prompt import prompt_hash; print(prompt_hash())"
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert out.stdout.strip() == h


def test_prompt_hash_covers_template_text(monkeypatch: pytest.MonkeyPatch) -> None:
    h = prompt.prompt_hash()
    monkeypatch.setattr(prompt, "TEMPLATE_VERSION", "999")
    assert prompt.prompt_hash() != h
    monkeypatch.undo()
    monkeypatch.setattr(prompt, "_TEMPLATE_PARTS", (*prompt._TEMPLATE_PARTS[:-1], "share=.3f"))
    assert prompt.prompt_hash() != h


def test_exact_match_mapping_near_misses(cat: Catalogue) -> None:
    from recupdate_workloads.model.generate import exact_match_rate, map_names

    names = ["Drama|Comedy ", "drama comedy", "drama_comedy", "DRAMA - COMEDY", "Drama|Comdy", "", "drama"]
    ids = map_names(cat, names)
    assert ids.tolist() == [0, 0, 0, 0, -1, -1, -1]
    assert cat.lookup("Drama|Comdy") is None  # a typo maps to nothing
    assert exact_match_rate(ids) == pytest.approx(4 / 7)


def _triples(rows: list[tuple[int, int, int, int]]) -> Triples:
    a = np.array(rows)
    return Triples(
        user=a[:, 0].astype(np.int64),
        ts=np.arange(len(a), dtype=np.int64),
        c1=a[:, 1].astype(np.int32),
        c2=a[:, 2].astype(np.int32),
        c_next=a[:, 3].astype(np.int32),
    )


def test_curate_dedupes_and_caps_per_pair() -> None:
    rows = [(1, 0, 1, 2)] * 3 + [(u, 0, 1, 3) for u in range(10)] + [(u, 2, 3, 0) for u in range(3)]
    t = _triples(rows)
    deduped = curate(t)
    assert len(deduped) == 1 + 10 + 3
    capped = curate(t, max_per_pair=4, seed=0)
    pairs = list(zip(capped.c1.tolist(), capped.c2.tolist(), strict=True))
    assert pairs.count((0, 1)) == 4 and pairs.count((2, 3)) == 3
    assert np.all(np.diff(capped.ts) > 0)  # input order kept
    keys = set(zip(capped.user.tolist(), capped.c1.tolist(), capped.c2.tolist(), capped.c_next.tolist(), strict=True))
    assert len(keys) == len(capped)
    assert curate(t, max_per_pair=4, seed=0).ts.tolist() == capped.ts.tolist()  # deterministic
    assert curate(t, max_per_pair=4, seed=1).ts.tolist() != capped.ts.tolist()  # seeded sample


def test_build_examples_and_jsonl_round_trip(tmp_path) -> None:
    c = toy_catalogue(8)
    t = toy_triples(c, 200, seed=0)
    ev = toy_evidence(t)
    ex = build_examples(c, t, ev, with_evidence=True, evidence_dropout=0.5, seed=0)
    with_ev = sum("successors" in p for p in ex.prompts)
    assert 60 < with_ev < 140
    assert all(c.lookup(a) == int(n) for a, n in zip(ex.answers, t.c_next, strict=True))
    # a callable lookup gets the triple's time
    seen: list[int] = []
    build_examples(c, t.select(np.arange(3)), lambda a, b, ts: seen.append(ts) or None)
    assert seen == t.ts[:3].tolist()
    back = Examples.load(ex.save_jsonl(tmp_path / "ex.jsonl"))
    assert back.prompts == ex.prompts and back.answers == ex.answers


def test_examples_from_parquet(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["x", "y"], "extra": [1, 2]}), tmp_path / "ex.parquet")
    ex = Examples.load(tmp_path / "ex.parquet")
    assert ex.prompts == ["a", "b"] and ex.answers == ["x", "y"] and len(ex) == 2
