"""Versioned transition tables: (c1, c2) -> ranked clusters with scores and their source.

Serving is a lookup in the table of the active release (the paper's bulk-inference design). A version is
written to its own table, indexed, and only then marked published, so no reader sees a partial table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from psycopg import sql

from recupdate_workloads.store.db import Store

SOURCES = ("model", "evidence")


@dataclass
class TransitionTable:
    """Rows grouped by pair: ids/scores are [n_pairs, top_n]; source is 0 = model, 1 = evidence fallback."""

    version: int
    c1: np.ndarray
    c2: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    source: np.ndarray

    def as_dict(self) -> dict[tuple[int, int], list[tuple[int, float, str]]]:
        out = {}
        for i in range(len(self.c1)):
            keep = self.ids[i] >= 0
            out[(int(self.c1[i]), int(self.c2[i]))] = [
                (int(c), float(s), SOURCES[int(self.source[i])])
                for c, s in zip(self.ids[i][keep], self.scores[i][keep], strict=True)
            ]
        return out


def publish_table(
    store: Store,
    c1: np.ndarray,
    c2: np.ndarray,
    ids: np.ndarray,
    scores: np.ndarray,
    source: np.ndarray,
    snapshot_id: int | None,
    adapter_uri: str | None,
) -> int:
    """Write a new table version and publish it. ids < 0 pad rows with fewer than top_n clusters."""
    with store.tx() as c:
        row = c.execute(
            "INSERT INTO transition_tables (snapshot_id, adapter_uri, pairs, state) VALUES (%s, %s, %s, 'building')"
            " RETURNING table_version",
            (snapshot_id, adapter_uri, len(c1)),
        ).fetchone()
    assert row is not None
    version = int(row[0])
    tbl = store.ident(f"transitions_v{version}")
    r_idx, k_idx = np.nonzero(ids >= 0)
    with store.tx() as c:
        c.execute(
            sql.SQL(
                "CREATE TABLE {} (c1 int NOT NULL, c2 int NOT NULL, rank smallint NOT NULL, cluster int NOT NULL,"
                " score real NOT NULL, source text NOT NULL)"
            ).format(tbl)
        )
        with c.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(tbl)) as cp:
            cp.set_types(["int4", "int4", "int2", "int4", "float4", "text"])
            for i, k in zip(r_idx.tolist(), k_idx.tolist(), strict=True):
                cp.write_row((int(c1[i]), int(c2[i]), k + 1, int(ids[i, k]), float(scores[i, k]), SOURCES[source[i]]))
        c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2, rank)").format(tbl))
        c.execute("UPDATE transition_tables SET state = 'published' WHERE table_version = %s", (version,))
    return version


#: One row as load_table asks PostgreSQL to pack it (int4send/float4send: big-endian).
_REC = np.dtype([("c1", ">i4"), ("c2", ">i4"), ("rank", ">i4"), ("cluster", ">i4"), ("score", ">f4"), ("src", ">i4")])


#: Rows per packed chunk of a rate-bounded load (load_table's ``duty``).
LOAD_CHUNK_ROWS = 20_000


def load_table(
    store: Store, version: int, *, duty: float = 1.0, sleep: Callable[[float], None] = time.sleep
) -> TransitionTable:
    """A published table version, whole, for in-memory serving.

    PostgreSQL packs the rows into one bytea of fixed records that numpy reads in place: fetching rows as
    Python tuples held the GIL for about half a second per 300k rows, which stalled a serving replica's
    requests while it loaded a new release.

    ``duty`` < 1 bounds the load's rate (a replica's background swap, docs/serving.md): the rows come in
    chunks of about LOAD_CHUNK_ROWS by ranges of c1, and after each chunk the loader sleeps so that it (and
    the PostgreSQL backend packing for it) works at most ``duty`` of the time. The result is the same."""
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], got {duty}")
    name = store.ident(f"transitions_v{version}")
    pack = sql.SQL(
        "SELECT string_agg(int4send(c1) || int4send(c2) || int4send(rank::int) || int4send(cluster)"
        " || float4send(score) || int4send(array_position(%s::text[], source) - 1), ''::bytea"
        " ORDER BY c1, c2, rank) FROM {}"
    ).format(name)
    parts: list[bytes] = []
    with store.tx() as c:
        st = c.execute("SELECT state FROM transition_tables WHERE table_version = %s", (version,)).fetchone()
        if st is None or st[0] != "published":
            raise LookupError(f"transition table version {version} is not published")
        # c1 values that cut the table into chunks of about LOAD_CHUNK_ROWS rows (none: one chunk, the whole table)
        cuts: list[int] = []
        if duty < 1:
            cuts = [
                int(r[0])
                for r in c.execute(
                    sql.SQL(
                        "SELECT c1 FROM (SELECT c1, row_number() OVER (ORDER BY c1) AS i FROM {}) t"
                        " WHERE i %% %s = 1 AND i > 1 GROUP BY c1 ORDER BY c1"
                    ).format(name),
                    (LOAD_CHUNK_ROWS,),
                ).fetchall()
            ]
        for lo, hi in zip([None, *cuts], [*cuts, None], strict=True):
            t0 = time.perf_counter()
            conds = [sql.SQL(f"c1 {op} %s") for op, v in ((">=", lo), ("<", hi)) if v is not None]
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
            args = [list(SOURCES), *(v for v in (lo, hi) if v is not None)]
            row = c.execute(sql.Composed([pack, where]), args, binary=True).fetchone()
            parts.append(row[0] if row and row[0] is not None else b"")
            if duty < 1:
                sleep((time.perf_counter() - t0) * (1 / duty - 1))
    arr = np.frombuffer(b"".join(parts), dtype=_REC)
    if not len(arr):
        z = np.zeros(0, np.int32)
        return TransitionTable(
            version, z, z, np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), np.zeros(0, np.int8)
        )
    key = arr["c1"].astype(np.int64) << 32 | arr["c2"].astype(np.int64)
    uniq, start = np.unique(key, return_index=True)
    top = int(arr["rank"].max())
    ids = np.full((len(uniq), top), -1, np.int32)
    scores = np.zeros((len(uniq), top), np.float32)
    pos = np.searchsorted(uniq, key)
    col = arr["rank"].astype(np.int64) - 1
    ids[pos, col] = arr["cluster"]
    scores[pos, col] = arr["score"]
    source = arr["src"][start].astype(np.int8)
    return TransitionTable(
        version, (uniq >> 32).astype(np.int32), (uniq & 0xFFFFFFFF).astype(np.int32), ids, scores, source
    )


def prune_tables(store: Store, keep: int) -> list[int]:
    """Drop published tables beyond the `keep` newest, except those a live release points at."""
    with store.tx() as c:
        rows = c.execute(
            "SELECT table_version FROM transition_tables WHERE state = 'published' AND table_version NOT IN"
            " (SELECT table_version FROM releases WHERE state IN ('active', 'candidate')"
            "  AND table_version IS NOT NULL) ORDER BY table_version DESC OFFSET %s",
            (keep,),
        ).fetchall()
        out = [int(r[0]) for r in rows]
        for v in out:
            c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(store.ident(f"transitions_v{v}")))
            c.execute("UPDATE transition_tables SET state = 'dropped' WHERE table_version = %s", (v,))
    return out
