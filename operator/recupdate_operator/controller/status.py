"""What the controller keeps per policy, and the status write-through: our own last write stands in for the
watch until the watch catches up, so a reconcile never acts on a status older than the one it wrote."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ..api import (
    ANNOTATION_APPROVE,
    ANNOTATION_ROLLBACK,
    GROUP,
    PLURAL,
    VERSION,
    ConditionStatus,
    ConditionType,
    PolicyStatus,
)
from ..backends.base import BackendError
from ..conditions import set_condition
from ..events import redact_data
from .config import AGE_MESSAGE_REFRESH_SECONDS, REQUEST_TIMEOUT, Key

log = logging.getLogger("recupdate.operator")


@dataclass
class _Entry:
    """What the controller keeps per policy. Guarded by `lock` (touched by the loop and worker threads)."""

    body: dict[str, Any] | None = None  # the newest object seen on the watch
    written: dict[str, Any] | None = None  # our last status write's answer, until the watch catches up
    written_rv: str | None = None
    unordered_events: int = 0  # events seen since our write that were not it (order unknown: GET)
    events: int = 0  # watch events seen, to tell whether any raced with a status write
    reconciled_sig: tuple[Any, ...] | None = None
    job_states: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    served_at: datetime | None = None  # when (the controller's clock) we last changed the RayService
    recheck: bool = False  # a serving check was put off for the grace period
    status_written_at: datetime | None = None
    failures: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


def _sig(body: Mapping[str, Any]) -> tuple[Any, ...]:
    meta = body.get("metadata") or {}
    ann = meta.get("annotations") or {}
    return (meta.get("generation"), ann.get(ANNOTATION_APPROVE), ann.get(ANNOTATION_ROLLBACK))


def _without_age(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without the Fresh condition's message (it states an age, which changes all the time)."""
    conditions = [
        {k: v for k, v in c.items() if not (c.get("type") == ConditionType.FRESH.value and k == "message")}
        for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conditions}


def _normalized_status(raw: Any) -> dict[str, Any] | None:
    try:
        return PolicyStatus.model_validate(dict(raw or {})).model_dump(mode="json", by_alias=True)
    except (ValidationError, TypeError, ValueError):
        return None


class StatusWriteThrough:
    """Reads and writes a policy's status subresource. After a write, our answer stands in for the watch's
    copy until the watch delivers it (or a newer one), so the next reconcile never sees its own decisions
    undone by a lagging watch."""

    def __init__(self, custom: Any, clock: Callable[[], datetime]) -> None:
        self.custom = custom  # kubernetes CustomObjectsApi
        self.clock = clock

    def current_body(self, key: Key, entry: _Entry) -> dict[str, Any] | None:
        """The freshest object we know: the watch's, or our own last write while the watch lags behind it.
        When events arrived whose order against our write is unknown, read it from the API."""
        with entry.lock:
            if entry.written_rv is None:
                return entry.body
            if _rv(entry.body) == entry.written_rv:
                entry.written, entry.written_rv, entry.unordered_events = None, None, 0
                return entry.body
            if entry.unordered_events == 0:
                return entry.written
        try:
            # rbac: recupdate.io recommenderupdatepolicies get
            body = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, key[0], PLURAL, key[1], _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"get policy: {exc.status} {exc.reason}") from None
        with entry.lock:
            entry.body = dict(body)
            entry.written, entry.written_rv, entry.unordered_events = None, None, 0
            return entry.body

    def write(self, key: Key, entry: _Entry, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        status = redact_data(status)  # every condition message, whatever produced it (a job's error, the store)
        current = _normalized_status(body.get("status"))
        if current == status:
            return
        # The Fresh condition's message tells the evidence's age ("evidence is 3h old"), so it changes on every
        # reconcile. Alone, such a change is written at most once an hour: an idle policy costs one write an
        # hour, not one per resync. (Fresh turning False, or anything else changing, is written at once.)
        now = self.clock()
        if (
            current is not None
            and _without_age(current) == _without_age(status)
            and entry.status_written_at is not None
            and (now - entry.status_written_at).total_seconds() < AGE_MESSAGE_REFRESH_SECONDS
        ):
            return
        with entry.lock:
            events_before = entry.events
        try:
            # rbac: recupdate.io recommenderupdatepolicies/status patch
            answer = self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                key[0],
                PLURAL,
                key[1],
                {"status": status},
                _request_timeout=REQUEST_TIMEOUT,
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise BackendError(f"status patch: {exc.status} {exc.reason}") from None
        except Exception as exc:
            raise BackendError(f"status patch: {type(exc).__name__}") from None
        with entry.lock:
            entry.status_written_at = now
            if _rv(entry.body) == _rv(answer):
                entry.written, entry.written_rv, entry.unordered_events = None, None, 0  # the watch has caught up
                return
            entry.written, entry.written_rv = dict(answer), _rv(answer)
            # Events that arrived while the patch was on its way may be newer than our write (someone else's
            # change) or older: their order is unknown, so the next reconcile reads the object afresh.
            entry.unordered_events = 1 if entry.events != events_before else 0

    def write_conditions(
        self,
        key: Key,
        entry: _Entry,
        body: Mapping[str, Any],
        updates: list[tuple[ConditionType, ConditionStatus, str, str]],
    ) -> None:
        """Set some conditions, leaving the rest of the status as it is (best effort: a failure is logged)."""
        raw = _normalized_status(body.get("status"))
        old = PolicyStatus.model_validate(raw) if raw is not None else PolicyStatus()
        conditions = list(old.conditions)
        generation = (body.get("metadata") or {}).get("generation")
        for ctype, status, reason, message in updates:
            conditions = set_condition(conditions, ctype, status, reason, message, self.clock(), generation)
        status_patch = old.model_copy(update={"conditions": conditions}).model_dump(mode="json", by_alias=True)
        try:
            self.write(key, entry, body, status_patch)
        except BackendError as exc:
            log.warning("%s/%s: %s", key[0], key[1], exc)
