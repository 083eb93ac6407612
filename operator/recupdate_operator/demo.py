"""`recupdate demo`: the main job on embedded defaults.

Runs `recupdate local` on the demo policy over a simulated span of the synthetic drift stream: embedded
PostgreSQL + pgvector, a local Ray (fine-tunes on Ray Train, LoRA), evidence refreshes, promotions behind the
gates and a local Ray Serve answering /recommend throughout. It prints the timeline of releases with their
gate results and the hit rate of served recommendations per period against a release never updated.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

POLICY = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "local-demo-policy.yaml"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="out/demo", help="wiped and rebuilt on each run")
    p.add_argument("--simulate", default="180d", help="simulated span")
    p.add_argument("--interactions", type=int, default=100_000, help="size of the synthetic stream")
    p.add_argument("--executor", default="ray", choices=["ray", "inline"], help="fine-tunes on Ray Train or inline")
    p.add_argument("--port", type=int, default=8000, help="port of /recommend while the demo runs")
    p.add_argument("--data", default=None, help="replay this source instead: movielens:PATH or table:I,ITEMS[,C]")


def run(args: argparse.Namespace) -> int:
    from recupdate_operator.cli import main

    shutil.rmtree(args.workdir, ignore_errors=True)  # a demo starts from scratch; `recupdate local` resumes
    argv = ["local", "-f", str(POLICY), "--simulate", args.simulate, "--interactions", str(args.interactions)]
    argv += ["--workdir", args.workdir, "--executor", args.executor, "--port", str(args.port)]
    if args.data:
        argv += ["--data", args.data]
    return main(argv)
