"""Kubernetes Events for the planner's decisions, and the scrubbing that keeps secrets out of every message.

Every text the operator shows (Events, status conditions, logs, metrics labels) passes through ``redact``,
the one redaction shared with the workloads (recupdate_workloads.contract.redact): DSNs read from Secrets are
registered with ``SECRETS.add`` when read, and any copy of them, of any form of their password, or of
anything shaped like a password in a connection string, becomes ``***``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from recupdate_workloads.contract.redact import MASK, SECRETS, RedactingFilter, Redactor, redact, redact_data

from .planner import Event

__all__ = ["MASK", "MAX_MESSAGE", "SECRETS", "RedactingFilter", "Redactor", "post", "redact", "redact_data"]

log = logging.getLogger("recupdate.operator")

MAX_MESSAGE = 1000  # kopf and the API server cut longer Event messages anyway


def post(body: Mapping[str, Any], event: Event) -> None:
    """Post a planner Event on the policy through kopf's event poster (thread-safe; batched by kopf)."""
    import kopf

    message = redact(event.message)[:MAX_MESSAGE]
    try:
        # rbac: "" events create
        kopf.event(cast(Any, dict(body)), type=event.type, reason=event.reason, message=message)
    except LookupError:  # outside an operator (no kopf event queue): log only
        log.info("event %s/%s %s %s: %s", _ns(body), _name(body), event.type, event.reason, message)


def _ns(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("namespace", ""))


def _name(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name", ""))
