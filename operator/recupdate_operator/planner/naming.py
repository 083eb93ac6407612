"""Deterministic run names and the entrypoints' run configs (docs/architecture.md: Deterministic run names)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from recupdate_workloads.contract.timefmt import iso

from ..api import (
    PolicySpec,
    RunKind,
    parse_duration,
    schema_name,
)

_KIND_ABBREV = {RunKind.FINETUNE: "ft", RunKind.REFRESH: "rf"}
_RUN_ID_SUFFIX = re.compile(r"-(ft|rf)-(\d{12})(?:-r(\d+))?$")


def _dns_label(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "policy"


def run_name(policy: str, kind: RunKind, scheduled_at: datetime, attempt: int = 0) -> str:
    """`<policy>-ft-<yyyymmddhhmm>` (or -rf-), `-r<n>` for retries: a DNS-1123 label of at most 63 chars.

    Derived only from the policy and the scheduled time, so a restarted operator finds the job it already
    launched instead of launching another. Long policy names are cut and get a hash, to stay unique.
    """
    stamp = scheduled_at.astimezone(UTC).strftime("%Y%m%d%H%M")
    suffix = f"-{_KIND_ABBREV[kind]}-{stamp}" + (f"-r{attempt}" if attempt else "")
    base = _dns_label(policy)
    room = 63 - len(suffix)
    if len(base) > room:
        digest = hashlib.sha256(policy.encode()).hexdigest()[:6]
        base = base[: room - 7].rstrip("-") + "-" + digest
    return base + suffix


def parse_run_name(name: str) -> tuple[datetime, int] | None:
    """(scheduled_at, attempt) from a name made by run_name, else None."""
    m = _RUN_ID_SUFFIX.search(name)
    if not m:
        return None
    when = datetime.strptime(m.group(2), "%Y%m%d%H%M").replace(tzinfo=UTC)
    return when, int(m.group(3) or 0)


def _config_inputs(policy: str, namespace: str, spec: PolicySpec, kind: RunKind) -> dict[str, Any]:
    """The parts of the spec a run's result depends on (not its schedule): also what config_hash covers."""

    def dump(model: Any, include: set[str] | None = None) -> Any:
        return model.model_dump(mode="json", by_alias=True, include=include)

    inputs: dict[str, Any] = {
        "kind": kind.value,
        "policy": policy,
        "namespace": namespace,
        "storeSchema": schema_name(policy, spec),
        "model": dump(spec.model),
        "data": dump(spec.data),
        "retrieval": dump(spec.retrieval, {"window", "top_successors", "scoring", "min_support", "neighbours"}),
        "gates": dump(spec.gates, {"min_exact_match", "min_recall", "max_regression"}),
    }
    if spec.retrieval.blend:  # only when set: a policy without it keeps the config hash it had before blend
        inputs["retrieval"]["blend"] = spec.retrieval.blend
    if kind == RunKind.FINETUNE:
        inputs["fineTune"] = dump(spec.fine_tune, {"window", "hyperparameters", "resources"})
    return inputs


def config_hash(policy: str, namespace: str, spec: PolicySpec, kind: RunKind) -> str:
    blob = json.dumps(_config_inputs(policy, namespace, spec, kind), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_config(
    policy: str,
    namespace: str,
    spec: PolicySpec,
    kind: RunKind,
    run_id: str,
    scheduled_at: datetime,
    active_release: str | None,
    uid: str = "",
) -> dict[str, Any]:
    """The entrypoint's --config (docs/architecture.md): the relevant spec sections in camelCase, plus

    runId, kind, policy, namespace, policyUid (the job refuses a schema another policy owns), storeSchema,
    activeRelease (the release serving at launch: the adapter a refresh infers with, and the baseline of the
    regression gate, or null), and window {start, end} (RFC 3339, [start, end)): the data window ending at
    the scheduled time.
    """
    length = parse_duration(spec.fine_tune.window if kind == RunKind.FINETUNE else spec.retrieval.window)
    end = scheduled_at.astimezone(UTC)
    return {
        "runId": run_id,
        "activeRelease": active_release,
        "window": {"start": iso(end - length), "end": iso(end)},
        "policyUid": uid,  # not in _config_inputs: a re-created policy's runs answer the same question
        **_config_inputs(policy, namespace, spec, kind),
    }


def gates_verdict(gates: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(passed, reasons it failed) from a release's gates, as written by the workload."""
    failed: list[str] = []
    checks = 0
    for name, gate in gates.items():
        if isinstance(gate, Mapping) and "passed" in gate:
            checks += 1
            if not gate["passed"]:
                detail = ""
                if "value" in gate and "threshold" in gate:
                    detail = f" ({gate['value']} vs {gate['threshold']})"
                failed.append(f"{name}{detail}")
    overall = gates.get("passed")
    if isinstance(overall, bool):
        if not overall and not failed:
            failed.append("gates failed")
        return overall and not failed, failed
    if checks == 0:
        return False, ["no gates recorded"]
    return not failed, failed


def _fmt(t: datetime | None) -> str:
    return iso(t) if t else "never"
