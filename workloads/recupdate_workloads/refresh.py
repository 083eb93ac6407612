"""Entrypoint: `python -m recupdate_workloads.refresh --config <json> --run-id <id>` (DESIGN.md section 4)."""

import sys

from recupdate_workloads.jobs import main

if __name__ == "__main__":
    sys.exit(main("refresh"))
