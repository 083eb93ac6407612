"""Kubernetes Events for the planner's decisions, and the scrubbing that keeps secrets out of every message.

Every text the operator shows (Events, status conditions, logs, metrics labels) passes through ``redact``:
DSNs read from Secrets are registered with ``SECRETS.add`` when read, and any copy of them, of their
password, or of anything shaped like a password in a connection string, becomes ``***``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, cast

from .planner import Event

log = logging.getLogger("recupdate.operator")

MASK = "***"
MAX_MESSAGE = 1000  # kopf and the API server cut longer Event messages anyway
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_KV_PASSWORD = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?:'(?P<qpw>(?:\\.|[^'\\])*)'|(?P<pw>[^\s'][^\s]*))", re.IGNORECASE
)
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)(?P<pw>[^&\s]*)", re.IGNORECASE)


class Redactor:
    """Remembers secret strings and masks them (and password-like parts of connection strings) in text."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str | None) -> None:
        """Remember a secret and the password inside it, if it is a connection string."""
        if not secret:
            return
        found = {secret}
        for rx in (_URL_PASSWORD, _KV_PASSWORD, _QUERY_PASSWORD):
            for m in rx.finditer(secret):
                found.update(v for k, v in m.groupdict().items() if k in ("pw", "qpw") and v)
        with self._lock:
            # Very short strings would mask ordinary words; a 1-3 character password is not worth hiding.
            self._secrets.update(s for s in found if len(s) >= 4)

    def __call__(self, text: Any) -> str:
        out = str(text)
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for s in secrets:
            if s in out:
                out = out.replace(s, MASK)
        out = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", out)
        out = _KV_PASSWORD.sub(lambda m: f"{m.group('key')}{MASK}", out)
        return _QUERY_PASSWORD.sub(lambda m: f"{m.group('key')}{MASK}", out)


SECRETS = Redactor()


def redact(text: Any) -> str:
    return SECRETS(text)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in log records (installed on the root handlers by run.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record alone
            return True
        clean = redact(message)
        if clean != message or record.exc_info:
            record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


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
