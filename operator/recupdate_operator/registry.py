"""The release registry in the Postgres store, as the controller sees it (docs/architecture.md).

Plain SQL through psycopg against the tables of workloads/recupdate_workloads/store/migrations/ (001_registry,
002_policy_owner), schema-qualified (one schema per policy, api.schema_name); the operator never imports the
workloads, except their contract package (standard library and pydantic). Every read first claims the schema for its policy (the policy_owner row: the first policy to use a
schema owns it, and a policy that does not own it is refused by the planner). It reads runs and releases into
a planner.RegistryView, and writes only what the controller decides: the claim, run outcomes the workload
could not record, activation (one transaction: retire the active release, activate the new one), rejection
and pruning.

The DSN comes from the Secret of spec.store.secretRef (read with the kubernetes client, cached), else from the
operator's own RECUPDATE_STORE_DSN. Errors become StoreError, whose message has been scrubbed of the DSN and
any password (events.redact) and which chains no original exception (a traceback would carry its text).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from psycopg import sql

from recupdate_workloads.contract import registry as contract_registry
from recupdate_workloads.contract.analysis import BUCKETS, CANARY_BUCKET_SQL, HIT_K

from .api import AnalysisMode, AnalysisPhase, AnalysisStatus, RunKind, RunResult, SecretKeyRef
from .backends.base import PolicyRef
from .events import SECRETS, redact
from .planner import (
    AnalysisFigures,
    RecordRun,
    RegistryView,
    ReleaseView,
    RunView,
    SchemaOwner,
    owner_conflict,
)

SECRET_TTL = 300.0  # seconds a DSN read from a Secret is reused
CONNECT_TIMEOUT = 5
STATEMENT_TIMEOUT_MS = 15_000
MAX_IDLE_PER_DSN = 4
RUNS_READ_LIMIT = 500  # the newest runs the planner sees (it needs in-flight and recent ones)
# The workloads' migrations take this advisory lock (store/db.py): creating a schema and its owner table under
# it never races a job that migrates the same schema.
_MIGRATION_LOCK = 0x72656375
# The owner table of workloads/recupdate_workloads/store/migrations/002_policy_owner.sql, the same definition
# (a test compares the two): the operator claims a schema before any job has migrated it.
_OWNER_TABLE = "policy_owner"
_OWNER_DDL = (
    "CREATE TABLE IF NOT EXISTS {} ("
    " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
    " namespace text NOT NULL,"
    " name text NOT NULL,"
    " uid text NOT NULL DEFAULT '',"
    " claimed_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz NOT NULL DEFAULT now())"
)
_RESULT_STATUS = {RunResult.SUCCEEDED: "succeeded", RunResult.FAILED: "failed"}


class StoreError(Exception):
    """The store could not be reached or refused a statement. The message is scrubbed of secrets.
    transient: a retry may succeed (connection and server errors), False for refusals (e.g. a rejected
    release cannot be activated)."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(redact(message))
        self.transient = transient


# ---------------------------------------------------------------------------------------------------------
# DSN sources


class SecretReader:
    """Reads one key of a Secret with the kubernetes client; caches values for `ttl` seconds."""

    def __init__(self, api_client: Any, ttl: float = SECRET_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = client.CoreV1Api(api_client)
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, ref: SecretKeyRef) -> str:
        key = (namespace, ref.name, ref.key)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        where = f"Secret {namespace}/{ref.name}"
        try:
            # rbac: "" secrets get
            secret = self.api.read_namespaced_secret(ref.name, namespace, _request_timeout=(5, 30))
        except ApiException as exc:
            if exc.status == 404:
                raise StoreError(f"{where} not found", transient=True) from None
            raise StoreError(f"cannot read {where}: {exc.status} {exc.reason}") from None
        except Exception as exc:
            raise StoreError(f"cannot read {where}: {type(exc).__name__}") from None
        data = secret.data or {}
        if ref.key not in data:
            raise StoreError(f"{where} has no key {ref.key!r}", transient=True)
        try:
            value = base64.b64decode(data[ref.key]).decode().strip()
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{where} key {ref.key!r} is not valid base64 text") from None
        SECRETS.add(value)
        with self._lock:
            self._cache[key] = (value, self.clock() + self.ttl)
        return value

    def invalidate(self, namespace: str, ref: SecretKeyRef) -> None:
        with self._lock:
            self._cache.pop((namespace, ref.name, ref.key), None)


# ---------------------------------------------------------------------------------------------------------
# Connections


class _Pool:
    """Idle connections per DSN, reused across reconciles (threads take one each)."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_DSN) -> None:
        self.max_idle = max_idle
        self._idle: dict[str, list[psycopg.Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _key(dsn: str) -> str:
        return hashlib.sha256(dsn.encode()).hexdigest()

    @contextlib.contextmanager
    def connection(self, dsn: str) -> Iterator[psycopg.Connection]:
        key = self._key(dsn)
        conn: psycopg.Connection | None = None
        with self._lock:
            idle = self._idle.get(key) or []
            while idle and conn is None:
                candidate = idle.pop()
                if not candidate.closed:
                    conn = candidate
        if conn is None:
            conn = _connect(dsn)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            broken = conn.closed or conn.broken
            if not ok and not broken:
                broken = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            if broken:
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                with self._lock:
                    idle = self._idle.setdefault(key, [])
                    if len(idle) < self.max_idle and not self._closed:
                        idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()


def _connect(dsn: str) -> psycopg.Connection:
    SECRETS.add(dsn)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_MS)}")
        conn.execute("SET application_name = 'recupdate-operator'")
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to the store: {_pg_message(exc)}") from None
    except Exception as exc:  # e.g. a DSN that is not a connection string at all
        raise StoreError(f"cannot connect to the store: {type(exc).__name__}: {exc}") from None
    return conn


def _pg_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return redact(text)[:500] or type(exc).__name__


def _is_missing_relation(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName)


# ---------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class StoreSettings:
    default_dsn: str | None = None  # the operator's own RECUPDATE_STORE_DSN, for policies without secretRef
    runs_limit: int = RUNS_READ_LIMIT


class Registry:
    """The controller's access to each policy's registry. Thread-safe; one instance per operator."""

    def __init__(self, secrets: SecretReader | None, settings: StoreSettings | None = None) -> None:
        self.secrets = secrets
        self.settings = settings or StoreSettings()
        self.pool = _Pool()
        SECRETS.add(self.settings.default_dsn)

    def close(self) -> None:
        self.pool.close()

    # -- DSN -----------------------------------------------------------------------------------------------

    def dsn(self, policy: PolicyRef) -> str:
        ref = policy.spec.store.secret_ref
        if ref is not None:
            if self.secrets is None:
                raise StoreError("no Kubernetes client to read spec.store.secretRef with", transient=False)
            return self.secrets.get(policy.namespace, ref)
        if self.settings.default_dsn:
            return self.settings.default_dsn
        raise StoreError(
            "no store configured: set spec.store.secretRef, or give the operator RECUPDATE_STORE_DSN",
            transient=True,
        )

    @contextlib.contextmanager
    def _conn(self, policy: PolicyRef) -> Iterator[psycopg.Connection]:
        dsn = self.dsn(policy)
        try:
            with self.pool.connection(dsn) as conn:
                yield conn
        except StoreError as exc:
            if "cannot connect" in str(exc) and policy.spec.store.secret_ref is not None and self.secrets:
                self.secrets.invalidate(policy.namespace, policy.spec.store.secret_ref)  # maybe rotated
            raise
        except psycopg.Error as exc:
            if _is_missing_relation(exc):
                raise
            raise StoreError(f"store error: {_pg_message(exc)}") from None

    @staticmethod
    def _t(schema: str, table: str) -> sql.Composable:
        return sql.Identifier(schema, table)

    # -- ownership -----------------------------------------------------------------------------------------

    def claim(self, policy: PolicyRef) -> SchemaOwner:
        """Claim the policy's schema unless a policy owns it already; return its owner as recorded now.

        The first policy to use a schema owns it: its policy_owner row is inserted (ON CONFLICT DO NOTHING,
        then read back, so two claimants never both win), creating the schema and the table when no job has
        yet. The same namespace/name with another uid (the policy was deleted and created again) adopts the
        schema: the uid is updated and previous_uid says so. Any other owner is returned as it is, for the
        planner to refuse this policy. Raises StoreError."""
        table = self._t(policy.schema, _OWNER_TABLE)
        select = sql.SQL("SELECT namespace, name, uid FROM {}").format(table)
        with self._conn(policy) as conn:
            row = self._owner_row(conn, select)
            if row is None:
                row = self._insert_owner(conn, policy, select)
            owner = SchemaOwner(*row)
            if owner_conflict(owner, policy.namespace, policy.name, policy.schema) or not policy.uid:
                return owner
            if owner.uid == policy.uid:
                return owner
            try:
                conn.execute(
                    sql.SQL("UPDATE {} SET uid = %s, updated_at = now() WHERE namespace = %s AND name = %s").format(
                        table
                    ),
                    (policy.uid, policy.namespace, policy.name),
                )
            except psycopg.Error as exc:
                raise StoreError(f"store error: {_pg_message(exc)}") from None
            # An unknown uid (claimed by a run config without one) is filled in; a different one is adopted.
            return SchemaOwner(policy.namespace, policy.name, policy.uid, previous_uid=owner.uid)

    @staticmethod
    def _owner_row(conn: psycopg.Connection, select: sql.Composed) -> tuple[str, str, str] | None:
        try:
            row = conn.execute(select).fetchone()
        except psycopg.Error as exc:
            if _is_missing_relation(exc):
                return None
            raise StoreError(f"store error: {_pg_message(exc)}") from None
        return (str(row[0]), str(row[1]), str(row[2])) if row else None

    def _insert_owner(self, conn: psycopg.Connection, policy: PolicyRef, select: sql.Composed) -> tuple[str, str, str]:
        s = policy.schema
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when it exists.
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (s,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(s)))
                conn.execute(sql.SQL(_OWNER_DDL).format(self._t(s, _OWNER_TABLE)))
                conn.execute(
                    sql.SQL("INSERT INTO {} (namespace, name, uid) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING").format(
                        self._t(s, _OWNER_TABLE)
                    ),
                    (policy.namespace, policy.name, policy.uid),
                )
                row = conn.execute(select).fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"store error: {_pg_message(exc)}") from None
        assert row is not None  # inserted, or held by whoever inserted first
        return str(row[0]), str(row[1]), str(row[2])

    # -- reads ---------------------------------------------------------------------------------------------

    def read(self, policy: PolicyRef) -> RegistryView:
        """Claim the schema (see claim), then read its runs and releases in one consistent snapshot. Never
        raises: an error gives RegistryView(error=<scrubbed message>). A schema no job has migrated yet reads
        as empty. A schema another policy owns is not read: RegistryView(owner=<that policy>) only."""
        owner: SchemaOwner | None = None
        try:
            owner = self.claim(policy)
            if owner_conflict(owner, policy.namespace, policy.name, policy.schema):
                return RegistryView(owner=owner)
            return dataclasses.replace(self._read(policy), owner=owner)
        except StoreError as exc:
            return RegistryView(error=str(exc))
        except psycopg.Error as exc:
            if _is_missing_relation(exc):
                return RegistryView(owner=owner)
            return RegistryView(error=f"store error: {_pg_message(exc)}")

    def _read(self, policy: PolicyRef) -> RegistryView:
        s = policy.schema
        rel_q = sql.SQL(
            "SELECT l.release_id, l.state, l.gates, l.metrics, l.created_at, l.activated_at,"
            " CASE WHEN s.window_end IS NOT NULL THEN to_timestamp(s.window_end) ELSE s.created_at END,"
            " l.run_id, l.adapter_uri, l.table_version"
            " FROM {rel} l LEFT JOIN {snap} s ON s.snapshot_id = l.snapshot_id"
            " ORDER BY l.created_at, l.release_id"
        ).format(rel=self._t(s, "releases"), snap=self._t(s, "snapshots"))
        run_q = sql.SQL(
            "SELECT r.run_id, r.kind, r.status, r.error,"
            " (SELECT l.release_id FROM {rel} l WHERE l.run_id = r.run_id ORDER BY l.created_at DESC LIMIT 1),"
            " r.cost"
            " FROM {runs} r ORDER BY r.started_at DESC, r.run_id LIMIT %s"
        ).format(rel=self._t(s, "releases"), runs=self._t(s, "runs"))
        with self._conn(policy) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rel_rows = conn.execute(rel_q).fetchall()
            run_rows = conn.execute(run_q, (self.settings.runs_limit,)).fetchall()
        releases = [
            ReleaseView(
                release_id=r[0],
                state=r[1],
                gates=_json(r[2]),
                metrics=_json(r[3]),
                created_at=r[4],
                activated_at=r[5],
                evidence_at=r[6],
                run_id=r[7],
                adapter_uri=r[8],
                table_version=str(r[9]) if r[9] is not None else None,
            )
            for r in rel_rows
        ]
        runs = []
        for r in run_rows:
            try:
                kind = RunKind(r[1])
            except ValueError:
                continue  # e.g. 'bootstrap' rows of local mode
            cost = _json(r[5]) if r[5] is not None else {}
            sync = _json(cost.get("sync"))
            runs.append(
                RunView(
                    run_id=r[0],
                    kind=kind,
                    status=r[2],
                    error=r[3],
                    release_id=r[4],
                    sync=sync or None,
                    cost=cost or None,
                )
            )
        return RegistryView(runs=tuple(reversed(runs)), releases=tuple(releases))

    # -- analysis on live events (docs/analysis.md) -------------------------------------------------------

    def with_analysis(self, policy: PolicyRef, status: Any, view: RegistryView) -> RegistryView:
        """`view` with the figures of the analysis that status.analysis says is running (unchanged when none
        runs, the store could not be read, or the spec has no analysis). Never raises: a failed measure gives
        figures with an error, and the analysis goes on."""
        raw = status.get("analysis") if isinstance(status, Mapping) else None
        if view.error or not isinstance(raw, Mapping) or policy.spec.gates.analysis is None:
            return view
        try:
            a = AnalysisStatus.model_validate(raw)
        except ValueError:
            return view
        if a.phase != AnalysisPhase.RUNNING or a.started_at is None:
            return view
        return dataclasses.replace(view, analysis=self.measure_analysis(policy, a, view))

    def measure_analysis(self, policy: PolicyRef, a: AnalysisStatus, view: RegistryView) -> AnalysisFigures:
        """HR@5 of the candidate's and the active release's transition tables on the events after the analysis
        started, in one SQL statement (no model, no torch): the positive interactions of the users active
        since then, repeats collapsed, each novel next cluster with its two distinct predecessors as the
        context, as data/sequences.py forms triples. Shadow scores both tables on every event; Canary scores
        each user's events with the table of their arm (contract.analysis.CANARY_BUCKET_SQL)."""
        cand, base = view.release(a.release_id), view.release(a.baseline_release)
        fig = AnalysisFigures(a.release_id, a.baseline_release)
        missing = [
            rid for r, rid in ((cand, a.release_id), (base, a.baseline_release)) if r is None or r.table_version is None
        ]
        if missing or cand is None or base is None or a.started_at is None:
            return dataclasses.replace(fig, error=f"no transition table for {', '.join(missing) or 'the analysis'}")
        assert cand.table_version is not None and base.table_version is not None  # in `missing` otherwise
        s = policy.schema
        canary = a.mode == AnalysisMode.CANARY
        bucket = sql.SQL(CANARY_BUCKET_SQL.format(user="coalesce(ux.external, t.user_id::text)"))
        cand_arm = sql.SQL("canary") if canary else sql.SQL("true")
        base_arm = sql.SQL("NOT canary") if canary else sql.SQL("true")

        def hit(table_version: str) -> sql.Composable:
            return sql.SQL(
                "EXISTS (SELECT 1 FROM {} x WHERE x.c1 = ev.c1 AND x.c2 = ev.c2 AND x.cluster = ev.c_next"
                " AND x.rank <= {})"
            ).format(self._t(s, f"transitions_v{int(table_version)}"), sql.Literal(HIT_K))

        q = sql.SQL(
            "WITH recent AS (SELECT DISTINCT user_id FROM {inter} WHERE ts > %(since)s AND weight >= %(thr)s),"
            " pos AS (SELECT i.user_id, i.ts, i.item_id, it.cluster FROM {inter} i"
            "  JOIN recent r ON r.user_id = i.user_id JOIN {items} it ON it.item_id = i.item_id"
            "  WHERE i.weight >= %(thr)s),"
            " seq AS (SELECT user_id, ts, item_id, cluster,"
            "  lag(cluster) OVER (PARTITION BY user_id ORDER BY ts, item_id) AS prev FROM pos),"
            " col AS (SELECT user_id, ts, item_id, cluster FROM seq WHERE prev IS DISTINCT FROM cluster),"
            " tri AS (SELECT user_id, ts, cluster AS c_next, lag(cluster, 1) OVER w AS c2, lag(cluster, 2) OVER w AS c1"
            "  FROM col WINDOW w AS (PARTITION BY user_id ORDER BY ts, item_id)),"
            " ev AS (SELECT t.c1, t.c2, t.c_next, {bucket} < %(cut)s AS canary FROM tri t"
            "  LEFT JOIN {users} ux ON ux.user_id = t.user_id"
            "  WHERE t.ts > %(since)s AND t.c1 IS NOT NULL AND t.c_next <> t.c1)"
            " SELECT count(*) FILTER (WHERE {ca}), count(*) FILTER (WHERE {ca} AND {chit}),"
            " count(*) FILTER (WHERE {ba}), count(*) FILTER (WHERE {ba} AND {bhit}) FROM ev"
        ).format(
            inter=self._t(s, "interactions"),
            items=self._t(s, "items"),
            users=self._t(s, "user_ids"),
            bucket=bucket,
            ca=cand_arm,
            ba=base_arm,
            chit=hit(cand.table_version),
            bhit=hit(base.table_version),
        )
        params = {
            "since": int(a.started_at.timestamp()),
            "thr": float(policy.spec.data.positive_threshold),
            "cut": int(a.traffic_percent * BUCKETS // 100),
        }
        try:
            with self._conn(policy) as conn:
                row = conn.execute(q, params).fetchone()
        except (StoreError, psycopg.Error) as exc:
            msg = str(exc) if isinstance(exc, StoreError) else f"store error: {_pg_message(exc)}"
            return dataclasses.replace(fig, error=msg[:500])
        assert row is not None
        return dataclasses.replace(
            fig,
            candidate_events=int(row[0]),
            candidate_hits=int(row[1]),
            baseline_events=int(row[2]),
            baseline_hits=int(row[3]),
        )

    def record_analysis(self, policy: PolicyRef, release_id: str, verdict: str, figures: Mapping[str, Any]) -> None:
        """Keep an analysis verdict and its figures with the release (gates.analysis)."""
        q = sql.SQL(
            "UPDATE {} SET gates = gates || jsonb_build_object('analysis', %s::jsonb) WHERE release_id = %s"
        ).format(self._t(policy.schema, "releases"))
        doc = {**figures, "verdict": verdict}
        try:
            with self._conn(policy) as conn:
                conn.execute(q, (json.dumps(doc, default=str), release_id))
        except psycopg.Error as exc:
            raise StoreError(f"store error: {_pg_message(exc)}") from None

    # -- writes --------------------------------------------------------------------------------------------

    def record_run(self, policy: PolicyRef, action: RecordRun, now: datetime) -> None:
        """Record a run's end unless it is already final (the workload's own record wins)."""
        status = _RESULT_STATUS.get(action.result)
        if status is None:
            return
        error = None
        if action.result == RunResult.FAILED:
            error = redact(f"{action.reason}: {action.message}" if action.message else action.reason)[:2000]
        q = sql.SQL(
            "INSERT INTO {runs} (run_id, kind, status, started_at, finished_at, error)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,"
            " error = coalesce({runs}.error, EXCLUDED.error)"
            " WHERE {runs}.status = 'running'"
        ).format(runs=self._t(policy.schema, "runs"))
        try:
            with self._conn(policy) as conn:
                conn.execute(q, (action.run_id, action.kind.value, status, now, now, error))
        except psycopg.Error as exc:
            if _is_missing_relation(exc):
                return  # the run never got as far as creating its schema: nothing to record it in
            raise StoreError(f"store error: {_pg_message(exc)}") from None

    def activate(self, policy: PolicyRef, release_id: str, now: datetime) -> None:
        """Make `release_id` the active release in one transaction: the active one is retired first (the
        partial unique index allows one active release). Rejected or unknown releases are refused."""
        try:
            with self._conn(policy) as conn, conn.transaction():
                contract_registry.activate(conn, policy.schema, release_id, now)
        except contract_registry.ActivationRefused as exc:
            raise StoreError(str(exc), transient=False) from None
        except psycopg.Error as exc:
            raise StoreError(f"store error: {_pg_message(exc)}") from None

    def reject(self, policy: PolicyRef, release_id: str, reasons: Sequence[str]) -> None:
        """Mark a candidate rejected, keeping why in gates.reasons. Only candidates change."""
        q = sql.SQL(
            "UPDATE {} SET state = 'rejected', gates = gates || jsonb_build_object('reasons', %s::jsonb)"
            " WHERE release_id = %s AND state = 'candidate'"
        ).format(self._t(policy.schema, "releases"))
        try:
            with self._conn(policy) as conn:
                conn.execute(q, (json.dumps([redact(r) for r in reasons]), release_id))
        except psycopg.Error as exc:
            raise StoreError(f"store error: {_pg_message(exc)}") from None

    def prune(self, policy: PolicyRef, release_ids: Sequence[str]) -> None:
        """Delete retired and rejected releases (never a candidate or the active one). Their transition tables
        and snapshots stay: they belong to the workloads, which drop unreferenced versions."""
        if not release_ids:
            return
        q = sql.SQL("DELETE FROM {} WHERE release_id = ANY(%s) AND state IN ('retired', 'rejected')").format(
            self._t(policy.schema, "releases")
        )
        try:
            with self._conn(policy) as conn:
                conn.execute(q, (list(release_ids),))
        except psycopg.Error as exc:
            raise StoreError(f"store error: {_pg_message(exc)}") from None


def _json(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, Mapping) else {}
    return {}
