"""Environment variables read by both the controller and the workloads, and one parser for the numeric
settings the workloads read (limits, sizes, rates): every bad value fails with the same kind of message,
naming the variable."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

#: The store DSN: jobs, Serve replicas and the operator (for policies without spec.store.secretRef) read it.
DSN_ENV = "RECUPDATE_STORE_DSN"

#: The DSN of the user's own PostgreSQL, for data sources named `sql` (spec.data.sql.dsnSecretRef).
SOURCE_DSN_ENV = "RECUPDATE_SOURCE_DSN"

#: The variables of object-storage credentials (spec.data.objectStorage.credentialsSecret holds them under these
#: keys); pyarrow's S3 filesystem reads them from the environment. The session token is optional.
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

#: "off": a job does not sync its data sources before counting (local mode, which feeds the store itself).
SYNC_ENV = "RECUPDATE_SYNC"


T = TypeVar("T", int, float)


def env_number(
    name: str,
    default: T,
    environ: Mapping[str, str] | None = None,
    *,
    parse: Callable[[str], T],
    valid: Callable[[T], bool],
    expect: str,
) -> T:
    """``$name`` parsed by ``parse`` when set and not blank, else ``default``. A value that does not parse or is
    not ``valid`` is a ValueError: ``$name must be <expect>, got '<value>'``."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ValueError(f"${name} must be {expect}, got {raw[:40]!r}") from None
    if not valid(value):
        raise ValueError(f"${name} must be {expect}, got {raw[:40]!r}")
    return value


def positive_int(name: str, default: int, environ: Mapping[str, str] | None = None, *, unit: str) -> int:
    """``$name`` as a positive integer (of ``unit``, for the message) when set, else ``default``."""
    return env_number(name, default, environ, parse=int, valid=lambda v: v >= 1, expect=f"a positive integer ({unit})")
