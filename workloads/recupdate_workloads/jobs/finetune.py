"""Entrypoint: `python -m recupdate_workloads.jobs.finetune --config <json> --run-id <id>` (docs/architecture.md)."""

import sys

from recupdate_workloads.jobs.run import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
