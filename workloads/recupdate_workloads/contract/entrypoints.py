"""The job entrypoints: which module each run kind executes, and its command line.

A RayJob's entrypoint (KubeRay) and a local job's process (local mode) are both built from ``command``, so
the module names are written here only. Exit code 0 means the run registered its result in the store,
whether its candidate passed the gates or not; non-zero means the run failed (docs/architecture.md).
"""

from __future__ import annotations

#: Run kind -> the module run as ``python -m <module> --config <json> --run-id <id>``.
MODULES = {
    "finetune": "recupdate_workloads.jobs.finetune",
    "refresh": "recupdate_workloads.jobs.refresh",
}


def module_for(kind: str) -> str:
    try:
        return MODULES[kind]
    except KeyError:
        raise ValueError(f"unknown run kind {kind!r}: expected one of {sorted(MODULES)}") from None


def command(kind: str, config: str, run_id: str, python: str = "python") -> list[str]:
    """The argv of a run: ``python -m <module> --config <json or file> --run-id <id>``."""
    return [python, "-m", module_for(kind), "--config", config, "--run-id", run_id]
