"""The activation transaction on a policy schema's ``releases`` table, for the operator and the workloads.

At most one release per schema is active (a partial unique index enforces it), so activation retires the
active release and activates the new one in one transaction. The caller opens that transaction on its own
connection (psycopg or any DB-API connection with ``execute``); this module holds the statements only.
"""

from __future__ import annotations

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
