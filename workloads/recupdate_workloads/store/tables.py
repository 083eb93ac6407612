"""Versioned transition tables: (c1, c2) -> ranked clusters with scores and their source.

Serving is a lookup in the table of the active release (the paper's bulk-inference design). A version is
written to its own table, indexed, and only then marked published, so no reader sees a partial table.
"""

from __future__ import annotations

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


def load_table(store: Store, version: int) -> TransitionTable:
    """A published table version, whole, for in-memory serving."""
    with store.tx() as c:
        st = c.execute("SELECT state FROM transition_tables WHERE table_version = %s", (version,)).fetchone()
        if st is None or st[0] != "published":
            raise LookupError(f"transition table version {version} is not published")
        rows = c.execute(
            sql.SQL("SELECT c1, c2, rank, cluster, score, source FROM {} ORDER BY c1, c2, rank").format(
                store.ident(f"transitions_v{version}")
            )
        ).fetchall()
    if not rows:
        z = np.zeros(0, np.int32)
        return TransitionTable(version, z, z, np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), z)
    arr = np.asarray([r[:5] for r in rows], dtype=np.float64)
    key = arr[:, 0].astype(np.int64) << 32 | arr[:, 1].astype(np.int64)
    uniq, start = np.unique(key, return_index=True)
    top = int(arr[:, 2].max())
    ids = np.full((len(uniq), top), -1, np.int32)
    scores = np.zeros((len(uniq), top), np.float32)
    pos = np.searchsorted(uniq, key)
    ids[pos, arr[:, 2].astype(int) - 1] = arr[:, 3]
    scores[pos, arr[:, 2].astype(int) - 1] = arr[:, 4]
    source = np.array([SOURCES.index(rows[i][5]) for i in start], dtype=np.int8)
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
