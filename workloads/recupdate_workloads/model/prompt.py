"""The versioned prompt template: what the LLM reads for a context pair (c1, c2), and the answer it gives.

A prompt holds the name and description (keywords) of c1 and of c2 (c2 is the newest) and, with RAG, one
evidence line per recent successor of the pair: its name, its share of the pair's support rounded to two
decimals, and the word ``borrowed`` when the line came from a neighbour pair. The answer is one cluster name
in its *answer form*: the normalised name with spaces replaced by underscores (``Drama|Comedy`` ->
``drama_comedy``). That form is a single word for a word-level tokenizer (see bootstrap.py), so each answer is
one token there, and it maps back to the cluster by ``Catalogue.lookup`` because normalisation turns the
underscore back into a space. Evidence lines name clusters in the same answer form, so a model can copy them.

Any change to the strings below changes ``prompt_hash()``; bump ``TEMPLATE_VERSION`` along with it. Releases
record the hash, so a table is never served with an adapter trained on another template.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from recupdate_workloads.data.types import Catalogue, PairEvidence, normalize_name

TEMPLATE_VERSION = "1"

#: The whole prompt. ``{evidence}`` is empty without RAG, or EVIDENCE_TEMPLATE filled in with RAG.
PROMPT_TEMPLATE = (
    "User interests: {c1_name} ({c1_desc}), then most recently {c2_name} ({c2_desc}).\n{evidence}Next new interest:"
)
EVIDENCE_TEMPLATE = "Recent successors with share: {lines}.\n"
EVIDENCE_LINE = "{name} {share}{borrowed}"
EVIDENCE_SEPARATOR = ", "
BORROWED_MARK = " borrowed"
NO_EVIDENCE = "none"
#: What separates the prompt from the answer in a training example (and in a scored continuation).
ANSWER_PREFIX = " "
#: Default number of evidence lines (the paper's top-R recent successors).
DEFAULT_TOP_R = 5

_TEMPLATE_PARTS: tuple[str, ...] = (
    PROMPT_TEMPLATE,
    EVIDENCE_TEMPLATE,
    EVIDENCE_LINE,
    EVIDENCE_SEPARATOR,
    BORROWED_MARK,
    NO_EVIDENCE,
    ANSWER_PREFIX,
    "answer_form=normalize_name:underscore",
    "share=.2f",
)


def template_text() -> str:
    """Every string that shapes a prompt or an answer, joined; the input of ``prompt_hash``."""
    return "\x1f".join(_TEMPLATE_PARTS)


def prompt_hash() -> str:
    """sha256 (hex) of the template version and text: stable across runs, processes and machines."""
    payload = f"recupdate-prompt-v{TEMPLATE_VERSION}\x1e{template_text()}".encode()
    return hashlib.sha256(payload).hexdigest()


def answer_text(catalogue: Catalogue, cluster_id: int) -> str:
    """The answer form of a cluster name: normalised, spaces -> underscores (``Sci-Fi|War`` -> ``sci_fi_war``)."""
    return normalize_name(catalogue.name(cluster_id)).replace(" ", "_")


def _share(share: float) -> str:
    return f"{min(max(share, 0.0), 1.0):.2f}"


def render_evidence(catalogue: Catalogue, evidence: PairEvidence | None, top_r: int = DEFAULT_TOP_R) -> str:
    """The evidence block: the pair's top-R successors with shares, ``borrowed`` where from neighbour pairs."""
    successors = evidence.successors[:top_r] if evidence is not None else ()
    if not successors:
        lines = NO_EVIDENCE
    else:
        lines = EVIDENCE_SEPARATOR.join(
            EVIDENCE_LINE.format(
                name=answer_text(catalogue, s.cluster),
                share=_share(s.share),
                borrowed=BORROWED_MARK if s.borrowed else "",
            )
            for s in successors
        )
    return EVIDENCE_TEMPLATE.format(lines=lines)


def render(
    catalogue: Catalogue,
    c1: int,
    c2: int,
    evidence: PairEvidence | None = None,
    with_evidence: bool = True,
    top_r: int = DEFAULT_TOP_R,
) -> str:
    """The prompt for context (c1, c2), c2 the newest. With ``with_evidence`` it holds the evidence block
    (``none`` when the pair has no evidence); without, no evidence block at all (the fine-tune-only mode)."""
    return PROMPT_TEMPLATE.format(
        c1_name=answer_text(catalogue, c1),
        c1_desc=catalogue.clusters[c1].description,
        c2_name=answer_text(catalogue, c2),
        c2_desc=catalogue.clusters[c2].description,
        evidence=render_evidence(catalogue, evidence, top_r) if with_evidence else "",
    )


def render_example(
    catalogue: Catalogue,
    c1: int,
    c2: int,
    evidence: PairEvidence | None,
    with_evidence: bool,
    answer: int,
    top_r: int = DEFAULT_TOP_R,
) -> tuple[str, str]:
    """A training example as (prompt, answer text). The full text is ``prompt + ANSWER_PREFIX + answer``;
    they are kept apart so training can mask the prompt and tokenise exactly as scoring does."""
    return render(catalogue, c1, c2, evidence, with_evidence, top_r), answer_text(catalogue, answer)


def all_answers(catalogue: Catalogue) -> list[str]:
    """Answer forms of every cluster, indexed by cluster id."""
    return [answer_text(catalogue, i) for i in range(len(catalogue))]


def render_many(
    catalogue: Catalogue,
    pairs: Sequence[tuple[int, int]],
    evidence: Sequence[PairEvidence | None] | None = None,
    with_evidence: bool = True,
    top_r: int = DEFAULT_TOP_R,
) -> list[str]:
    """Prompts for many pairs (bulk inference); ``evidence[i]`` belongs to ``pairs[i]``."""
    ev: Sequence[PairEvidence | None] = evidence if evidence is not None else [None] * len(pairs)
    if len(ev) != len(pairs):
        raise ValueError("evidence must have one entry per pair")
    return [render(catalogue, c1, c2, e, with_evidence, top_r) for (c1, c2), e in zip(pairs, ev, strict=True)]
