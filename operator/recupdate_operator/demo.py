"""`recupdate demo`: the main job on embedded defaults (replay of the synthetic drift stream for now)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="where the results and the plot go")
    p.add_argument("--interactions", type=int, default=100_000, help="size of the synthetic stream")


def run(args: argparse.Namespace) -> int:
    from recupdate_operator.cli import main

    return main(["replay", "--interactions", str(args.interactions), "--out", args.out])
