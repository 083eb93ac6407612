"""The HTTP intake of event streams, ``POST /v1/interactions`` (docs/data.md, "HTTP intake"): rows checked one
by one, the good ones written to the policy's interactions table, the bad ones reported and skipped.

It runs in the recommender's FastAPI app (app.py adds the route), so every place that serves the recommender
(the RayService on Kubernetes, local mode, ``recupdate serve``, plain uvicorn) takes events too, with the
replica's store DSN and the served release's schema. The route's own body limit (INTAKE_MAX_BODY_BYTES) is
larger than /recommend's; the request path only parses JSON on the event loop: rows are checked and written in
this module's worker threads, on connections of their own (never the release's evidence connection).

A row is an object with ``user``, ``item``, ``ts`` and optionally ``weight`` and ``event_id``. Reasons a row
is rejected are those of the file loaders where they apply (``missing_field``, ``bad_timestamp``,
``timestamp_out_of_range``, ``bad_weight``, ``negative_weight``, ``weight_out_of_range``, ``unknown_item``),
plus the ones only JSON can have (``not_an_object``, ``unknown_field``, ``bad_user``, ``bad_item``,
``bad_event_id``). The store write is store/ingest.py's (external-id maps, idempotent inserts by event id).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from recupdate_workloads.contract.env import DSN_ENV, positive_int

log = logging.getLogger("recupdate.intake")

INTAKE_PATH = "/v1/interactions"
#: Events one request may carry (a larger batch is a 422 as a whole: split it).
MAX_EVENTS = 10_000
#: The intake's body limit. A typical event is 80-150 bytes, so 10,000 of them fit; parsing 2 MiB of JSON holds
#: the event loop for ~10 ms, the bound that keeps /recommend answering beside a stream of batches.
INTAKE_MAX_BODY_BYTES = 2 * 1024 * 1024
INTAKE_MAX_BODY_BYTES_ENV = "RECUPDATE_INTAKE_MAX_BODY_BYTES"
#: "0", "false" or "off" removes the route (for replicas that must never write).
INTAKE_ENABLED_ENV = "RECUPDATE_INTAKE"
#: Write into this schema instead of the served release's store_schema.
INTAKE_SCHEMA_ENV = "RECUPDATE_INTAKE_SCHEMA"
#: The longest external id (user, item, event id), as store/ingest.py accepts them.
MAX_ID_CHARS = 256
#: A write that takes longer is cancelled by PostgreSQL and answered 503 (the client retries; with event ids a
#: retry never duplicates).
STATEMENT_TIMEOUT_MS = 30_000
#: Rows listed by index in an answer (all of them: a batch has at most MAX_EVENTS).
FIELDS = ("user", "item", "ts", "weight", "event_id")
_ROW_ERROR_CHARS = 120


class Event(BaseModel):
    """One event as documented in the OpenAPI schema (rows are checked one by one, see check_rows)."""

    model_config = ConfigDict(extra="forbid")

    user: str | int = Field(description=f"The user's external id: text (1..{MAX_ID_CHARS} characters) or an integer.")
    item: str | int = Field(
        description="The item's external id, as the catalogue lists it; an item the store does not know is rejected."
    )
    ts: str | int | float = Field(
        description="When it happened: seconds since the epoch (fractions floored) or an RFC 3339 / ISO 8601 time "
        "(no offset: UTC), 1970-01-01T00:00:00Z <= ts < 2200-01-01T00:00:00Z."
    )
    weight: float | None = Field(1.0, description="Rating or strength, finite, 0..1e6; absent or null: 1.0.")
    event_id: str | int | None = Field(
        None,
        description=f"Optional unique id (1..{MAX_ID_CHARS} characters): an event whose id is already stored "
        "is a duplicate and is not written again.",
    )


class InteractionBatch(BaseModel):
    """What ``POST /v1/interactions`` takes. The rows are checked one by one after this shape check."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[Any] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description=f"1..{MAX_EVENTS} events (see Event); bad rows are reported and skipped, good ones written.",
        json_schema_extra={"items": Event.model_json_schema()},
    )


class IntakeResult(BaseModel):
    """The answer to an accepted batch: read = accepted + duplicates + rejected."""

    read: int = Field(description="Rows in the batch.")
    accepted: int = Field(description="Rows written.")
    duplicates: int = Field(description="Rows whose event_id was already stored (or repeated in the batch).")
    rejected: int = Field(description="Rows skipped as invalid.")
    reasons: dict[str, int] = Field(description="Rejected rows per reason.")
    rejected_rows: list[int] = Field(description="The index in `events` of every rejected row.")
    detail: list[dict[str, Any]] = Field(description="What is wrong with the first rejected rows (bounded).")
    store_schema: str = Field(description="The schema written to.")


@dataclass
class Rows:
    """Checked rows, column by column; ``index`` is each row's position in the request."""

    index: list[int] = field(default_factory=list)
    user: list[str] = field(default_factory=list)
    item: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    event_id: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, keep: Sequence[int]) -> Rows:
        """The rows at positions ``keep`` (positions within this object, not request indexes)."""
        return Rows(
            [self.index[i] for i in keep],
            [self.user[i] for i in keep],
            [self.item[i] for i in keep],
            [self.ts[i] for i in keep],
            [self.weight[i] for i in keep],
            [self.event_id[i] for i in keep],
        )


@dataclass(frozen=True)
class RowError:
    """Why one row was rejected: its index, the reason (the error type), the field and a short message."""

    index: int
    reason: str
    field: str | None
    msg: str
    value: Any = None

    def as_error(self) -> dict[str, Any]:
        """As a pydantic-style error, for app.py's bounded echo."""
        loc: list[Any] = ["body", "events", self.index] + ([self.field] if self.field else [])
        out: dict[str, Any] = {"type": self.reason, "loc": loc, "msg": self.msg}
        if self.value is not None:
            out["input"] = self.value
        return out


class IntakeUnavailable(RuntimeError):
    """The intake cannot write now (no schema yet, the schema not ready, the store down): a 503, retry later."""


@functools.cache
def _limits() -> tuple[int, int, float]:
    # The loaders' bounds, one definition (imported on first use: data.loaders brings pandas and pyarrow).
    from recupdate_workloads.data.loaders import TS_MAX, TS_MIN, WEIGHT_MAX

    return TS_MIN, TS_MAX, WEIGHT_MAX


def intake_enabled(environ: Mapping[str, str] | None = None) -> bool:
    raw = (os.environ if environ is None else environ).get(INTAKE_ENABLED_ENV, "").strip().lower()
    return raw not in ("0", "false", "off", "no")


def intake_max_body_bytes(environ: Mapping[str, str] | None = None) -> int:
    """``$RECUPDATE_INTAKE_MAX_BODY_BYTES`` (a positive integer) when set, else INTAKE_MAX_BODY_BYTES."""
    return positive_int(INTAKE_MAX_BODY_BYTES_ENV, INTAKE_MAX_BODY_BYTES, environ, unit="bytes")


def _short(v: Any) -> Any:
    if isinstance(v, str) and len(v) > _ROW_ERROR_CHARS:
        return v[:_ROW_ERROR_CHARS] + "..."
    return v


def _ext_id(v: Any, name: str) -> tuple[str | None, str, str]:
    """(text, reason, message): an external id as text (integers in decimal, surrounding whitespace stripped, as
    the loaders read them); text is None when the value is rejected."""
    if type(v) is str:
        s = v.strip()
        if not s:
            return None, "missing_field", f"{name} is empty"
        if len(s) > MAX_ID_CHARS:
            return None, "id_too_long", f"{name} has more than {MAX_ID_CHARS} characters"
        if "\x00" in s:  # PostgreSQL text cannot hold it
            return None, f"bad_{name}", f"{name} contains a NUL character"
        return s, "", ""
    if type(v) is int and -(2**63) <= v < 2**63:
        return str(v), "", ""
    return None, f"bad_{name}", f"{name} must be text (1..{MAX_ID_CHARS} characters) or a 64-bit integer"


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _seconds(v: Any, ts_min: int, ts_max: int) -> tuple[int | None, str, str]:
    """(seconds, reason, message): seconds is None when the value is rejected. Text is a number of seconds when
    it is a number, else an ISO 8601 time (the loaders' order)."""
    num: int | float
    if type(v) is int:
        num = v
    elif type(v) is float:
        if not math.isfinite(v):
            return None, "bad_timestamp", "ts must be finite"
        num = math.floor(v)
    elif type(v) is str:
        text = v.strip()
        if _NUMBER.fullmatch(text):
            f = float(text)
            if not math.isfinite(f):
                return None, "timestamp_out_of_range", "ts must be from 1970-01-01T00:00:00Z to before 2200-01-01"
            num = math.floor(f)
        else:
            try:
                t = datetime.fromisoformat(text)
                num = math.floor((t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp())
            except (ValueError, OverflowError):
                return None, "bad_timestamp", "ts is neither an RFC 3339 time nor a number of seconds"
    else:
        return None, "bad_timestamp", "ts must be seconds since the epoch (a number) or an RFC 3339 time (text)"
    if not ts_min <= num < ts_max:
        hint = " (this looks like milliseconds: send seconds)" if ts_max * 1000 > num >= ts_max else ""
        return None, "timestamp_out_of_range", f"ts must be from 1970-01-01T00:00:00Z to before 2200-01-01{hint}"
    return int(num), "", ""


def _weight(w: Any, weight_max: float) -> tuple[float | None, str, str]:
    if type(w) is float:
        if not math.isfinite(w):
            return None, "bad_weight", "weight must be a finite number"
    elif type(w) is not int:
        return None, "bad_weight", "weight must be a finite number"
    if w < 0:
        return None, "negative_weight", "weight must be at least 0"
    if w > weight_max:  # an int of any size compares exactly
        return None, "weight_out_of_range", f"weight must be at most {weight_max:g}"
    return float(w), "", ""


_FIELD_SET = frozenset(FIELDS)


def check_rows(events: Sequence[Any]) -> tuple[Rows, list[RowError]]:
    """Check each event; return the good rows and one RowError per bad row (the first reason that applies)."""
    ts_min, ts_max, weight_max = _limits()
    rows = Rows()
    errors: list[RowError] = []
    bad = errors.append
    for i, e in enumerate(events):
        if type(e) is not dict:
            bad(RowError(i, "not_an_object", None, "an event is a JSON object", _short(type(e).__name__)))
            continue
        if not e.keys() <= _FIELD_SET:
            extra = [k for k in e if k not in _FIELD_SET]
            names = ", ".join(repr(_short(str(k))) for k in extra[:3])
            bad(RowError(i, "unknown_field", None, f"unknown field(s) {names}; an event has {', '.join(FIELDS)}"))
            continue
        u, it, t = e.get("user"), e.get("item"), e.get("ts")
        if u is None or it is None or t is None or t == "":
            missing = [k for k, v in (("user", u), ("item", it), ("ts", t)) if v is None or v == ""]
            bad(RowError(i, "missing_field", missing[0], f"{', '.join(missing)} missing or empty"))
            continue
        user, reason, msg = _ext_id(u, "user")
        if user is None:
            bad(RowError(i, reason, "user", msg, _short(u)))
            continue
        item, reason, msg = _ext_id(it, "item")
        if item is None:
            bad(RowError(i, reason, "item", msg, _short(it)))
            continue
        ts, reason, msg = _seconds(t, ts_min, ts_max)
        if ts is None:
            bad(RowError(i, reason, "ts", msg, _short(t)))
            continue
        w = e.get("weight")
        weight = 1.0
        if w is not None:
            checked, reason, msg = _weight(w, weight_max)
            if checked is None:
                bad(RowError(i, reason, "weight", msg, _short(w)))
                continue
            weight = checked
        eid: str | None = None
        raw_id = e.get("event_id")
        if raw_id is not None and not (type(raw_id) is str and not raw_id.strip()):  # null or empty: no id
            eid, reason, msg = _ext_id(raw_id, "event_id")
            if eid is None:
                bad(RowError(i, reason, "event_id", msg, _short(raw_id)))
                continue
        rows.index.append(i)
        rows.user.append(user)
        rows.item.append(item)
        rows.ts.append(ts)
        rows.weight.append(weight)
        rows.event_id.append(eid)
    return rows, errors


@dataclass(frozen=True)
class WriteOutcome:
    """What the store write did with the checked rows."""

    accepted: int
    duplicates: int
    unknown_items: list[int]  # request indexes of rows whose item the store does not know


@dataclass(frozen=True)
class Outcome:
    """One batch's result: the counts and the rejected rows."""

    read: int
    accepted: int
    duplicates: int
    errors: list[RowError]
    schema: str

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.errors))


Writer = Callable[[Any, Rows], WriteOutcome]


class _Redo(Exception):
    """Roll a write back and do it again the careful way."""


def _columns(rows: Rows) -> dict[str, Any]:
    cols: dict[str, Any] = {"user": rows.user, "item": rows.item, "ts": rows.ts, "weight": rows.weight}
    if any(e is not None for e in rows.event_id):
        cols["event_id"] = rows.event_id
    return cols


def write_batch(store: Any, rows: Rows) -> WriteOutcome:
    """Write checked rows through the store's one write path (store/ingest.py: external-id maps, COPY, event
    ids inserted with ON CONFLICT DO NOTHING), in one transaction, and name the rows whose item the catalogue
    does not hold (write_interactions only counts them).

    Optimistic: the batch is written as it is, and only when some items were unknown are its items looked up
    (in the same transaction). Should an item have been added in between (the counts then differ), the write
    is rolled back and done again with the unknown rows taken out first. (One lookup of 1,000 items costs
    ~12 ms on the benchmark's machine, an eighth of the write: not worth paying on every batch.)"""
    from recupdate_workloads.store import ingest

    source = f"POST {INTAKE_PATH}"
    try:
        with store.tx() as conn:
            res = ingest.write_interactions(store, _columns(rows), source=source)
            unknown: list[int] = []
            if res.skipped.get("unknown_item"):
                known = ingest.item_ids(conn, sorted(set(rows.item)))
                unknown = [rows.index[j] for j, it in enumerate(rows.item) if it not in known]
                if len(unknown) != res.skipped["unknown_item"]:
                    raise _Redo
    except _Redo:
        with store.tx() as conn:
            known = ingest.item_ids(conn, sorted(set(rows.item)))
            keep = [j for j, it in enumerate(rows.item) if it in known]
            unknown = [rows.index[j] for j, it in enumerate(rows.item) if it not in known]
            if not keep:
                return WriteOutcome(0, 0, unknown)
            res = ingest.write_interactions(store, _columns(rows.subset(keep)), source=source)
    others = {k: v for k, v in res.skipped.items() if k != "unknown_item"}
    if others:  # check_rows is at least as strict as the store's checks: never expected
        log.error("the store skipped rows the intake had accepted: %s", others)
    return WriteOutcome(res.new, res.duplicate, unknown)


SchemaSource = Callable[[], tuple[str, str] | None]  # (store_schema, dsn_env), None: nothing to write to yet


class Intake:
    """The intake of one replica: worker threads and a small connection pool to the target schema.

    ``schema_source`` says where to write (the served release's store_schema and DSN variable); the pool is
    opened on the first batch and reopened when the target changes. Before its first write to a schema the
    intake checks that the schema is ready: it exists, is migrated and is owned by a policy (store/owner.py).
    It never creates nor migrates a schema: that is the operator's and the jobs' part."""

    def __init__(
        self,
        schema_source: SchemaSource,
        *,
        writer: Writer | None = None,
        environ: Mapping[str, str] | None = None,
        workers: int = 2,
    ) -> None:
        self.schema_source = schema_source
        self.writer = writer
        self.environ = os.environ if environ is None else environ
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        self._conns: Any = None  # psycopg_pool.ConnectionPool of the current target
        self._target: tuple[str, str] | None = None  # (dsn, schema) of _conns
        self._ready: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.batches = 0
        self.rows_written = 0

    # -- where to write --

    def target(self) -> tuple[str, str]:
        """(dsn, schema) to write to; IntakeUnavailable when there is none yet."""
        override = self.environ.get(INTAKE_SCHEMA_ENV, "").strip()
        src = self.schema_source()
        if override:
            schema, dsn_env = override, src[1] if src else DSN_ENV
        elif src is None:
            raise IntakeUnavailable("no release configured yet: the intake writes to the served release's schema")
        else:
            schema, dsn_env = src
        dsn = self.environ.get(dsn_env)
        if not dsn:
            raise IntakeUnavailable(f"${dsn_env} is not set in the replica: the intake has no store to write to")
        return dsn, schema

    def _connections(self, dsn: str, schema: str) -> Any:
        from psycopg_pool import ConnectionPool

        from recupdate_workloads.store.db import check_schema

        with self._lock:
            if self._target == (dsn, schema) and self._conns is not None:
                return self._conns
            old, self._conns, self._target = self._conns, None, None
            if old is not None:
                old.close()
            check_schema(schema)
            conns = ConnectionPool(
                dsn,
                min_size=1,
                max_size=self.workers,
                open=False,
                kwargs={"autocommit": True, "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
                name=f"recupdate-intake-{schema}",
            )
            conns.open(wait=False)
            self._conns, self._target = conns, (dsn, schema)
            return conns

    def _check_ready(self, conn: Any, dsn: str, schema: str) -> None:
        if (dsn, schema) in self._ready:
            return
        from recupdate_workloads.store.owner import read_owner

        row = conn.execute(
            "SELECT count(*) FILTER (WHERE table_name = 'interactions'), count(*) FROM information_schema.tables"
            " WHERE table_schema = %s",
            (schema,),
        ).fetchone()
        if not row or not row[1]:
            raise IntakeUnavailable(f"store schema {schema!r} does not exist: the intake never creates one")
        if not row[0]:
            raise IntakeUnavailable(f"store schema {schema!r} has no interactions table (not migrated)")
        if read_owner(conn, schema) is None:
            raise IntakeUnavailable(
                f"store schema {schema!r} is not owned by any policy: the intake writes only to a policy's schema"
            )
        self._ready.add((dsn, schema))

    # -- a batch --

    def ingest(self, events: Sequence[Any]) -> Outcome:
        """Check and write one batch (blocking: runs in a worker thread). IntakeUnavailable when nothing can be
        written now; a batch with no valid row writes nothing (the caller answers 422)."""
        from psycopg import Error as PGError
        from psycopg_pool import PoolTimeout

        from recupdate_workloads.store.db import Store

        rows, errors = check_rows(events)
        if not rows:
            return Outcome(len(events), 0, 0, errors, "")
        dsn, schema = self.target()
        writer = self.writer or write_batch
        conns = self._connections(dsn, schema)
        try:
            with conns.connection(timeout=10.0) as conn:
                self._check_ready(conn, dsn, schema)
                out = writer(Store(dsn=dsn, schema=schema, conn=conn), rows)
        except PoolTimeout as exc:
            raise IntakeUnavailable(f"the store is unreachable: {exc}") from None
        except PGError as exc:
            raise IntakeUnavailable(f"the store refused the write: {type(exc).__name__}: {exc}") from None
        if out.unknown_items:
            by_index = dict(zip(rows.index, rows.item, strict=True))
            errors.extend(
                RowError(i, "unknown_item", "item", "the catalogue has no such item", _short(by_index.get(i)))
                for i in out.unknown_items
            )
            errors.sort(key=lambda e: e.index)
        self.batches += 1
        self.rows_written += out.accepted
        return Outcome(len(events), out.accepted, out.duplicates, errors, schema)

    async def submit(self, events: Sequence[Any]) -> Outcome:
        """``ingest`` in a worker thread: the event loop goes on answering while rows are checked and written."""
        import asyncio

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="recupdate-intake")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.ingest, events)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._conns is not None:
                with contextlib.suppress(Exception):
                    self._conns.close()
                self._conns, self._target = None, None
