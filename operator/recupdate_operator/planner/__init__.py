"""The controller's brain, pure: (policy, status, observed jobs, registry, now) -> Plan.

- ``inputs``   what it reads: Policy, ObservedJob, RegistryView (runs and releases)
- ``actions``  what it decides: LaunchRun, Promote, RollServe, ... and the Plan that holds them
- ``naming``   deterministic run names and the entrypoints' run configs
- ``decide``   ``plan()``, the decision logic

Everything public is importable from here.
"""

from .actions import (
    Action,
    DeleteJob,
    Event,
    LaunchRun,
    Plan,
    Promote,
    PruneReleases,
    RecordAnalysis,
    RecordRun,
    Reject,
    Rollback,
    RollServe,
    StopServe,
)
from .decide import plan
from .inputs import (
    JOB_APPEAR_GRACE,
    NOT_A_FAULT,
    TERMINAL_DEPLOYMENT_STATUSES,
    AnalysisFigures,
    ObservedJob,
    Policy,
    RegistryView,
    ReleaseView,
    RunView,
    SchemaOwner,
    owner_conflict,
)
from .naming import config_hash, gates_verdict, parse_run_name, run_config, run_name

__all__ = [
    "JOB_APPEAR_GRACE",
    "NOT_A_FAULT",
    "TERMINAL_DEPLOYMENT_STATUSES",
    "Action",
    "AnalysisFigures",
    "DeleteJob",
    "Event",
    "LaunchRun",
    "ObservedJob",
    "Plan",
    "Policy",
    "Promote",
    "PruneReleases",
    "RecordAnalysis",
    "RecordRun",
    "RegistryView",
    "Reject",
    "ReleaseView",
    "RollServe",
    "Rollback",
    "RunView",
    "SchemaOwner",
    "StopServe",
    "config_hash",
    "gates_verdict",
    "owner_conflict",
    "parse_run_name",
    "plan",
    "run_config",
    "run_name",
]
