"""The `recupdate` command. Each subcommand lives in its own module, imported only when used,
so `recupdate operator` never pulls torch and `recupdate replay` never pulls kopf."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines configure(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("recupdate_operator.demo", "run the main job locally on embedded defaults"),
    "replay": ("recupdate_workloads.replay.cli", "replay update strategies over historical data"),
    "drift": ("recupdate_workloads.replay.drift", "measure how fast successor sets drift between periods"),
    "crd": ("recupdate_operator.generate.crd", "generate the CustomResourceDefinition from the API models"),
    "manifests": (
        "recupdate_operator.generate.manifests",
        "generate RBAC manifests and the chart's copies of the CRDs",
    ),
    "operator": ("recupdate_operator.run", "run the Kubernetes operator (kopf)"),
    "local": ("recupdate_operator.local_driver", "run one policy on this machine with embedded parts"),
    "serve": ("recupdate_workloads.serving.cli", "serve the active release of a local store"),
    "ingest": ("recupdate_workloads.store.cli", "load interactions and the catalogue into a policy's store schema"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recupdate",
        description="Keep LLM recommenders fresh: scheduled LoRA fine-tunes plus RAG evidence refreshes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure(p)
        except ModuleNotFoundError as exc:  # a subcommand whose module is not built yet
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"recupdate {args.command}: not available in this build", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
