"""Data sources by URI, as spec.data names them (docs/data.md): what each one reads, in batches.

Reading only; store/sync.py decides what is new and writes it. URIs:

- a Parquet or CSV file or directory: a path, file://PATH, or s3://BUCKET/PREFIX (pyarrow's own S3
  filesystem; credentials from the environment only, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, put there from
  a Secret). A directory is every file under it, recursively, but names starting with '.' or '_' (Spark's
  _SUCCESS, .crc files, _temporary/).
- `sql`: a query against the user's PostgreSQL (DSN in RECUPDATE_SOURCE_DSN), read by a watermark column.
- `postgres`: the store's own inbox tables (store/sync.py drains them).
- `movielens:PATH`: ratings.csv as a file, the catalogue from movies.csv (genre-pair clusters).
- `synthetic`: the deterministic drift stream and its catalogue.

A source that cannot be read raises DataError (one line: the file or source, and the problem).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recupdate_workloads.contract.env import SOURCE_DSN_ENV
from recupdate_workloads.data.errors import DataError, one_line
from recupdate_workloads.data.loaders import _PARQUET_MAGIC, _pick, _read

#: Rows per batch read from a file or a query: bounds the client's memory (about 100 MB a batch).
BATCH_ROWS = 1 << 20
#: File kinds of a dataset (ingest_files.kind).
KINDS = ("interactions", "items", "clusters")

_INTERACTIONS = {"user": "user", "item": "item", "ts": "ts", "weight": "weight", "event_id": ""}
_ITEMS = {"item": "item", "cluster": "cluster"}
_CLUSTERS = {"cluster": "cluster", "name": "name", "keywords": "keywords"}


# -- configuration ---------------------------------------------------------------------------------------------


@dataclass
class SqlQuery:
    query: str
    watermark: str = ""


@dataclass
class DataConfig:
    """spec.data as a job reads it from its --config (camelCase keys; unknown keys ignored). A config without
    `interactions` (a hand-written one) syncs only the store's inbox tables."""

    interactions: str = "postgres"
    items: str = ""
    clusters: str = ""
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=lambda: dict(_INTERACTIONS))
    item_columns: dict[str, str] = field(default_factory=lambda: dict(_ITEMS))
    cluster_columns: dict[str, str] = field(default_factory=lambda: dict(_CLUSTERS))
    sql: dict[str, SqlQuery] = field(default_factory=dict)
    s3_endpoint: str = ""
    s3_scheme: str = "https"
    s3_region: str = ""
    synthetic_interactions: int = 100_000
    synthetic_seed: int = 7

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> DataConfig:
        d = dict(data or {})
        cols = dict(d.get("columns") or {})
        if "eventId" in cols:
            cols["event_id"] = cols.pop("eventId")
        sql = d.get("sql") or {}
        queries = {
            k: SqlQuery(str(q["query"]), str(q.get("watermark") or ""))
            for k in KINDS
            if isinstance((q := sql.get(k)), Mapping) and q.get("query")
        }
        store = d.get("objectStorage") or {}
        return cls(
            interactions=str(d.get("interactions") or "postgres"),
            items=str(d.get("items") or ""),
            clusters=str(d.get("clusters") or ""),
            format=str(d.get("format") or "auto"),
            columns=_INTERACTIONS | {k: str(v) for k, v in cols.items() if k in _INTERACTIONS},
            item_columns=_ITEMS | {k: str(v) for k, v in (d.get("itemColumns") or {}).items() if k in _ITEMS},
            cluster_columns=_CLUSTERS
            | {k: str(v) for k, v in (d.get("clusterColumns") or {}).items() if k in _CLUSTERS},
            sql=queries,
            s3_endpoint=str(store.get("endpoint") or ""),
            s3_scheme=str(store.get("scheme") or "https"),
            s3_region=str(store.get("region") or ""),
        )

    def mapping(self, kind: str) -> dict[str, str]:
        """Canonical name -> source column, for write_interactions / the catalogue (no event id: dropped)."""
        m = {"interactions": self.columns, "items": self.item_columns, "clusters": self.cluster_columns}[kind]
        return {k: v for k, v in m.items() if v}


# -- file systems ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRef:
    """One file of a dataset: `uri` is its identity in ingest_files (scheme://path), `path` what `fs` opens."""

    uri: str
    path: str
    size: int | None
    mtime: str | None
    fs: Any = field(compare=False, repr=False)


def filesystem(uri: str, cfg: DataConfig) -> tuple[Any, str, str]:
    """(pyarrow filesystem, path inside it, URI prefix) of a file source URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise DataError(uri, "an s3:// URI needs a bucket: s3://BUCKET/PREFIX")
        kwargs: dict[str, Any] = {"scheme": cfg.s3_scheme or "https"}
        if cfg.s3_endpoint:
            kwargs["endpoint_override"] = cfg.s3_endpoint
        if cfg.s3_region:
            kwargs["region"] = cfg.s3_region
        # Credentials: pyarrow's S3 client reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
        try:
            fs = pafs.S3FileSystem(**kwargs)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(uri, f"cannot open object storage ({one_line(str(exc), 160)})") from None
        return fs, f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/"), "s3://"
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), str(Path(unquote(parsed.path)).absolute()), "file://"
    if parsed.scheme and len(parsed.scheme) > 1:  # a Windows drive letter is no scheme
        raise DataError(uri, f"unknown URI scheme {parsed.scheme!r}: use a path, file://, or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).absolute()), "file://"


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(uri: str, cfg: DataConfig) -> list[FileRef]:
    """The files of a file source, sorted by URI: the file itself, or every visible file under a directory.
    DataError when the URI names nothing or cannot be listed."""
    fs, path, prefix = filesystem(uri, cfg)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(uri, "no such file or directory")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            infos = [i for i in found if i.type == pafs.FileType.File and not _hidden(i.path[len(path) :])]
    except DataError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise DataError(uri, f"cannot list ({one_line(str(exc), 200)})") from None
    refs = [
        FileRef(prefix + i.path, i.path, i.size, i.mtime.isoformat() if i.mtime is not None else None, fs)
        for i in infos
    ]
    return sorted(refs, key=lambda f: f.uri)


# -- reading files ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Columns of some rows of a source, plus lines skipped before any value was looked at."""

    columns: dict[str, pa.Array]
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def _magic(ref: FileRef) -> bytes:
    try:
        with ref.fs.open_input_file(ref.path) as f:
            return bytes(f.read(4))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(ref.uri, f"cannot read ({one_line(str(exc), 160)})") from None


def read_file(
    ref: FileRef, required: list[str], optional: list[str], fmt: str = "auto", batch_rows: int = BATCH_ROWS
) -> Iterator[Batch]:
    """Batches of the needed columns of one file (the loaders' file checks: docs/data.md). Parquet is read
    by row-group batches straight from the file system; a CSV file as a whole (a remote one is copied to a
    temporary file first). An empty file, a CSV with only a header, binary content, a fake Parquet, a missing
    required column: DataError. A row-less Parquet file (valid, e.g. an empty part file) yields nothing."""
    magic = _magic(ref)
    if magic == _PARQUET_MAGIC and fmt != "csv":
        yield from _read_parquet(ref, required, optional, batch_rows)
        return
    if fmt == "parquet":
        raise DataError(ref.uri, "not a Parquet file (no PAR1 magic bytes)")
    if magic == _PARQUET_MAGIC:
        raise DataError(ref.uri, "a Parquet file, but the source's format is csv")
    local, tmp = _local_copy(ref)
    try:
        raw = _read(local, required, optional)
    except DataError as exc:
        raise DataError(ref.uri, exc.problem) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if raw.rows == 0:
        raise DataError(ref.uri, "no data rows: the file holds only a header")
    yield Batch(raw.columns, Counter(raw.skipped))


def _local_copy(ref: FileRef) -> tuple[Path, str | None]:
    if isinstance(ref.fs, pafs.LocalFileSystem):
        return Path(ref.path), None
    tmp = tempfile.mkdtemp(prefix="recupdate-ingest-")
    local = Path(tmp) / Path(ref.path).name
    try:
        with ref.fs.open_input_stream(ref.path) as src, local.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (pa.ArrowException, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(ref.uri, f"cannot read ({one_line(str(exc), 160)})") from None
    return local, tmp


def _read_parquet(ref: FileRef, required: list[str], optional: list[str], batch_rows: int) -> Iterator[Batch]:
    try:
        f = pq.ParquetFile(ref.fs.open_input_file(ref.path))
        names = list(f.schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(ref.uri, f"not a readable Parquet file ({one_line(str(exc), 160)})") from None
    try:
        present = _pick(Path(ref.uri), names, required, optional)
    except DataError as exc:
        raise DataError(ref.uri, exc.problem) from None
    try:
        for batch in f.iter_batches(batch_size=batch_rows, columns=present):
            yield Batch({c: batch.column(c) for c in present})
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(ref.uri, f"cannot read the Parquet data ({one_line(str(exc), 160)})") from None


# -- the user's PostgreSQL -------------------------------------------------------------------------------------


def source_dsn() -> str:
    dsn = os.environ.get(SOURCE_DSN_ENV, "")
    if not dsn:
        raise DataError("sql", f"{SOURCE_DSN_ENV} is not set (spec.data.sql.dsnSecretRef puts it in the job's pods)")
    return dsn


def read_query(
    dsn: str, q: SqlQuery, after: tuple[str, str] | None, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[Batch, tuple[str, str] | None]]:
    """Batches of `SELECT * FROM (query) q [WHERE q.wm > after ORDER BY q.wm]` from the user's PostgreSQL, in
    one read-only REPEATABLE READ transaction, each with the watermark after it as (text, type name).

    `after`: the last watermark ingested, (text, PostgreSQL type name) as an earlier call returned it."""
    import psycopg
    from psycopg import sql

    where: sql.Composable = sql.SQL("")
    params: list[Any] = []
    if q.watermark:
        wm = sql.Identifier(q.watermark)
        if after is not None:
            where = sql.SQL(" WHERE q.{} > %s::{}").format(wm, sql.SQL(_type_name(after[1])))
            params.append(after[0])
        where = where + sql.SQL(" ORDER BY q.{}").format(wm)
    # The user's query is text, not a template: its own '%' (LIKE 'a%', modulo) must not read as a placeholder.
    user_query = sql.SQL(q.query.strip().rstrip(";").replace("%", "%%"))  # type: ignore[arg-type]
    text = sql.SQL("SELECT * FROM ({}) AS q").format(user_query) + where
    where_name = "sql"
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction(), conn.cursor(name="recupdate_source") as cur:
                cur.itersize = min(batch_rows, 100_000)
                cur.execute(text, params)
                names = [d.name for d in cur.description or []]
                if q.watermark and q.watermark not in names:
                    raise DataError(where_name, f"the query has no column {q.watermark!r} (the watermark)")
                wm_i = names.index(q.watermark) if q.watermark else -1
                wm_type = _type_of(conn, cur.description[wm_i].type_code) if wm_i >= 0 else ""  # type: ignore[index]
                mark = after
                while rows := cur.fetchmany(batch_rows):
                    cols = list(zip(*rows, strict=True))
                    arrays = {n: _column(cols[i]) for i, n in enumerate(names)}
                    if wm_i >= 0 and rows[-1][wm_i] is not None:
                        mark = (str(rows[-1][wm_i]), wm_type)
                    yield Batch(arrays), mark
    except DataError:
        raise
    except psycopg.Error as exc:
        raise DataError(where_name, f"the query failed: {one_line(str(exc), 300)}") from None


def _type_of(conn: Any, oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info is not None else "text"


def _type_name(name: str) -> str:
    # Only a plain type name is spliced into SQL.
    ok = name.replace("_", "").replace(" ", "").isalnum()
    return name if ok else "text"


def _column(values: tuple[Any, ...]) -> pa.Array:
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):  # mixed types: their text
        return pa.array([None if v is None else str(v) for v in values], pa.large_string())


# -- what a URI is ---------------------------------------------------------------------------------------------


def kind_of(uri: str) -> str:
    """'synthetic', 'movielens', 'postgres', 'sql' or 'files'."""
    if uri == "synthetic" or uri.startswith("synthetic:"):
        return "synthetic"
    if uri.startswith("movielens:"):
        return "movielens"
    if uri in ("postgres", "sql"):
        return uri
    if uri.startswith("table:"):
        raise DataError(
            uri, "table: URIs are for replay; name the files in data.interactions, data.items, data.clusters"
        )
    return "files"


def redact_uri(uri: str) -> str:
    """A URI without any user:password part, for records and messages."""
    p = urlparse(uri)
    if p.password or p.username:
        return p._replace(netloc=p.hostname or "").geturl()
    return uri
