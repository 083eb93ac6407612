"""The store schema of a policy, and the activation transaction on its ``releases`` table, for both sides.

At most one release per schema is active (a partial unique index enforces it), so activation retires the
active release and activates the new one in one transaction. The caller opens that transaction on its own
connection (psycopg or any DB-API connection with ``execute``); this module holds the statements only.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any, Protocol


class _Executes(Protocol):
    def execute(self, query: Any, params: Any = ...) -> Any: ...


class ActivationRefused(ValueError):
    """The release cannot be activated: it does not exist, or its gates rejected it."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def releases_table(schema: str) -> str:
    return f"{quote_ident(schema)}.releases"


def activate(conn: _Executes, schema: str, release_id: str, now: datetime | None = None) -> bool:
    """Inside the caller's transaction: make `release_id` active and retire the active one. Returns False when
    it already was active. ``now`` stamps activated_at (None: the database's clock)."""
    rel = releases_table(schema)
    row = conn.execute(f"SELECT state FROM {rel} WHERE release_id = %s FOR UPDATE", (release_id,)).fetchone()
    if row is None:
        raise ActivationRefused(f"release {release_id} does not exist", missing=True)
    if row[0] == "rejected":
        raise ActivationRefused(f"release {release_id} was rejected by its gates and cannot be activated")
    if row[0] == "active":
        return False
    conn.execute(f"UPDATE {rel} SET state = 'retired' WHERE state = 'active'")
    conn.execute(
        f"UPDATE {rel} SET state = 'active', activated_at = COALESCE(%s::timestamptz, now()) WHERE release_id = %s",
        (now, release_id),
    )
    return True


_PLAIN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def default_schema(policy_name: str) -> str:
    """A policy's store schema when its spec names none: the policy name as a PostgreSQL identifier.

    A plain name (a letter, then letters, digits and '-'; at most 63) maps by '-' -> '_', one-to-one since a
    Kubernetes name has no '_'. Any other name (with '.', a leading digit, longer than 63) would lose
    information, so it maps to '_' + the sanitised name (cut to fit) + '_' + 8 hex digits of its SHA-256: the
    leading '_' keeps these apart from plain names, the hash keeps 'a.b' and 'a-b', or two long names with
    one prefix, apart. The namespace is not part of the name (that would move every existing policy's data):
    two namespaces' policies of one name map to one schema, and the schema's owner record refuses the second
    (docs/install.md, "Store schemas and their owners")."""
    if _PLAIN_NAME.match(policy_name):
        return policy_name.replace("-", "_")
    stem = re.sub(r"[^a-z0-9]+", "_", policy_name.lower()).strip("_")[:53]
    digest = hashlib.sha256(policy_name.encode()).hexdigest()[:8]
    return f"_{stem}_{digest}" if stem else f"_{digest}"
