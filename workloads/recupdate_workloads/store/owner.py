"""Which policy owns a schema (the policy_owner table of migration 002), so that two policies never share one.

The first policy that uses a schema claims it: INSERT ... ON CONFLICT DO NOTHING, then read back whoever holds
it (atomic: the table has one row at most). The identity is namespace/name; the uid tells incarnations apart.

* The operator (and local mode, its stand-in) claims on every reconcile before it launches a run. A re-created
  policy (same namespace/name, new uid) adopts its schema: the recorded uid is updated.
* A job checks the owner its run config names before it writes anything, and claims an unowned schema. It
  never adopts: a job whose uid differs from the recorded one was launched for an earlier incarnation.

A different namespace/name is refused everywhere (SchemaOwnedError). The operator's side of this contract is
operator/recupdate_operator/registry.py (the operator never imports the workloads).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

OWNER_TABLE = "policy_owner"


@dataclass(frozen=True)
class Owner:
    """A policy's identity. uid may be empty (unknown: e.g. a run config from an older operator)."""

    namespace: str
    name: str
    uid: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f" (uid {self.uid})" if self.uid else "")

    def same_policy(self, other: Owner) -> bool:
        return (self.namespace, self.name) == (other.namespace, other.name)

    def same_incarnation(self, other: Owner) -> bool:
        return self.same_policy(other) and (not self.uid or not other.uid or self.uid == other.uid)


class SchemaOwnedError(ValueError):
    """The schema belongs to another policy (or to another incarnation of this one). Nothing was written."""

    def __init__(self, schema: str, owner: Owner, claimant: Owner) -> None:
        self.schema, self.owner, self.claimant = schema, owner, claimant
        if owner.same_policy(claimant):
            why = f"this run was launched for uid {claimant.uid}, an earlier incarnation of the policy"
        else:
            why = f"not {claimant.namespace}/{claimant.name}; give each policy a schema of its own (spec.store.schema)"
        super().__init__(f"store schema {schema!r} belongs to policy {owner}: {why}")


def read_owner(conn: psycopg.Connection, schema: str) -> Owner | None:
    """The recorded owner; None when the schema, its owner table or the row does not exist. Writes nothing."""
    exists = conn.execute(
        "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", (schema, OWNER_TABLE)
    ).fetchone()
    if exists is None:
        return None
    row = conn.execute(
        sql.SQL("SELECT namespace, name, uid FROM {}").format(sql.Identifier(schema, OWNER_TABLE))
    ).fetchone()
    return Owner(*row) if row else None


def check_owner(schema: str, owner: Owner | None, claimant: Owner, *, adopt: bool = False) -> None:
    """Raise SchemaOwnedError unless `claimant` may use a schema owned by `owner` (None: unowned)."""
    if owner is None:
        return
    ok = owner.same_policy(claimant) if adopt else owner.same_incarnation(claimant)
    if not ok:
        raise SchemaOwnedError(schema, owner, claimant)


def claim_owner(conn: psycopg.Connection, schema: str, claimant: Owner, *, adopt: bool = False) -> Owner:
    """Claim the (migrated) schema for `claimant` unless another policy holds it; return the owner recorded now.
    adopt=True (the operator, local mode): the same namespace/name with another uid takes the schema over."""
    table = sql.Identifier(schema, OWNER_TABLE)
    with conn.transaction():
        conn.execute(
            sql.SQL("INSERT INTO {} (namespace, name, uid) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING").format(table),
            (claimant.namespace, claimant.name, claimant.uid),
        )
        row = conn.execute(sql.SQL("SELECT namespace, name, uid FROM {} FOR UPDATE").format(table)).fetchone()
        assert row is not None  # inserted, or held by someone
        owner = Owner(*row)
        check_owner(schema, owner, claimant, adopt=adopt)
        if adopt and claimant.uid and owner.uid != claimant.uid:
            conn.execute(sql.SQL("UPDATE {} SET uid = %s, updated_at = now()").format(table), (claimant.uid,))
            owner = claimant
    return owner
