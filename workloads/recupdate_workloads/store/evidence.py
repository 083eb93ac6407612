"""Evidence snapshots: per pair (c1, c2), the top-R successors over a window, built aside and published
atomically; sparse pairs borrow evidence from their nearest pairs by embedding (pgvector HNSW).

Counting happens in numpy (triples are derived per user, which SQL does poorly); only the aggregated
counts cross into PostgreSQL, where ranking, scoring, borrowing and indexing are set-based SQL.
Publication follows docs/architecture.md ("Evidence snapshots"): build the new tables and index outside any transaction, then repoint the
`evidence` and `evidence_pairs` views in one short transaction; old snapshots are dropped past a limit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from psycopg import sql

from recupdate_workloads.data.sequences import successor_counts
from recupdate_workloads.data.types import PairEvidence, Successor, Triples
from recupdate_workloads.store.db import Store

SCORINGS = ("frequency", "trend")


@dataclass(frozen=True)
class EvidenceParams:
    """How a snapshot is scored. Defaults follow the paper: frequency scoring, a few successors."""

    top_r: int = 5
    min_support: int = 5
    scoring: str = "frequency"
    neighbours: int = 5
    ef_search: int = 40

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}")
        if self.top_r < 1 or self.min_support < 1 or self.neighbours < 1:
            raise ValueError("top_r, min_support and neighbours must be >= 1")


@dataclass(frozen=True)
class Counts:
    """Aggregated successor counts of a window: parallel arrays (c1, c2, c_next, count)."""

    c1: np.ndarray
    c2: np.ndarray
    c_next: np.ndarray
    count: np.ndarray
    triples: int

    @classmethod
    def of(cls, t: Triples, n_clusters: int) -> Counts:
        c1, c2, cn, cnt = successor_counts(t, n_clusters)
        return cls(c1, c2, cn, cnt, len(t))

    @classmethod
    def merge(cls, parts: Iterable[Counts], n_clusters: int) -> Counts:
        parts = [p for p in parts if len(p.c1)]
        if not parts:
            z = np.zeros(0, np.int32)
            return cls(z, z, z, np.zeros(0, np.int64), 0)
        key = np.concatenate([(p.c1.astype(np.int64) * n_clusters + p.c2) * n_clusters + p.c_next for p in parts])
        cnt = np.concatenate([p.count for p in parts])
        uniq, inv = np.unique(key, return_inverse=True)
        total = np.bincount(inv, weights=cnt).astype(np.int64)
        pair, cn = np.divmod(uniq, n_clusters)
        c1, c2 = np.divmod(pair, n_clusters)
        return cls(
            c1.astype(np.int32),
            c2.astype(np.int32),
            cn.astype(np.int32),
            total,
            sum(p.triples for p in parts),
        )


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: int
    window_start: int
    window_end: int
    pairs: int
    borrowed_pairs: int
    triples: int


def _copy_counts(store: Store, table: sql.Composable, counts: Counts) -> None:
    with store.conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (c1 int, c2 int, cn int, cnt bigint)").format(table))
        with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(table)) as cp:
            cp.set_types(["int4", "int4", "int4", "int8"])
            for row in zip(
                counts.c1.tolist(), counts.c2.tolist(), counts.c_next.tolist(), counts.count.tolist(), strict=True
            ):
                cp.write_row(row)


# The vector of pair (a, b): the newest cluster b weighs double. Pair vectors are stored and searched at half
# precision: at 102k pairs the HNSW index is 116 against 202 MiB for float32 (it fits in the embedded server's
# shared_buffers) and answers twice as fast at the same recall (benchmarks/README.md, "Neighbour queries").
_PAIR_VEC = "public.l2_normalize(a.embedding + b.embedding + b.embedding)::public.halfvec(384)"

_RANKED = """
CREATE TABLE {ev} AS
WITH c AS (
    SELECT c1, c2, cn, cnt, sum(cnt) OVER (PARTITION BY c1, c2) AS support FROM {now}
), prev AS (
    SELECT c1, c2, cn, cnt::real / sum(cnt) OVER (PARTITION BY c1, c2) AS share FROM {prev}
), scored AS (
    SELECT c.c1, c.c2, c.cn, c.cnt, c.support, c.cnt::real / c.support AS share,
           CASE WHEN %(trend)s THEN c.cnt::real / c.support - coalesce(prev.share, 0)
                ELSE c.cnt::real / c.support END AS score
    FROM c LEFT JOIN prev USING (c1, c2, cn)
    WHERE c.support >= %(min_support)s
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY c1, c2 ORDER BY score DESC, cnt DESC, cn) AS rank FROM scored
)
SELECT c1, c2, support::int AS support, rank::smallint AS rank, cn AS successor, cnt::int AS count,
       share::real AS share, score::real AS score, false AS borrowed, '{{}}'::int[] AS borrowed_from
FROM ranked WHERE rank <= %(top_r)s
"""

_PAIRS = """
CREATE TABLE {pairs} AS
SELECT e.c1, e.c2, e.support, {vec} AS embedding
FROM (SELECT DISTINCT c1, c2, support FROM {ev}) e
JOIN clusters a ON a.cluster = e.c1 JOIN clusters b ON b.cluster = e.c2
"""

# Evidence for query pairs (table {q}: c1, c2, support) borrowed from their k nearest donor pairs:
# successor shares weighted by cosine similarity, never suggesting the query's own clusters.
_BORROW = """
WITH q AS (
    SELECT q.c1, q.c2, q.support, {vec} AS emb
    FROM {q} q JOIN clusters a ON a.cluster = q.c1 JOIN clusters b ON b.cluster = q.c2
), nb AS (
    SELECT q.c1, q.c2, q.support, n.c1 AS d1, n.c2 AS d2, greatest(1 - (n.embedding <=> q.emb), 0) AS sim
    FROM q CROSS JOIN LATERAL (
        SELECT p.c1, p.c2, p.embedding FROM {pairs} p
        WHERE (p.c1, p.c2) <> (q.c1, q.c2)
        ORDER BY p.embedding <=> q.emb LIMIT %(k)s
    ) n
), donors AS (
    SELECT nb.c1, nb.c2, array_agg(u.v ORDER BY nb.sim DESC, nb.d1, nb.d2, u.pos) AS donors
    FROM nb CROSS JOIN LATERAL unnest(ARRAY[nb.d1, nb.d2]) WITH ORDINALITY AS u(v, pos)
    GROUP BY nb.c1, nb.c2
), agg AS (
    SELECT nb.c1, nb.c2, max(nb.support) AS support, e.successor, sum(nb.sim * e.share) AS w
    FROM nb JOIN {ev} e ON e.c1 = nb.d1 AND e.c2 = nb.d2 AND NOT e.borrowed
    WHERE e.successor <> nb.c1 AND e.successor <> nb.c2
    GROUP BY nb.c1, nb.c2, e.successor
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY c1, c2 ORDER BY w DESC, successor) AS rank,
           sum(w) OVER (PARTITION BY c1, c2) AS total
    FROM agg
)
SELECT r.c1, r.c2, r.support::int, r.rank::smallint, r.successor, 0,
       (r.w / nullif(r.total, 0))::real, r.w::real, true, d.donors
FROM ranked r JOIN donors d USING (c1, c2) WHERE r.rank <= %(top_r)s
"""


def build_snapshot(
    store: Store,
    now: Counts,
    window: tuple[int, int],
    params: EvidenceParams,
    prev: Counts | None = None,
    keep: int = 3,
) -> Snapshot:
    """Build evidence for a window aside, then publish it atomically and prune old snapshots."""
    with store.tx() as c:
        row = c.execute(
            "INSERT INTO snapshots (window_start, window_end, scoring, top_r, min_support, triples, state)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'building') RETURNING snapshot_id",
            (window[0], window[1], params.scoring, params.top_r, params.min_support, now.triples),
        ).fetchone()
    assert row is not None
    sid = int(row[0])
    ev, pairs = store.ident(f"evidence_s{sid}"), store.ident(f"evidence_pairs_s{sid}")
    cnow, cprev = store.ident(f"_counts_s{sid}"), store.ident(f"_prev_s{sid}")
    try:
        _copy_counts(store, cnow, now)
        _copy_counts(store, cprev, prev if prev is not None and params.scoring == "trend" else Counts.merge([], 1))
        with store.tx() as c:
            args = {
                "trend": params.scoring == "trend",
                "min_support": params.min_support,
                "top_r": params.top_r,
            }
            c.execute(sql.SQL(_RANKED).format(ev=ev, now=cnow, prev=cprev), args)
            c.execute(sql.SQL(_PAIRS).format(pairs=pairs, ev=ev, vec=sql.SQL(_PAIR_VEC)))
            c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2)").format(pairs))
        # The HNSW index is built on a table no reader can see yet, with room for the graph in memory
        # (at the embedded server's 64 MB default, a 100k-pair build took 112 s against 25 s with 1 GB)
        with store.tx() as c:
            c.execute("SET LOCAL maintenance_work_mem = '1GB'")
            c.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding public.halfvec_cosine_ops)").format(pairs))
        with store.tx() as c:
            c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(params.ef_search)))
            c.execute(
                sql.SQL(
                    "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT c1, c2, sum(cnt)::int AS support FROM {} "
                    "GROUP BY c1, c2 HAVING sum(cnt) < %s"
                ).format(sql.Identifier(f"_weak_s{sid}"), cnow),
                (params.min_support,),
            )
            c.execute(
                sql.SQL("INSERT INTO {ev} ").format(ev=ev)
                + sql.SQL(_BORROW).format(
                    q=sql.Identifier(f"_weak_s{sid}"), pairs=pairs, ev=ev, vec=sql.SQL(_PAIR_VEC)
                ),
                {"k": params.neighbours, "top_r": params.top_r},
            )
            c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2, rank)").format(ev))
            stats = c.execute(
                sql.SQL(
                    "SELECT count(DISTINCT (c1, c2)), count(DISTINCT (c1, c2)) FILTER (WHERE borrowed) FROM {}"
                ).format(ev)
            ).fetchone()
            c.execute(sql.SQL("DROP TABLE {}, {}").format(cnow, cprev))
        assert stats is not None
        publish_snapshot(store, sid, int(stats[0]), int(stats[1]))
    except BaseException:
        with store.tx() as c:
            for t in (ev, pairs, cnow, cprev):
                c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
            c.execute("DELETE FROM snapshots WHERE snapshot_id = %s", (sid,))
        raise
    prune_snapshots(store, keep)
    return Snapshot(sid, window[0], window[1], int(stats[0]), int(stats[1]), now.triples)


def publish_snapshot(store: Store, snapshot_id: int, pairs: int, borrowed: int) -> None:
    """Make a built snapshot current in one short transaction: readers of the views see old or new, whole."""
    ev, pp = store.ident(f"evidence_s{snapshot_id}"), store.ident(f"evidence_pairs_s{snapshot_id}")
    with store.tx() as c:
        c.execute("UPDATE snapshots SET state = 'retired' WHERE state = 'current'")
        c.execute(
            "UPDATE snapshots SET state = 'current', pairs = %s, borrowed_pairs = %s WHERE snapshot_id = %s",
            (pairs, borrowed, snapshot_id),
        )
        for view, table in (("evidence", ev), ("evidence_pairs", pp)):
            # DROP + CREATE, not CREATE OR REPLACE: a snapshot may change a column's type (pair vectors became
            # halfvec); readers wait on the lock and then see the new view, never none.
            c.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(store.ident(view)))
            c.execute(sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(store.ident(view), table))


def prune_snapshots(store: Store, keep: int) -> list[int]:
    """Drop retired snapshots beyond the `keep` newest, except those a live release still points at."""
    with store.tx() as c:
        rows = c.execute(
            "SELECT snapshot_id FROM snapshots WHERE state = 'retired' AND snapshot_id NOT IN"
            " (SELECT snapshot_id FROM releases WHERE state IN ('active', 'candidate') AND snapshot_id IS NOT NULL)"
            " ORDER BY snapshot_id DESC OFFSET %s",
            (max(keep - 1, 0),),
        ).fetchall()
        dropped = [int(r[0]) for r in rows]
        for sid in dropped:
            c.execute(
                sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                    store.ident(f"evidence_s{sid}"), store.ident(f"evidence_pairs_s{sid}")
                )
            )
            c.execute("UPDATE snapshots SET state = 'dropped' WHERE snapshot_id = %s", (sid,))
    return dropped


def current_snapshot(store: Store) -> dict | None:
    with store.tx() as c:
        cur = c.execute(
            "SELECT snapshot_id, window_start, window_end, pairs, borrowed_pairs, triples, created_at"
            " FROM snapshots WHERE state = 'current'"
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d.name for d in cur.description or []], row, strict=True))


def _group(rows: list[tuple]) -> dict[tuple[int, int], PairEvidence]:
    grouped: dict[tuple[int, int], list[tuple]] = {}
    for r in rows:
        grouped.setdefault((r[0], r[1]), []).append(r)
    out = {}
    for (c1, c2), rs in grouped.items():
        rs.sort(key=lambda r: r[3])
        donors = rs[0][9] or []
        out[(c1, c2)] = PairEvidence(
            c1=c1,
            c2=c2,
            support=int(rs[0][2]),
            successors=tuple(Successor(int(r[4]), float(r[6]), int(r[5]), float(r[7]), bool(r[8])) for r in rs),
            borrowed_from=tuple((donors[i], donors[i + 1]) for i in range(0, len(donors), 2)),
        )
    return out


def load_evidence(store: Store, snapshot_id: int | None = None) -> dict[tuple[int, int], PairEvidence]:
    """All evidence of a snapshot (the current one by default), keyed by pair."""
    src = store.ident("evidence") if snapshot_id is None else store.ident(f"evidence_s{snapshot_id}")
    with store.tx() as c:
        rows = c.execute(
            sql.SQL(
                "SELECT c1, c2, support, rank, successor, count, share, score, borrowed, borrowed_from FROM {}"
            ).format(src)
        ).fetchall()
    return _group(rows)


def borrow_for(
    store: Store, pairs: list[tuple[int, int]], params: EvidenceParams, snapshot_id: int | None = None
) -> dict[tuple[int, int], PairEvidence]:
    """Evidence borrowed from the nearest donor pairs of the current (or given) snapshot, for pairs that have
    none of their own (e.g. a pair never seen in the window, asked for at serving time)."""
    if not pairs:
        return {}
    suffix = "" if snapshot_id is None else f"_s{snapshot_id}"
    ev, pp = store.ident(f"evidence{suffix}"), store.ident(f"evidence_pairs{suffix}")
    with store.tx() as c:
        c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(params.ef_search)))
        c.execute("CREATE TEMP TABLE _borrow_q (c1 int, c2 int, support int) ON COMMIT DROP")
        with c.cursor().copy("COPY _borrow_q FROM STDIN") as cp:
            for a, b in pairs:
                cp.write_row((a, b, 0))
        rows = c.execute(
            sql.SQL(_BORROW).format(q=sql.Identifier("_borrow_q"), pairs=pp, ev=ev, vec=sql.SQL(_PAIR_VEC)),
            {"k": params.neighbours, "top_r": params.top_r},
        ).fetchall()
    return _group(rows)


@functools.lru_cache(maxsize=64)
def _nearest_query(schema: str) -> sql.Composed:
    """nearest_pairs' SELECT, composed once per schema (it runs on a hot path)."""
    return sql.SQL(
        "WITH q AS MATERIALIZED (SELECT {vec} AS emb FROM {cl} a, {cl} b"
        " WHERE a.cluster = %(c1)s AND b.cluster = %(c2)s)"
        " SELECT p.c1, p.c2, 1 - (p.embedding OPERATOR(public.<=>) (SELECT emb FROM q)) FROM {pp} p"
        " WHERE (p.c1, p.c2) <> (%(c1)s, %(c2)s) AND EXISTS (SELECT FROM q)"
        " ORDER BY p.embedding OPERATOR(public.<=>) (SELECT emb FROM q) LIMIT %(k)s"
    ).format(
        vec=sql.SQL(_PAIR_VEC),
        cl=sql.Identifier(schema, "clusters"),
        pp=sql.Identifier(schema, "evidence_pairs"),
    )


def nearest_pairs(store: Store, c1: int, c2: int, k: int = 10, ef_search: int = 40) -> list[tuple[int, int, float]]:
    """The k donor pairs most similar to (c1, c2) in the current snapshot: (c1, c2, cosine similarity).

    The query vector is a materialized scalar subquery: a joined CTE would make the planner scan every pair
    (measured 344 ms against 1.1 ms at 100k pairs). The EXISTS guard returns nothing for unknown clusters.
    On an autocommit connection this is one round trip: names are schema-qualified (no SET LOCAL search_path)
    and ef_search is a session setting, set when it changes."""
    query = _nearest_query(store.schema)
    args = {"c1": c1, "c2": c2, "k": k}
    if store.conn.autocommit:
        store.set_session("hnsw.ef_search", ef_search)
        rows = store.conn.execute(query, args).fetchall()
    else:  # inside the caller's transaction: a session setting would not survive its rollback
        with store.tx() as c:
            c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search)))
            rows = c.execute(query, args).fetchall()
    return [(int(a), int(b), float(s)) for a, b, s in rows]
