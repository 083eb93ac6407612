"""Does the bootstrapped base model read the evidence in its prompt? (``model/probe.py``)

Bootstraps base models the way the product does (``model.bootstrap.bootstrap``, training prompts carrying the
evidence as of each triple's time from ``data.evidence.training_evidence``) on the synthetic drift stream's
history before the replay's first boundary, and scores them on the next period's pairs shown the evidence
published at the boundary:

- copy_agreement: trained to answer the evidence's top-1, the share of held-out pairs whose top-1 is the top-1
  of the evidence shown (target >= 0.95);
- swap_follow: trained on the real answers and shown another pair's evidence, the share whose top-1 follows
  the shown evidence (target >= 0.5); swap_keeps_own: the share that keeps the pair's own evidence's top-1;
- rag_change: the share whose top-1 differs between the prompt with evidence and without, against its noise
  floor seed_change: two bases trained alike but for the seed, both prompted without evidence;
- hr_with_evidence / hr_without_evidence (HR@1, HR@5) on the held-out triples, against hr_counts, the
  evidence alone (its top-5, then popularity): the baseline measured in the same run.

``--before`` also runs the probe with the bootstrap as it was before the fix (training evidence refreshed once
per window, no relabelled examples), so a run compares the two.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evidence_use.py                  # ~15 CPU min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evidence_use.py --before         # both, ~30 CPU min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evidence_use.py --interactions 20000 --size tiny

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _line(name: str, r: dict[str, Any]) -> str:
    def f(key: str) -> str:
        v = r.get(key)
        return "  n/a" if v is None else f"{v:.3f}"

    hr = " ".join(
        f"{k.removeprefix('hr_')} {v[0]:.3f}/{v[1]:.3f}"
        for k, v in r.items()
        if k.startswith("hr_") and isinstance(v, list | tuple)
    )
    return (
        f"{name:>7}: copy_agreement {f('copy_agreement')}  swap_follow {f('swap_follow')} (keeps own "
        f"{f('swap_keeps_own')})  rag_change {f('rag_change')} (seed_change {f('seed_change')})  HR@1/HR@5 {hr}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactions", type=int, default=100_000, help="synthetic stream size")
    ap.add_argument("--seed", type=int, default=7, help="synthetic stream seed")
    ap.add_argument("--size", default="small", help="base model size: tiny|small|medium")
    ap.add_argument("--epochs", type=int, default=None, help="bootstrap epochs (default: the replay's)")
    ap.add_argument("--runs", default="copy,real,seed", help="bases to train: copy, real, seed")
    ap.add_argument("--before", action="store_true", help="also probe the bootstrap as it was before the fix")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import torch

    from recupdate_workloads.model.probe import ProbeSetting, before_fix, run_probe
    from recupdate_workloads.replay.llm import BOOTSTRAP_EPOCHS

    torch.set_num_threads(args.threads)
    setting = ProbeSetting(
        interactions=args.interactions,
        data_seed=args.seed,
        size=args.size,
        epochs=args.epochs or BOOTSTRAP_EPOCHS,
        runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()),
    )
    out: dict[str, Any] = {"args": vars(args), "load_average_start": _load()}
    t0 = time.perf_counter()
    out["after"] = run_probe(setting)
    print(_line("after", out["after"]))
    if args.before:
        out["before"] = run_probe(before_fix(setting))
        print(_line("before", out["before"]))
    out["wall_seconds"] = time.perf_counter() - t0
    out["load_average_end"] = _load()
    tr = out["after"]["training"]
    print(
        f"training prompts: {tr['examples']:.0f}, evidence none {tr['share_none']:.3f}, median age "
        f"{tr['age_days_median']:.1f} d, its top-1 is the answer {tr['evidence_top1_hit_where_present']:.3f} "
        f"(where present) vs the pair's own most frequent answer {tr['pair_memo_top1_hit']:.3f}"
    )
    print(f"load average: start {out['load_average_start']}, end {out['load_average_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
