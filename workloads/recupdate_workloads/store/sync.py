"""The sync step: bring what is new in a policy's data sources into its store, exactly once (docs/data.md).

It runs at the start of every fine-tune and refresh (jobs/run.py), before anything is counted, and as
`recupdate ingest`. One sync is ONE transaction on the store:

1. an advisory lock per schema: overlapping syncs (a fine-tune and a refresh at once, a retried job next to
   a hung one) run one after the other, and the second finds nothing new;
2. the catalogue: the clusters source, the items source (files re-read only when their size or mtime changed;
   queries read whole, or after their watermark), then the inbox tables inbox_clusters, inbox_items;
3. the interactions: new files of a file source (each file recorded in ingest_files in the same transaction),
   rows after the watermark of a query (ingest_watermarks, same transaction), the synthetic stream up to the
   run's time, then the inbox table inbox_interactions (its rows are moved out: DELETE ... RETURNING).

A source that cannot be read raises (DataError, or the driver's error): the transaction rolls back and the store
is as it was, ingest records included, so a retry ingests the same rows once. A process killed mid-sync leaves
nothing either: PostgreSQL aborts the open transaction. Bad rows are counted per reason and skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from recupdate_workloads.data import sources as src
from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.sources import Batch, DataConfig, FileRef
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.ingest import CatalogueResult, IngestResult, write_catalogue, write_interactions

log = logging.getLogger("recupdate.sync")
#: Advisory lock key (first half; the second is the schema's hash): one sync per schema at a time.
SYNC_LOCK = 0x73796E63
#: Rows moved out of an inbox table per statement.
INBOX_BATCH = 100_000
DAY = 86_400

Progress = Callable[[int], None]


@dataclass
class SourceReport:
    """What one source gave this sync."""

    source: str
    kind: str
    files: int = 0
    result: IngestResult = field(default_factory=IngestResult)
    catalogue: CatalogueResult | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "kind": self.kind}
        if self.files:
            d["files"] = self.files
        if self.kind == "interactions":
            d |= self.result.as_dict()
        elif self.catalogue is not None:
            d |= self.catalogue.as_dict()
        return d


@dataclass
class SyncReport:
    """A whole sync: the interactions (new, duplicate, skipped per reason), the catalogue, files ingested,
    files that changed after they were ingested (not read again), and its wall seconds."""

    interactions: IngestResult = field(default_factory=IngestResult)
    catalogue: CatalogueResult = field(default_factory=CatalogueResult)
    files: int = 0
    changed_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sources: list[SourceReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The run's record of it (runs.cost.sync, the policy status' lastSync)."""
        i, c = self.interactions, self.catalogue
        return {
            "rows": i.rows,
            "new": i.new,
            "duplicate": i.duplicate,
            "skipped": dict(sorted(i.skipped.items())),
            "clusters": c.clusters,
            "items": c.items,
            "clustersNew": c.clusters_new,
            "clustersChanged": c.clusters_changed,
            "itemsNew": c.items_new,
            "itemsMoved": c.items_moved,
            "catalogueSkipped": dict(sorted(c.skipped.items())),
            "files": self.files,
            "changedFiles": self.changed_files[:20],
            "seconds": round(self.seconds, 3),
            "sources": [s.as_dict() for s in self.sources],
        }

    def summary(self) -> str:
        i, c = self.interactions, self.catalogue
        bad = ", ".join(f"{k}={v}" for k, v in sorted(i.skipped.items())) or "none"
        text = (
            f"{i.new:,} new interactions, {i.duplicate:,} duplicate, skipped: {bad}; catalogue: {c.clusters:,} "
            f"clusters ({c.clusters_new} new, {c.clusters_changed} changed), {c.items:,} items ({c.items_new:,} new, "
            f"{c.items_moved:,} moved); {self.files} file(s) in {self.seconds:.1f} s"
        )
        if c.skipped:
            text += "; catalogue rows skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(c.skipped.items()))
        if self.changed_files:
            text += f"; {len(self.changed_files)} file(s) changed after they were ingested and were not read again"
        return text


def sync(
    store: Store,
    cfg: DataConfig,
    *,
    run_id: str | None = None,
    until: int | None = None,
    live_synthetic: bool = True,
    embed: bool = True,
    progress: Progress | None = None,
    batch_rows: int = src.BATCH_ROWS,
) -> SyncReport:
    """Sync every source of `cfg` into `store` in one transaction (see the module docstring).

    until: the run's time (unix seconds), up to which the synthetic stream is replayed; live_synthetic=False
    loads the synthetic stream at its own timestamps, whole (`recupdate ingest synthetic`)."""
    t0 = time.perf_counter()
    report = SyncReport()
    s = _Sync(store, cfg, report, run_id, embed, progress, batch_rows)
    with store.tx() as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SYNC_LOCK, store.schema))
        s.catalogue(until, live_synthetic)
        s.interactions(until, live_synthetic)
        row = conn.execute("SELECT (SELECT count(*) FROM clusters), (SELECT count(*) FROM items)").fetchone()
        assert row is not None
        report.catalogue.clusters, report.catalogue.items = int(row[0]), int(row[1])
    report.seconds = time.perf_counter() - t0
    return report


class _Sync:
    def __init__(
        self,
        store: Store,
        cfg: DataConfig,
        report: SyncReport,
        run_id: str | None,
        embed: bool,
        progress: Progress | None,
        batch_rows: int,
    ) -> None:
        self.store, self.cfg, self.report, self.run_id = store, cfg, report, run_id
        self.embed, self.progress, self.batch_rows = embed, progress, batch_rows

    @property
    def conn(self) -> psycopg.Connection:
        return self.store.conn

    def _tick(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress(n)

    # -- the catalogue ---------------------------------------------------------------------------------------

    def _write_catalogue(self, rep: SourceReport, items: Any = None, clusters: Any = None, where: str = "") -> None:
        r = write_catalogue(self.store, items=items, clusters=clusters, embed=self.embed, source=where or rep.source)
        rep.catalogue = r if rep.catalogue is None else rep.catalogue.add(r)
        self.report.catalogue.add(r)

    def catalogue(self, until: int | None, live: bool) -> None:
        cfg = self.cfg
        kind = src.kind_of(cfg.interactions)
        if kind == "synthetic" and not cfg.items and not cfg.clusters:
            from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream

            stream = SyntheticStream(SyntheticSpec(n_interactions=cfg.synthetic_interactions, seed=cfg.synthetic_seed))
            names = [c.name for c in stream.catalogue.clusters]
            rep = self._source("synthetic", "clusters")
            self._write_catalogue(
                rep,
                items={
                    "item": [str(i) for i in range(len(stream.item_cluster))],
                    "cluster": [names[c] for c in stream.item_cluster.tolist()],
                },
                clusters={
                    "cluster": names,
                    "name": names,
                    "keywords": [list(c.keywords) for c in stream.catalogue.clusters],
                },
            )
        if kind == "movielens" and not cfg.items and not cfg.clusters:
            root = Path(cfg.interactions.partition(":")[2])
            self._movielens_catalogue(root)
        for which in ("clusters", "items"):
            uri = getattr(cfg, which)
            if not uri or uri == "postgres":
                continue
            k = src.kind_of(uri)
            if k == "files":
                self._catalogue_files(uri, which)
            elif k == "sql":
                self._catalogue_query(which)
            else:
                raise DataError(uri, f"data.{which} may be a file or directory URI, 'sql' or 'postgres'")
        self._inbox_catalogue()

    def _source(self, name: str, kind: str) -> SourceReport:
        rep = SourceReport(src.redact_uri(name), kind)
        self.report.sources.append(rep)
        return rep

    def _movielens_catalogue(self, root: Path) -> None:
        from recupdate_workloads.data.loaders import movielens_catalogue

        movies = root / "movies.csv"
        rep = self._source(f"movielens:{root}", "items")
        ref = src.list_files(str(movies), self.cfg)[0]
        if self._unchanged(ref):
            return
        items, clusters, skipped = movielens_catalogue(root)
        self._write_catalogue(rep, items=items, clusters=clusters, where=str(movies))
        self.report.catalogue.skipped.update(skipped)
        self._record(ref, "items", rep.source)
        rep.files += 1

    def _catalogue_files(self, uri: str, which: str) -> None:
        rep = self._source(uri, which)
        mapping = self.cfg.mapping(which)
        required = [mapping["item"], mapping["cluster"]] if which == "items" else [mapping["cluster"]]
        optional = [] if which == "items" else [mapping["name"], mapping["keywords"]]
        for ref in src.list_files(uri, self.cfg):
            if self._unchanged(ref):
                continue
            for batch in src.read_file(ref, required, optional, self.cfg.format, self.batch_rows):
                cols = _renamed(batch, mapping)
                self._write_catalogue(rep, **{which: cols}, where=ref.uri)
            self._record(ref, which, rep.source)
            rep.files += 1
            self.report.files += 1

    def _catalogue_query(self, which: str) -> None:
        rep = self._source(f"sql:{which}", which)
        mapping = self.cfg.mapping(which)
        self._query(which, lambda b: self._write_catalogue(rep, **{which: _renamed(b, mapping)}, where=rep.source))

    def _query(self, kind: str, write: Callable[[Batch], object]) -> None:
        """Read the `kind` query after its watermark; the new watermark is written in the sync's transaction."""
        q = self.cfg.sql.get(kind)
        if q is None:
            raise DataError("sql", f"data.{kind} is 'sql' but data.sql.{kind} gives no query")
        after = self._watermark("sql", kind)
        mark = after
        for batch, batch_mark in src.read_query(src.source_dsn(), q, after, self.batch_rows):
            write(batch)
            mark = batch_mark
        if q.watermark and mark is not None and mark != after:
            self._set_watermark("sql", kind, json.dumps(list(mark)))

    def _inbox_catalogue(self) -> None:
        clusters = self.conn.execute(
            "DELETE FROM inbox_clusters RETURNING external_cluster, name, keywords, received_at"
        ).fetchall()
        items = self.conn.execute(
            "DELETE FROM inbox_items RETURNING external_item, external_cluster, received_at"
        ).fetchall()
        if not clusters and not items:
            return
        rep = self._source("postgres", "catalogue")
        clusters.sort(key=lambda r: r[3])  # the newest row of a cluster or item wins
        items.sort(key=lambda r: r[2])
        self._write_catalogue(
            rep,
            items={"item": [r[0] for r in items], "cluster": [r[1] for r in items]} if items else None,
            clusters={
                "cluster": [r[0] for r in clusters],
                "name": [r[1] for r in clusters],
                "keywords": [r[2] for r in clusters],
            }
            if clusters
            else None,
            where="inbox tables",
        )

    # -- interactions ----------------------------------------------------------------------------------------

    def interactions(self, until: int | None, live: bool) -> None:
        cfg = self.cfg
        kind = src.kind_of(cfg.interactions)
        if kind == "files":
            self._interaction_files(cfg.interactions, cfg.mapping("interactions"), cfg.format)
        elif kind == "movielens":
            ratings = Path(cfg.interactions.partition(":")[2]) / "ratings.csv"
            mapping = {"user": "userId", "item": "movieId", "ts": "timestamp", "weight": "rating"}
            self._interaction_files(str(ratings), mapping, "csv", name=cfg.interactions)
        elif kind == "sql":
            self._interaction_query()
        elif kind == "synthetic":
            self._synthetic(until, live)
        self._inbox_interactions()

    def _write(self, rep: SourceReport, batch: Batch, mapping: dict[str, str], where: str) -> IngestResult:
        r = write_interactions(self.store, batch.columns, columns=mapping, source=where, skipped=batch.skipped)
        rep.result.add(r)
        self.report.interactions.add(r)
        self._tick(r.rows)
        return r

    def _interaction_files(self, uri: str, mapping: dict[str, str], fmt: str, name: str | None = None) -> None:
        rep = self._source(name or uri, "interactions")
        required = [mapping["user"], mapping["item"], mapping["ts"]]
        optional = [mapping["weight"]] + ([mapping["event_id"]] if mapping.get("event_id") else [])
        files = src.list_files(uri, self.cfg)
        done = self._recorded([f.uri for f in files])
        for ref in files:
            seen = done.get(ref.uri)
            if seen is not None:
                if (seen[0], seen[1]) != (ref.size, ref.mtime) and seen[2] == "interactions":
                    self.report.changed_files.append(ref.uri)
                continue
            # Claimed first: the record and the rows commit together, or neither does.
            claimed = self.conn.execute(
                "INSERT INTO ingest_files (uri, source, kind, size, mtime, run_id) VALUES (%s, %s, 'interactions', %s, %s, %s)"
                " ON CONFLICT (uri) DO NOTHING RETURNING uri",
                (ref.uri, rep.source, ref.size, ref.mtime, self.run_id),
            ).fetchone()
            if claimed is None:
                continue
            total = IngestResult()
            for batch in src.read_file(ref, required, optional, fmt, self.batch_rows):
                total.add(self._write(rep, batch, mapping, ref.uri))
            self.conn.execute(
                "UPDATE ingest_files SET rows = %s, new = %s, duplicate = %s, skipped = %s WHERE uri = %s",
                (total.rows, total.new, total.duplicate, Jsonb(dict(total.skipped)), ref.uri),
            )
            rep.files += 1
            self.report.files += 1
        if self.report.changed_files:
            log.warning(
                "%d file(s) changed after they were ingested and are not read again (datasets are append-only: "
                "write new files): %s",
                len(self.report.changed_files),
                ", ".join(self.report.changed_files[:5]),
            )

    def _interaction_query(self) -> None:
        rep = self._source("sql:interactions", "interactions")
        mapping = self.cfg.mapping("interactions")
        self._query("interactions", lambda b: self._write(rep, b, mapping, rep.source))

    def _synthetic(self, until: int | None, live: bool) -> None:
        """The synthetic stream, replayed: a live sync shifts it so that its first half lies before the first
        sync's `until`, then adds what falls before each later sync's `until` (the stream grows with time, for
        about days/2 of it); otherwise the whole stream at its own times, once."""
        from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream

        spec = SyntheticSpec(n_interactions=self.cfg.synthetic_interactions, seed=self.cfg.synthetic_seed)
        rep = self._source("synthetic", "interactions")
        state = self._watermark("synthetic", "interactions")
        if state is None:
            offset = 0
            if live and until is not None:
                offset = (until - (spec.start + spec.days // 2 * DAY)) // DAY * DAY
            done = -(2**62)
        else:
            offset, done = json.loads(state[0])
        end = until if live and until is not None else spec.end + offset
        if end <= done:
            return
        log_ = SyntheticStream(spec).generate()
        ts = log_.ts + offset
        keep = (ts >= done) & (ts < end)
        if keep.any():
            cols = {
                "user": log_.user[keep],
                "item": log_.item[keep].astype(str),
                "ts": ts[keep],
                "weight": log_.weight[keep].astype(np.float64),
            }
            self._write(rep, Batch({k: _arrow(v) for k, v in cols.items()}), {}, "synthetic")
        self._set_watermark("synthetic", "interactions", json.dumps([int(offset), int(end)]))

    def _inbox_interactions(self) -> None:
        rep: SourceReport | None = None
        while True:
            rows = self.conn.execute(
                "DELETE FROM inbox_interactions WHERE ctid IN (SELECT ctid FROM inbox_interactions LIMIT %s)"
                " RETURNING external_user, external_item, extract(epoch FROM ts)::float8, weight, event_id",
                (INBOX_BATCH,),
            ).fetchall()
            if not rows:
                break
            if rep is None:
                rep = self._source("postgres", "interactions")
            cols = list(zip(*rows, strict=True))
            batch = Batch({n: src._column(cols[i]) for i, n in enumerate(("user", "item", "ts", "weight", "event_id"))})
            self._write(rep, batch, {}, "inbox_interactions")
            if len(rows) < INBOX_BATCH:
                break

    # -- records ---------------------------------------------------------------------------------------------

    def _recorded(self, uris: list[str]) -> dict[str, tuple[int | None, str | None, str]]:
        if not uris:
            return {}
        rows = self.conn.execute(
            "SELECT uri, size, mtime, kind FROM ingest_files WHERE uri = ANY(%s)", (uris,)
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def _unchanged(self, ref: FileRef) -> bool:
        """A catalogue file is read again when its size or mtime changed (catalogues are rewritten in place)."""
        row = self._recorded([ref.uri]).get(ref.uri)
        return row is not None and (row[0], row[1]) == (ref.size, ref.mtime)

    def _record(self, ref: FileRef, kind: str, source: str) -> None:
        """Record a catalogue file as read at its current size and mtime."""
        self.conn.execute(
            "INSERT INTO ingest_files (uri, source, kind, size, mtime, run_id) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (uri) DO UPDATE SET size = excluded.size, mtime = excluded.mtime, run_id = excluded.run_id,"
            " ingested_at = now()",
            (ref.uri, source, kind, ref.size, ref.mtime, self.run_id),
        )

    def _watermark(self, source: str, kind: str) -> tuple[str, str] | None:
        row = self.conn.execute(
            "SELECT watermark FROM ingest_watermarks WHERE source = %s AND kind = %s", (source, kind)
        ).fetchone()
        if row is None:
            return None
        if source == "synthetic":
            return (row[0], "")
        text, type_ = json.loads(row[0])
        return (str(text), str(type_))

    def _set_watermark(self, source: str, kind: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO ingest_watermarks (source, kind, watermark, run_id) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (source, kind) DO UPDATE SET watermark = excluded.watermark, run_id = excluded.run_id,"
            " updated_at = now()",
            (source, kind, value, self.run_id),
        )


def _renamed(batch: Batch, mapping: dict[str, str]) -> dict[str, Any]:
    """A batch's columns under their canonical names (catalogue writes take canonical names)."""
    back = {v: k for k, v in mapping.items()}
    return {back.get(n, n): a for n, a in batch.columns.items()}


def _arrow(values: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(values)
