"""The store's one write path for real data (docs/data.md): interactions and the catalogue by external id.

Every source (files, SQL, the `postgres` inbox tables, the HTTP intake, `recupdate ingest`) ends here:

* write_interactions: rows of (user, item, ts, weight[, event_id]) with EXTERNAL user and item ids. Rows are
  validated by data.loaders.check_rows (bad rows counted per reason, skipped); an item the catalogue does not
  hold is `unknown_item`; users get internal ids on first sight (user_ids); a row whose event id the store
  already holds (or that repeats one earlier in the same call) is a duplicate, counted and not inserted.
* write_catalogue: clusters (external id, name, keywords) and items (external id -> cluster external id). New
  clusters are added with the next dense id and embedded; a renamed cluster keeps its id (name, keywords and
  embedding updated); a re-assigned item keeps its id and moves. Nothing is ever deleted.

Transactions: each call runs in store.tx(). Called inside a caller's store.tx() it becomes a savepoint of that
transaction and commits or rolls back with it (the sync step ingests a whole source in one transaction);
otherwise it commits on return. Either way it is atomic: every row of the call or none, id maps included.
Interactions take a ROW EXCLUSIVE lock only (concurrent writers never wait on each other, except on the same new
user or event id); catalogue writers serialise among themselves (dense ids are allocated under a lock) but never
block readers or interaction writers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.loaders import ID_MAX_CHARS, _text, check_rows
from recupdate_workloads.data.types import Cluster, normalize_name
from recupdate_workloads.store.catalogue import COPY_ROW
from recupdate_workloads.store.db import Store

#: Why a catalogue row was skipped (counted like the interactions' reasons, never raised).
CATALOGUE_REASONS = ("bad_encoding", "missing_field", "id_too_long", "bad_cluster", "duplicate_name")

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_COPY_STEP = 46 * 65536


@dataclass
class IngestResult:
    """What one write (or a whole sync) did with interaction rows: rows = new + duplicate + sum(skipped)."""

    new: int = 0
    duplicate: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        return self.new + self.duplicate + sum(self.skipped.values())

    def add(self, other: IngestResult) -> IngestResult:
        self.new += other.new
        self.duplicate += other.duplicate
        self.skipped.update(other.skipped)
        self.skipped = +self.skipped
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"new": self.new, "duplicate": self.duplicate, "skipped": dict(sorted(self.skipped.items()))}


@dataclass
class CatalogueResult:
    """What one catalogue write did; `clusters` and `items` are the totals in the store afterwards."""

    clusters_new: int = 0
    clusters_changed: int = 0
    items_new: int = 0
    items_moved: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    clusters: int = 0
    items: int = 0
    #: internal ids of the clusters added or renamed by this write
    changed_ids: list[int] = field(default_factory=list)

    def add(self, other: CatalogueResult) -> CatalogueResult:
        self.clusters_new += other.clusters_new
        self.clusters_changed += other.clusters_changed
        self.items_new += other.items_new
        self.items_moved += other.items_moved
        self.skipped.update(other.skipped)
        self.skipped = +self.skipped
        self.clusters, self.items = other.clusters, other.items
        self.changed_ids = sorted(set(self.changed_ids) | set(other.changed_ids))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "clustersNew": self.clusters_new,
            "clustersChanged": self.clusters_changed,
            "itemsNew": self.items_new,
            "itemsMoved": self.items_moved,
            "skipped": dict(sorted(self.skipped.items())),
            "clusters": self.clusters,
            "items": self.items,
        }


# -- input -----------------------------------------------------------------------------------------------------


def _as_arrays(rows: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> dict[str, pa.Array]:
    """Columns as Arrow arrays. A mapping's values may be Arrow arrays, numpy arrays or Python sequences; a
    sequence of mixed ints and strings becomes text (external ids are text)."""
    if isinstance(rows, pa.Table | pa.RecordBatch):
        return {n: rows.column(n) for n in rows.column_names}
    out: dict[str, pa.Array] = {}
    for name, values in rows.items():
        if isinstance(values, pa.Array | pa.ChunkedArray):
            out[name] = values
            continue
        try:
            out[name] = pa.array(values, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            out[name] = pa.array([None if v is None else str(v) for v in values], pa.large_string())
    return out


def _encode(text: pa.Array, keep: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes of `text` into the distinct values among the kept rows (-1 elsewhere), and those values."""
    enc = pc.dictionary_encode(text)
    codes = np.asarray(pc.fill_null(enc.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    codes = np.where(keep, codes, -1)
    used = np.unique(codes[codes >= 0])
    remap = np.full(len(enc.dictionary) + 1, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    names = enc.dictionary.take(pa.array(used)).to_pylist() if len(used) else []
    return remap[codes], names  # code -1 hits the trailing -1


# -- id maps ---------------------------------------------------------------------------------------------------


def _lookup(conn: psycopg.Connection, table: str, key: str, names: Sequence[str]) -> dict[str, int]:
    if not names:
        return {}
    rows = conn.execute(
        f"SELECT t.external, t.{key} FROM unnest(%s::text[]) AS x(external) JOIN {table} t USING (external)",
        (list(names),),
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def user_ids(conn: psycopg.Connection, names: Sequence[str]) -> dict[str, int]:
    """Internal ids of external user ids, creating the missing ones (in the caller's transaction)."""
    found = _lookup(conn, "user_ids", "user_id", names)
    missing = sorted(set(names) - set(found))  # sorted: concurrent writers lock new keys in the same order
    if missing:
        rows = conn.execute(
            "INSERT INTO user_ids (external) SELECT x FROM unnest(%s::text[]) AS x ORDER BY x"
            " ON CONFLICT (external) DO NOTHING RETURNING external, user_id",
            (missing,),
        ).fetchall()
        found.update({r[0]: int(r[1]) for r in rows})
        if len(rows) < len(missing):  # another writer created some in between
            found.update(_lookup(conn, "user_ids", "user_id", [m for m in missing if m not in found]))
    return found


def item_ids(conn: psycopg.Connection, names: Sequence[str]) -> dict[str, int]:
    """Internal ids of the external item ids the catalogue holds (absent: not in the catalogue)."""
    return _lookup(conn, "items", "item_id", names)


# -- interactions ----------------------------------------------------------------------------------------------


def _copy_rows(conn: psycopg.Connection, user: np.ndarray, item: np.ndarray, ts: np.ndarray, w: np.ndarray) -> None:
    rows = np.empty(len(user), dtype=COPY_ROW)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 8, 8, 8, 4
    rows["user"], rows["item"], rows["ts"], rows["weight"] = user, item, ts, w
    view = rows.tobytes()
    with conn.cursor().copy("COPY interactions (user_id, item_id, ts, weight) FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(_COPY_HEADER)
        for i in range(0, len(view), _COPY_STEP):
            cp.write(view[i : i + _COPY_STEP])
        cp.write(b"\xff\xff")


def _insert_with_ids(
    conn: psycopg.Connection, user: np.ndarray, item: np.ndarray, ts: np.ndarray, w: np.ndarray, event: pa.Array
) -> int:
    """Rows with event ids: COPY into a temporary table, then one INSERT ... ON CONFLICT DO NOTHING against the
    unique index on interactions.event_id (a duplicate inside the batch conflicts with its first copy). Returns
    the rows inserted."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS _recupdate_events"
        " (user_id int8, item_id int8, ts int8, weight float4, event_id text) ON COMMIT DELETE ROWS"
    )
    conn.execute("TRUNCATE _recupdate_events")
    table = pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "item_id": pa.array(item, pa.int64()),
            "ts": pa.array(ts, pa.int64()),
            "weight": pa.array(w, pa.float32()),
            "event_id": event.cast(pa.large_string()),
        }
    )
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
    data = sink.getvalue()
    with conn.cursor().copy("COPY _recupdate_events FROM STDIN (FORMAT csv)") as cp:
        step = 1 << 22
        for i in range(0, data.size, step):
            cp.write(memoryview(data)[i : i + step])
    cur = conn.execute(
        "INSERT INTO interactions (user_id, item_id, ts, weight, event_id)"
        " SELECT user_id, item_id, ts, weight, event_id FROM _recupdate_events"
        " ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING"
    )
    return cur.rowcount


def write_interactions(
    store: Store,
    rows: pa.Table | pa.RecordBatch | Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    source: str | Path = "<rows>",
    skipped: Counter[str] | None = None,
) -> IngestResult:
    """Validate and write interactions given by EXTERNAL ids; returns what was new, duplicate and skipped.

    `rows`: a pyarrow Table/RecordBatch or a mapping of column -> values with the columns user, item, ts and
    optionally weight (default 1.0) and event_id (null or empty: no id), or other names given by `columns`
    (canonical name -> column name). user, item, event_id: text or integers. ts: unix seconds (integers or
    floats), Arrow timestamps/dates, or ISO-8601 / numeric text (data.loaders, "Accepted values").
    `source` names the input in a DataError (a column of an unusable type); `skipped`: rows dropped before
    (e.g. malformed CSV lines), added to the result's counts.

    Atomic (see the module docstring): inside a caller's store.tx() it joins that transaction."""
    arrays = _as_arrays(rows)
    checked = check_rows(arrays, source, columns, skipped=skipped)
    result = IngestResult(skipped=Counter(checked.skipped))
    ok = checked.ok
    if not ok.any():
        return result
    with store.tx() as conn:
        item_code, item_names = _encode(checked.item, ok)
        known = item_ids(conn, item_names)
        item_lut = np.array([known.get(n, -1) for n in item_names] + [-1], dtype=np.int64)
        item = item_lut[item_code]
        unknown = ok & (item < 0)
        if unknown.any():
            result.skipped["unknown_item"] += int(unknown.sum())
        ok = ok & ~unknown
        if not ok.any():
            return result
        user_code, user_names = _encode(checked.user, ok)
        users = user_ids(conn, user_names)
        user = np.array([users[n] for n in user_names] + [-1], dtype=np.int64)[user_code]
        ts, w = checked.ts, checked.weight.astype(np.float32)
        with_id = ok & ~_nulls(checked.event_id) if checked.event_id is not None else np.zeros(len(ok), dtype=bool)
        plain = ok & ~with_id
        if plain.any():
            _copy_rows(conn, user[plain], item[plain], ts[plain], w[plain])
            result.new += int(plain.sum())
        if with_id.any():
            assert checked.event_id is not None
            idx = pa.array(np.flatnonzero(with_id))
            inserted = _insert_with_ids(
                conn, user[with_id], item[with_id], ts[with_id], w[with_id], checked.event_id.take(idx)
            )
            result.new += inserted
            result.duplicate += int(with_id.sum()) - inserted
    return result


# -- the catalogue ---------------------------------------------------------------------------------------------


def _keywords(value: Any, name: str) -> tuple[str, ...]:
    """Keywords from a list or from text separated by ';' or ','; none: the name."""
    if value is None:
        return (name,)
    parts = value if isinstance(value, list | tuple) else str(value).replace(";", ",").split(",")
    kws = tuple(str(k).strip() for k in parts if k is not None and str(k).strip())
    return kws or (name,)


def _text_rows(
    arrays: Mapping[str, pa.Array], spec: Sequence[tuple[str, bool]], path: str | Path, skipped: Counter[str]
) -> list[list[Any]]:
    """The columns of `spec` ((name, required) pairs; an absent optional column is all None) over the usable
    rows; the others are counted under the first reason that applies: bad_encoding, missing_field (a required
    value empty or null), id_too_long. A list-typed `keywords` column is taken as it is."""
    n = len(next(iter(arrays.values()))) if arrays else 0
    bad = np.zeros(n, dtype=bool)
    cols: list[list[Any]] = []
    for name, required in spec:
        arr = arrays.get(name)
        if arr is None:
            if required:
                raise DataError(path, f"missing column {name!r}; the rows have: {', '.join(map(repr, arrays))}")
            cols.append([None] * n)
            continue
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            if name != "keywords":
                raise DataError(path, f"column {name!r} has type {arr.type}: expected text or numbers")
            cols.append(arr.to_pylist())
            continue
        text, enc = _text(arr, name, path)
        problems = [("bad_encoding", enc if enc is not None else np.zeros(n, dtype=bool))]
        if required:
            problems.append(("missing_field", _nulls(text)))
        if name != "keywords":
            problems.append(("id_too_long", _bools(pc.greater(pc.utf8_length(text), ID_MAX_CHARS))))
        for reason, mask in problems:
            m = mask & ~bad
            skipped[reason] += int(m.sum())
            bad |= m
        cols.append(text.to_pylist())
    keep = np.flatnonzero(~bad).tolist()
    return [[c[i] for i in keep] for c in cols]


def _bools(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _nulls(arr: pa.Array) -> np.ndarray:
    return _bools(pc.is_null(arr))


_ClusterRow = tuple[int, str, str, tuple[str, ...]]  # (internal id, external id, name, keywords)


def _plan_clusters(
    existing: dict[str, tuple[int, str, tuple[str, ...]]],
    want: dict[str, tuple[str, tuple[str, ...]]],
    skipped: Counter[str],
) -> tuple[list[_ClusterRow], list[_ClusterRow], set[str]]:
    """(new clusters, changed clusters, external ids of refused new clusters). Updates `existing` in place.

    Names are checked on the final state, so that two clusters may swap names in one write: a change or addition
    whose name is empty once normalised (`bad_cluster`) or equal to another final name (`duplicate_name`) is
    refused (a rename keeps the old name), and the check repeats until no two names collide."""
    proposed = {k: v for k, v in want.items() if k not in existing or (existing[k][1], existing[k][2]) != v}
    for key, (name, _) in list(proposed.items()):
        if not normalize_name(name):
            skipped["bad_cluster"] += 1
            del proposed[key]
    while True:
        final = {k: v[1] for k, v in existing.items()} | {k: v[0] for k, v in proposed.items()}
        groups: dict[str, list[str]] = {}
        for key, name in final.items():
            groups.setdefault(normalize_name(name), []).append(key)
        clash = [k for keys in groups.values() if len(keys) > 1 for k in keys if k in proposed]
        if not clash:
            break
        for key in clash:
            skipped["duplicate_name"] += 1
            del proposed[key]
    refused = {k for k in want if k not in existing and k not in proposed}
    next_id = max((v[0] for v in existing.values()), default=-1) + 1
    new: list[_ClusterRow] = []
    changed: list[_ClusterRow] = []
    for key, (name, kws) in proposed.items():
        old = existing.get(key)
        if old is None:
            new.append((next_id, key, name, kws))
            existing[key] = (next_id, name, kws)
            next_id += 1
        else:
            changed.append((old[0], key, name, kws))
            existing[key] = (old[0], name, kws)
    return new, changed, refused


def write_catalogue(
    store: Store,
    items: pa.Table | pa.RecordBatch | Mapping[str, Any] | None = None,
    clusters: pa.Table | pa.RecordBatch | Mapping[str, Any] | None = None,
    *,
    embed: bool = True,
    source: str | Path = "<catalogue>",
) -> CatalogueResult:
    """Add or update clusters and items by external id (nothing is deleted). Returns what changed.

    `clusters`: columns cluster (its external id), optionally name (default: the id) and keywords (a list, or
    text separated by ';' or ','; default: the name). `items`: columns item and cluster (a cluster's external
    id; one not known yet is created, named by its id). A later row for the same id wins. A cluster whose name
    equals another's once case and punctuation are ignored is skipped (`duplicate_name`; a rename keeps the old
    name), and so are its items (`bad_cluster`), as is a name of punctuation only. New and renamed clusters
    are embedded (all-MiniLM-L6-v2) unless embed=False. Atomic, like write_interactions."""
    result = CatalogueResult()
    skipped = result.skipped
    c_spec = (("cluster", True), ("name", False), ("keywords", False))
    c_rows = _text_rows(_as_arrays(clusters), c_spec, source, skipped) if clusters is not None else [[], [], []]
    i_spec = (("item", True), ("cluster", True))
    i_rows = _text_rows(_as_arrays(items), i_spec, source, skipped) if items is not None else [[], []]
    with store.tx() as conn:
        # Dense ids are allocated as max + 1: one catalogue writer at a time (readers are not blocked).
        conn.execute("LOCK TABLE clusters, items IN SHARE ROW EXCLUSIVE MODE")
        existing = {
            r[0]: (int(r[1]), r[2], tuple(r[3] or ()))
            for r in conn.execute("SELECT external, cluster, name, keywords FROM clusters").fetchall()
        }
        want: dict[str, tuple[str, tuple[str, ...]]] = {}
        for key, name, kws in zip(*c_rows, strict=True):
            nm = name or key
            want[key] = (nm, _keywords(kws, nm))
        for _, ckey in zip(*i_rows, strict=True):
            if ckey not in existing and ckey not in want:
                want[ckey] = (ckey, (ckey,))
        new, changed, refused = _plan_clusters(existing, want, skipped)
        touched = new + changed
        vectors = None
        if embed and touched:
            from recupdate_workloads.store.embeddings import embed_texts

            cl = [Cluster(id=i, name=n, keywords=k) for i, _, n, k in touched]
            vectors = embed_texts([f"{c.name}: {c.description}" for c in cl])
        vec = {t[0]: (None if vectors is None else vectors[j]) for j, t in enumerate(touched)}
        if changed:
            # Two passes: names may swap inside one write, and clusters.name is UNIQUE.
            conn.cursor().executemany(
                "UPDATE clusters SET name = %s WHERE cluster = %s",
                [(f"\x01renaming {cid}", cid) for cid, *_ in changed],
            )
            conn.cursor().executemany(
                "UPDATE clusters SET name = %s, keywords = %s, embedding = %s, updated_at = now() WHERE cluster = %s",
                [(n, list(k), vec[cid], cid) for cid, _, n, k in changed],
            )
        if new:
            with conn.cursor().copy(
                "COPY clusters (cluster, name, keywords, embedding, external) FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(["int4", "text", "text[]", "vector", "text"])
                for cid, key, name, kws in new:
                    cp.write_row((cid, name, list(kws), vec[cid], key))
        result.clusters_new, result.clusters_changed = len(new), len(changed)
        result.changed_ids = sorted(t[0] for t in touched)
        # Items: the last row for an item wins.
        assign: dict[str, int] = {}
        for ikey, ckey in zip(*i_rows, strict=True):
            if ckey in refused:
                skipped["bad_cluster"] += 1
                continue
            assign[ikey] = existing[ckey][0]
        if assign:
            keys = list(assign)
            cur = dict(
                conn.execute(
                    "SELECT t.external, t.cluster FROM unnest(%s::text[]) AS x(external) JOIN items t USING (external)",
                    (keys,),
                ).fetchall()
            )
            row = conn.execute("SELECT coalesce(max(item_id), -1) + 1 FROM items").fetchone()
            nid = int(row[0]) if row else 0
            moved = [(c, k) for k, c in assign.items() if k in cur and cur[k] != c]
            fresh = [k for k in keys if k not in cur]
            if moved:
                conn.execute(
                    "UPDATE items t SET cluster = x.cluster, updated_at = now()"
                    " FROM unnest(%s::text[], %s::int4[]) AS x(external, cluster) WHERE t.external = x.external",
                    ([k for _, k in moved], [c for c, _ in moved]),
                )
            if fresh:
                with conn.cursor().copy("COPY items (item_id, cluster, external) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(["int8", "int4", "text"])
                    for j, k in enumerate(fresh):
                        cp.write_row((nid + j, assign[k], k))
            result.items_new, result.items_moved = len(fresh), len(moved)
        counts = conn.execute("SELECT (SELECT count(*) FROM clusters), (SELECT count(*) FROM items)").fetchone()
        assert counts is not None
        result.clusters, result.items = int(counts[0]), int(counts[1])
    result.skipped = +skipped
    return result
