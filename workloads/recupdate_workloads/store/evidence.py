"""Evidence snapshots: per pair (c1, c2), the top-R successors over a window, built aside and published
atomically; sparse pairs borrow evidence from their nearest pairs by embedding (pgvector HNSW).

Counting, ranking and borrowing happen in numpy: a snapshot's rows are computed from the aggregated counts
and cross into PostgreSQL once, as one binary COPY. PostgreSQL holds what outlives a snapshot: the pair
vectors and their HNSW index, built once per catalogue version (pair vectors depend only on the clusters'
embeddings) and shared by every snapshot, and each pair's list of nearest pairs, searched once and kept.
A snapshot's `evidence_pairs` view is its donor pairs joined to the shared index; readers search it with
pgvector's iterative index scans, which skip the pairs that are not donors of that snapshot.
Publication follows docs/architecture.md ("Evidence snapshots"): build the new tables aside, then repoint the
`evidence` and `evidence_pairs` views in one short transaction; old snapshots are dropped past a limit.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from recupdate_workloads.data.sequences import DENSE_COUNT_LIMIT, successor_counts
from recupdate_workloads.data.types import PairEvidence, Successor, Triples
from recupdate_workloads.store.db import Store

SCORINGS = ("frequency", "trend")
#: Each pair's cached list holds at least this many of its nearest pairs of the whole index; a sparse pair
#: borrows from the first `neighbours` of them that are donors of the snapshot...
NEIGHBOUR_LIST = 32
#: ...and lists grow, up to this many, where a snapshot's donors are too sparse for them (list_length).
MAX_NEIGHBOUR_LIST = 512
#: The shared pair index holds every ordered pair of the catalogue, C*(C-1); above this many, each snapshot
#: indexes only its own pairs (the cost of a snapshot is then an HNSW build again, as before the shared index).
MAX_SHARED_PAIRS = 1_000_000
#: Reads of the pair index filter it to one snapshot's donors: pgvector's iterative scan goes on past
#: ef_search candidates until enough pass the filter (pgvector >= 0.8), in distance order.
ITERATIVE_SCAN = "strict_order"


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
    def empty(cls) -> Counts:
        z = np.zeros(0, np.int32)
        return cls(z, z, z, np.zeros(0, np.int64), 0)

    @classmethod
    def merge(cls, parts: Iterable[Counts], n_clusters: int) -> Counts:
        """The sum of counts, sorted by (c1, c2, c_next) like Counts.of: the counts of the union of the parts'
        triples when they come from disjoint triples (chunks or shards of whole users)."""
        parts = list(parts)
        triples = sum(p.triples for p in parts)
        parts = [p for p in parts if len(p.c1)]
        if not parts:
            return cls.empty()
        keys = [(p.c1.astype(np.int64) * n_clusters + p.c2) * n_clusters + p.c_next for p in parts]
        if n_clusters**3 <= DENSE_COUNT_LIMIT:  # add into one dense array: no sort
            dense = np.zeros(n_clusters**3, np.int64)
            for key, p in zip(keys, parts, strict=True):
                np.add.at(dense, key, p.count.astype(np.int64, copy=False))
            uniq = np.flatnonzero(dense)
            total = dense[uniq]
        else:
            uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
            total = np.zeros(len(uniq), np.int64)
            np.add.at(total, inv, np.concatenate([p.count for p in parts]).astype(np.int64, copy=False))
        pair, cn = np.divmod(uniq, n_clusters)
        c1, c2 = np.divmod(pair, n_clusters)
        return cls(c1.astype(np.int32), c2.astype(np.int32), cn.astype(np.int32), total, triples)


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: int
    window_start: int
    window_end: int
    pairs: int
    borrowed_pairs: int
    triples: int
    #: Seconds per step of build_snapshot (rank, pair_index, copy, neighbour_lists, borrow, publish, ...).
    parts: dict[str, float] = field(default_factory=dict, compare=False)


# ------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class Ranked:
    """A snapshot's own evidence (rows sorted by pair, then rank) and its weak pairs (support < min_support),
    computed from the counts in numpy."""

    c1: np.ndarray  # int32
    c2: np.ndarray  # int32
    support: np.ndarray  # int64
    rank: np.ndarray  # int16, 1-based
    successor: np.ndarray  # int32
    count: np.ndarray  # int64
    share: np.ndarray  # float32
    score: np.ndarray  # float32
    weak_c1: np.ndarray  # int32, sorted by (c1, c2)
    weak_c2: np.ndarray
    weak_support: np.ndarray  # int64

    @property
    def pairs(self) -> int:
        return int(np.count_nonzero(self.rank == 1))


#: Cluster ids are catalogue indices: keys of (c1, c2, c_next) are c1 * B^2 + c2 * B + c_next in an int64.
_MAX_ID = 1 << 21


def _base(*parts: Counts | None) -> int:
    """One more than the largest cluster id in the counts (ids must lie in [0, 2^21))."""
    hi, lo = 0, 0
    for p in parts:
        if p is not None and len(p.c1):
            hi = max(hi, int(np.max(p.c1)), int(np.max(p.c2)), int(np.max(p.c_next)))
            lo = min(lo, int(np.min(p.c1)), int(np.min(p.c2)), int(np.min(p.c_next)))
    if lo < 0 or hi >= _MAX_ID:
        raise ValueError(f"cluster ids must lie in [0, {_MAX_ID}), got {lo}..{hi}")
    return hi + 1


def _aggregate(c: Counts, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row key, count, support of the row's pair), sorted by key (c1, c2, c_next), duplicate rows summed."""
    key = (np.asarray(c.c1, np.int64) * base + np.asarray(c.c2, np.int64)) * base + np.asarray(c.c_next, np.int64)
    cnt = np.asarray(c.count).astype(np.int64, copy=False)
    if len(key) > 1 and not bool(np.all(key[1:] > key[:-1])):  # Counts.of and merge give sorted, unique keys
        key, inv = np.unique(key, return_inverse=True)
        summed = np.zeros(len(key), np.int64)
        np.add.at(summed, inv, cnt)
        cnt = summed
    pair = key // base
    starts = _starts(pair)
    support = np.repeat(np.add.reduceat(cnt, starts), np.diff(np.r_[starts, len(pair)])) if len(key) else cnt
    return key, cnt, support


def _starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in a sorted array."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _shares(cnt: np.ndarray, support: np.ndarray) -> np.ndarray:
    # As the SQL this replaced computed them: cnt::real / sum(cnt), a real over a numeric, is double precision.
    return cnt.astype(np.float32).astype(np.float64) / support.astype(np.float64)


def _by_pair_score(pair: np.ndarray, score: np.ndarray, cnt: np.ndarray, frequency: bool) -> np.ndarray:
    """The order of rows by pair, then score and count descending; stable, so ties keep their c_next order
    (rows come sorted by key). Scored by frequency, a pair's scores follow its counts (one support divides
    them all), so one sort of a combined integer key gives the same order."""
    top = int(cnt.max(initial=0))
    if frequency and int(pair.max(initial=0)) < (1 << 62) // (top + 1):
        return np.argsort(pair * (top + 1) + (top - cnt), kind="stable")
    return np.lexsort((-cnt, -score, pair))


def rank_evidence(now: Counts, params: EvidenceParams, prev: Counts | None = None) -> Ranked:
    """Each pair with support >= min_support keeps its top_r successors by score, then count, then id:
    frequency scores by share of the pair's support; trend by the rise of that share since the previous
    window (`prev`). The pairs below min_support are the weak ones, which borrow."""
    use_prev = params.scoring == "trend" and prev is not None and len(prev.c1) > 0
    base = _base(now, prev if use_prev else None)
    key, cnt, support = _aggregate(now, base)
    share = _shares(cnt, support)
    score = share
    if use_prev:
        assert prev is not None
        pkey, pcnt, psupport = _aggregate(prev, base)
        pos = np.minimum(np.searchsorted(pkey, key), len(pkey) - 1)
        score = share - np.where(pkey[pos] == key, _shares(pcnt, psupport)[pos], 0.0)
    pair, cn = np.divmod(key, base)
    strong = support >= params.min_support
    wpair, wsup = pair[~strong], support[~strong]
    first = _starts(wpair)
    wpair, wsup = wpair[first], wsup[first]
    pair, cn, cnt, support, share, score = (a[strong] for a in (pair, cn, cnt, support, share, score))
    order = _by_pair_score(pair, score, cnt, frequency=not use_prev)
    pair, cn, cnt, support, share, score = (a[order] for a in (pair, cn, cnt, support, share, score))
    starts = _starts(pair)
    rank = np.arange(len(pair)) - np.repeat(starts, np.diff(np.r_[starts, len(pair)])) + 1
    top = rank <= params.top_r
    c1, c2 = np.divmod(pair[top], base)
    w1, w2 = np.divmod(wpair, base)
    return Ranked(
        c1=c1.astype(np.int32),
        c2=c2.astype(np.int32),
        support=support[top],
        rank=rank[top].astype(np.int16),
        successor=cn[top].astype(np.int32),
        count=cnt[top],
        share=share[top].astype(np.float32),
        score=score[top].astype(np.float32),
        weak_c1=w1.astype(np.int32),
        weak_c2=w2.astype(np.int32),
        weak_support=wsup,
    )


# ----------------------------------------------------------------------------------------- borrowing


@dataclass(frozen=True)
class Borrowed:
    """Evidence of weak pairs borrowed from donor pairs (rows sorted by pair, then rank). Row i's donors are
    donors[donor_start[i]:donor_start[i] + donor_len[i]] as flattened (c1, c2) pairs, nearest first."""

    c1: np.ndarray
    c2: np.ndarray
    support: np.ndarray
    rank: np.ndarray
    successor: np.ndarray
    share: np.ndarray  # float32; NaN where the donors' weights sum to 0 (stored as NULL)
    score: np.ndarray
    donors: np.ndarray  # int32
    donor_start: np.ndarray
    donor_len: np.ndarray

    @property
    def pairs(self) -> int:
        return int(np.count_nonzero(self.rank == 1))


def _expand(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[j], starts[j] + sizes[j]): (j, position) for every position, in order."""
    j = np.repeat(np.arange(len(sizes)), sizes)
    offset = np.arange(len(j)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return j, np.repeat(starts, sizes) + offset


def _nearest_first(owner: np.ndarray, sim: np.ndarray, key: np.ndarray) -> bool:
    """Whether rows are ordered by owner, then similarity descending, then donor key."""
    if len(owner) < 2:
        return True
    do, ds, dk = np.diff(owner), np.diff(sim), np.diff(key)
    return bool(np.all((do > 0) | ((do == 0) & ((ds < 0) | ((ds == 0) & (dk > 0))))))


def borrow_evidence(
    r: Ranked, owner: np.ndarray, d1: np.ndarray, d2: np.ndarray, sim: np.ndarray, params: EvidenceParams
) -> Borrowed:
    """Evidence for the weak pairs of `r` from candidate donors (owner: index of the weak pair; d1, d2: a
    donor pair; sim: cosine similarity). Each weak pair keeps its `neighbours` most similar donors and weighs
    their successors' shares by similarity (clipped at 0), never suggesting its own clusters; the top_r
    successors by weight, with shares of the total weight."""
    sim = np.maximum(np.asarray(sim, np.float64), 0.0)
    owner = np.asarray(owner, np.int64)
    d1, d2 = np.asarray(d1, np.int32), np.asarray(d2, np.int32)
    base = 1 + max(int(a.max(initial=0)) for a in (r.c1, r.c2, r.successor, r.weak_c1, r.weak_c2, d1, d2))
    dkey_all = r.c1.astype(np.int64) * base + r.c2
    dstarts = _starts(dkey_all)
    dkeys, dsizes = dkey_all[dstarts], np.diff(np.r_[dstarts, len(dkey_all)])
    key = d1.astype(np.int64) * base + d2
    pos = np.minimum(np.searchsorted(dkeys, key), max(len(dkeys) - 1, 0))
    ok = (dkeys[pos] == key) if len(dkeys) else np.zeros(len(key), bool)
    owner, d1, d2, sim, pos = owner[ok], d1[ok], d2[ok], sim[ok], pos[ok]
    if not _nearest_first(owner, sim, key[ok]):  # cached lists come in this order: skip the sort
        order = np.lexsort((d2, d1, -sim, owner))
        owner, d1, d2, sim, pos = owner[order], d1[order], d2[order], sim[order], pos[order]
    ostarts = _starts(owner)
    nth = np.arange(len(owner)) - np.repeat(ostarts, np.diff(np.r_[ostarts, len(owner)]))
    keep = nth < params.neighbours
    owner, d1, d2, sim, pos = owner[keep], d1[keep], d2[keep], sim[keep], pos[keep]
    # every successor row of every donor, weighted by the donor's similarity
    nb, row = _expand(dstarts[pos], dsizes[pos])
    q, succ = owner[nb], r.successor[row]
    w = sim[nb] * r.share[row].astype(np.float64)
    mine = (succ == r.weak_c1[q]) | (succ == r.weak_c2[q])
    q, succ, w = q[~mine], succ[~mine], w[~mine]
    order = np.argsort(q * base + succ, kind="stable")  # q is sorted already; group by (q, successor)
    q, succ, w = q[order], succ[order], w[order]
    g = np.flatnonzero(np.r_[True, (q[1:] != q[:-1]) | (succ[1:] != succ[:-1])]) if len(q) else np.zeros(0, np.int64)
    q, succ, w = q[g], succ[g], np.add.reduceat(w, g) if len(g) else w[:0]
    qs = _starts(q)
    total = np.repeat(np.add.reduceat(w, qs) if len(qs) else w[:0], np.diff(np.r_[qs, len(q)]))
    order = np.argsort(-w, kind="stable")  # then by q, stable: (q, weight descending, successor)
    order = order[np.argsort(q[order], kind="stable")]
    q, succ, w, total = q[order], succ[order], w[order], total[order]
    rank = np.arange(len(q)) - np.repeat(qs, np.diff(np.r_[qs, len(q)])) + 1
    top = rank <= params.top_r
    q, succ, w, total, rank = q[top], succ[top], w[top], total[top], rank[top]
    # the donors of each weak pair, flattened (c1, c2, c1, c2, ...), nearest first
    flat = np.stack([d1, d2], axis=1).reshape(-1)
    first_nb = np.searchsorted(owner, q)  # owner is sorted: a weak pair's donors are contiguous
    count_nb = np.searchsorted(owner, q, side="right") - first_nb
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, w / np.where(total > 0, total, 1.0), np.nan)
    return Borrowed(
        c1=r.weak_c1[q],
        c2=r.weak_c2[q],
        support=r.weak_support[q],
        rank=rank.astype(np.int16),
        successor=succ.astype(np.int32),
        share=share.astype(np.float32),
        score=w.astype(np.float32),
        donors=flat.astype(np.int32),
        donor_start=2 * first_nb,
        donor_len=2 * count_nb,
    )


# --------------------------------------------------------------------------------------- binary COPY

_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_INT4_OID = 23
_EVIDENCE_COLUMNS = (
    "c1 int NOT NULL, c2 int NOT NULL, support int NOT NULL, rank smallint NOT NULL, successor int NOT NULL,"
    " count int NOT NULL, share real, score real NOT NULL, borrowed boolean NOT NULL, borrowed_from int[] NOT NULL"
)
_INT32_MAX = (1 << 31) - 1


def _evidence_records(
    c1: np.ndarray,
    c2: np.ndarray,
    support: np.ndarray,
    rank: np.ndarray,
    successor: np.ndarray,
    count: np.ndarray,
    share: np.ndarray,
    score: np.ndarray,
    borrowed: bool,
    donors: np.ndarray | None = None,
) -> bytes:
    """Rows of the evidence table in PostgreSQL's binary COPY format, built by numpy. donors: one row of
    2*n donor cluster ids per evidence row (all rows n wide), or None for empty arrays."""
    n = len(c1)
    for name, a in (("support", support), ("count", count)):
        if n and int(a.max()) > _INT32_MAX:
            raise ValueError(f"a pair's {name} exceeds the int column of the evidence table")
    m = 0 if donors is None else donors.shape[1]
    fields: list[tuple] = [("nf", ">i2")]
    for name, typ in (("c1", ">i4"), ("c2", ">i4"), ("support", ">i4"), ("rank", ">i2"), ("successor", ">i4")):
        fields += [(f"l_{name}", ">i4"), (name, typ)]
    for name, typ in (("count", ">i4"), ("share", ">f4"), ("score", ">f4"), ("borrowed", "u1")):
        fields += [(f"l_{name}", ">i4"), (name, typ)]
    fields += [("l_arr", ">i4"), ("ndim", ">i4"), ("hasnull", ">i4"), ("oid", ">i4")]
    if m:
        fields += [("dim", ">i4"), ("lbound", ">i4"), ("el", ">i4", (m, 2))]
    rec = np.zeros(n, dtype=np.dtype(fields))
    rec["nf"] = 10
    for name, size, values in (
        ("c1", 4, c1),
        ("c2", 4, c2),
        ("support", 4, support),
        ("rank", 2, rank),
        ("successor", 4, successor),
        ("count", 4, count),
        ("share", 4, share),
        ("score", 4, score),
        ("borrowed", 1, np.full(n, borrowed)),
    ):
        rec[f"l_{name}"] = size
        rec[name] = values
    rec["l_arr"] = 12 + (8 + 8 * m if m else 0)
    rec["ndim"], rec["oid"] = (1 if m else 0), _INT4_OID
    if m:
        assert donors is not None
        rec["dim"], rec["lbound"] = m, 1
        rec["el"][:, :, 0] = 4
        rec["el"][:, :, 1] = donors
    return rec.tobytes()


def _copy_evidence(cur: psycopg.Cursor, table: sql.Composable, chunks: Iterable[bytes]) -> None:
    with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(table)) as cp:
        cp.write(_PGCOPY_HEADER)
        for chunk in chunks:
            cp.write(chunk)
        cp.write(b"\xff\xff")


def _own_records(r: Ranked) -> bytes:
    return _evidence_records(r.c1, r.c2, r.support, r.rank, r.successor, r.count, r.share, r.score, False)


def _borrowed_records(b: Borrowed) -> Iterable[bytes]:
    """Borrowed rows grouped by their number of donors (a fixed record layout per group)."""
    for width in np.unique(b.donor_len):
        sel = np.flatnonzero(b.donor_len == width)
        idx = b.donor_start[sel][:, None] + np.arange(width)[None, :]
        donors = b.donors[idx] if width else None
        yield _evidence_records(
            b.c1[sel],
            b.c2[sel],
            b.support[sel],
            b.rank[sel],
            b.successor[sel],
            np.zeros(len(sel), np.int64),
            b.share[sel],
            b.score[sel],
            True,
            donors,
        )


def _int_pairs(c1: np.ndarray, c2: np.ndarray) -> bytes:
    """(i int, c1 int, c2 int) rows in binary COPY format, i the row's position."""
    rec = np.zeros(
        len(c1),
        dtype=[("nf", ">i2"), ("l0", ">i4"), ("i", ">i4"), ("l1", ">i4"), ("c1", ">i4"), ("l2", ">i4"), ("c2", ">i4")],
    )
    rec["nf"], rec["l0"], rec["l1"], rec["l2"] = 3, 4, 4, 4
    rec["i"], rec["c1"], rec["c2"] = np.arange(len(c1)), c1, c2
    return _PGCOPY_HEADER + rec.tobytes() + b"\xff\xff"


# ----------------------------------------------------------------------------------------- pair index

# The vector of pair (a, b): the newest cluster b weighs double. Pair vectors are stored and searched at half
# precision: at 102k pairs the HNSW index is 116 against 202 MiB for float32 (it fits in the embedded server's
# shared_buffers) and answers twice as fast at the same recall (benchmarks/README.md, "Neighbour queries").
_PAIR_VEC = "public.l2_normalize(a.embedding + b.embedding + b.embedding)::public.halfvec(384)"
_PAIR_INDEX_LOCK = 0x70616972  # advisory lock key (with the schema's oid): one builder of a shared index
_LIST_RECORD = np.dtype([("c1", ">i4"), ("c2", ">i4"), ("sim", ">f8")])
_LIST_HEAD = np.dtype([("i", ">i4"), ("m", ">i4"), ("bytes", ">i4")])


@dataclass(frozen=True)
class PairIndex:
    """Pair vectors with their HNSW index, and each pair's cached list of nearest pairs (`lists`). Shared:
    every ordered pair of one catalogue version, reused by every snapshot of it; else one snapshot's pairs."""

    vectors: str
    lists: str
    version: str
    shared: bool
    pairs: int
    built_s: float  # 0.0 when an existing index was reused


def catalogue_version(store: Store) -> str:
    """A digest of the clusters' ids and embeddings and of the pair-vector formula: what pair vectors depend on."""
    with store.tx() as c:
        row = c.execute(
            "SELECT md5(%s || coalesce(string_agg(cluster::text || ':' || coalesce(embedding::text, '-'), ','"
            " ORDER BY cluster), '')) FROM clusters",
            (_PAIR_VEC,),
        ).fetchone()
    assert row is not None
    return str(row[0])[:16]


def _exists(c: psycopg.Connection, store: Store, name: str) -> bool:
    row = c.execute("SELECT to_regclass(%s)", (f'"{store.schema}"."{name}"',)).fetchone()
    return row is not None and row[0] is not None


def _build_pair_tables(c: psycopg.Connection, store: Store, vectors: str, lists: str, source: sql.Composable) -> int:
    """Create the pair vectors (from `source`, a query of c1, c2 per pair), their HNSW index and the empty
    lists table, in the caller's transaction. Returns the number of pairs."""
    pv, nb = store.ident(vectors), store.ident(lists)
    c.execute(sql.SQL("CREATE TABLE {} (c1 int NOT NULL, c2 int NOT NULL, embedding public.halfvec(384))").format(pv))
    cur = c.execute(
        sql.SQL(
            "INSERT INTO {pv} SELECT s.c1, s.c2, {vec} FROM ({src}) s"
            " JOIN clusters a ON a.cluster = s.c1 JOIN clusters b ON b.cluster = s.c2"
        ).format(pv=pv, vec=sql.SQL(_PAIR_VEC), src=source)
    )
    pairs = cur.rowcount
    c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2)").format(pv))
    # Room for the graph in memory: at the embedded server's 64 MB default, a 100k-pair build took 112 s
    # against 25 s with 1 GB.
    c.execute("SET LOCAL maintenance_work_mem = '1GB'")
    c.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding public.halfvec_cosine_ops)").format(pv))
    c.execute(
        sql.SQL("CREATE TABLE {} (c1 int, c2 int, m int NOT NULL, nbrs bytea NOT NULL, PRIMARY KEY (c1, c2))").format(
            nb
        )
    )
    c.execute(sql.SQL("ANALYZE {}").format(pv))
    return pairs


def pair_index(
    store: Store, snapshot_id: int | None = None, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> PairIndex:
    """The shared pair index of the current catalogue, built on first use; or, for a catalogue of more than
    MAX_SHARED_PAIRS ordered pairs, a private index of `pairs` (c1, c2) named after `snapshot_id`."""
    version = catalogue_version(store)
    with store.tx() as c:
        row = c.execute("SELECT count(*) FROM clusters").fetchone()
    n = int(row[0]) if row else 0
    t0 = time.perf_counter()
    if n * (n - 1) <= MAX_SHARED_PAIRS:
        vectors, lists = f"pair_vectors_{version}", f"pair_lists_{version}"
        with store.tx() as c:
            if _exists(c, store, vectors):
                size = c.execute(
                    sql.SQL("SELECT reltuples::bigint FROM pg_class WHERE oid = {}::regclass").format(
                        sql.Literal(f'"{store.schema}"."{vectors}"')
                    )
                ).fetchone()
                return PairIndex(vectors, lists, version, True, int(size[0]) if size else 0, 0.0)
        with store.tx() as c:  # build it, once: a concurrent builder waits here, then finds it built
            c.execute(
                "SELECT pg_advisory_xact_lock(%s, (SELECT oid::int FROM pg_namespace WHERE nspname = %s))",
                (_PAIR_INDEX_LOCK, store.schema),
            )
            if _exists(c, store, vectors):
                return PairIndex(vectors, lists, version, True, n * (n - 1), 0.0)
            every = sql.SQL(
                "SELECT a.cluster AS c1, b.cluster AS c2 FROM clusters a JOIN clusters b ON a.cluster <> b.cluster"
            )
            count = _build_pair_tables(c, store, vectors, lists, every)
        return PairIndex(vectors, lists, version, True, count, time.perf_counter() - t0)
    if snapshot_id is None or pairs is None:
        raise ValueError(
            f"{n} clusters make {n * (n - 1):,} pairs, more than MAX_SHARED_PAIRS: pass the snapshot's pairs"
        )
    vectors, lists = f"pair_vectors_s{snapshot_id}", f"pair_lists_s{snapshot_id}"
    with store.tx() as c:
        tmp = sql.Identifier(f"_pairs_s{snapshot_id}")
        c.execute(sql.SQL("CREATE TEMP TABLE {} (i int, c1 int, c2 int) ON COMMIT DROP").format(tmp))
        with c.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(tmp)) as cp:
            cp.write(_int_pairs(*pairs))
        count = _build_pair_tables(c, store, vectors, lists, sql.SQL("SELECT c1, c2 FROM {}").format(tmp))
    return PairIndex(vectors, lists, version, False, count, time.perf_counter() - t0)


# The cached list of a pair: its m nearest pairs of the index (itself excluded), packed as (int4 c1, int4 c2,
# float8 similarity) records, nearest first. One statement searches for every pair of {weak} that has no
# list of at least %(have)s: a LATERAL subquery per pair over the HNSW index; a longer list replaces a shorter.
_FILL_LISTS = """
INSERT INTO {nb} (c1, c2, m, nbrs)
SELECT q.c1, q.c2, %(m)s, coalesce(n.nbrs, ''::bytea)
FROM {weak} w JOIN {pv} q ON q.c1 = w.c1 AND q.c2 = w.c2
CROSS JOIN LATERAL (
    SELECT string_agg(int4send(x.c1) || int4send(x.c2) || float8send(1 - x.d), ''::bytea ORDER BY x.d, x.c1, x.c2)
    FROM (SELECT p.c1, p.c2, p.embedding OPERATOR(public.<=>) q.embedding AS d FROM {pv} p
          WHERE (p.c1, p.c2) <> (q.c1, q.c2)
          ORDER BY p.embedding OPERATOR(public.<=>) q.embedding LIMIT %(m)s) x
) n(nbrs)
WHERE q.embedding IS NOT NULL
  AND NOT EXISTS (SELECT FROM {nb} l WHERE l.c1 = w.c1 AND l.c2 = w.c2 AND l.m >= %(have)s)
ON CONFLICT (c1, c2) DO UPDATE SET m = EXCLUDED.m, nbrs = EXCLUDED.nbrs WHERE {nb}.m < EXCLUDED.m
"""
_READ_LISTS = """
SELECT string_agg(int4send(w.i) || int4send(l.m) || int4send(length(l.nbrs)), ''::bytea ORDER BY w.i),
       string_agg(l.nbrs, ''::bytea ORDER BY w.i)
FROM {weak} w JOIN {nb} l ON l.c1 = w.c1 AND l.c2 = w.c2
"""
# The k nearest donors of each listed pair, searched in the snapshot's donor view: the iterative index scan
# over the pair index goes on until k donors pass the view's filter.
_NEAREST_DONORS = """
SELECT f.i, n.c1, n.c2, 1 - n.d
FROM {weak} f JOIN {pv} q ON q.c1 = f.c1 AND q.c2 = f.c2
CROSS JOIN LATERAL (
    SELECT p.c1, p.c2, p.embedding OPERATOR(public.<=>) q.embedding AS d FROM {pairs} p
    WHERE (p.c1, p.c2) <> (q.c1, q.c2)
    ORDER BY p.embedding OPERATOR(public.<=>) q.embedding LIMIT %(k)s
) n
WHERE q.embedding IS NOT NULL
"""


def list_length(donors: int, pairs: int, k: int) -> int:
    """How many nearest pairs a list needs to hold `k` donors of a snapshot twice over on average, where
    `donors` of the index's `pairs` are donors: 2k / (their share), within [NEIGHBOUR_LIST, MAX_NEIGHBOUR_LIST]."""
    share = donors / max(pairs, 1)
    want = math.ceil(2 * k / share) if share > 0 else MAX_NEIGHBOUR_LIST
    return int(max(1, min(max(want, NEIGHBOUR_LIST), MAX_NEIGHBOUR_LIST, pairs - 1)))


def _search_settings(c: psycopg.Connection, ef_search: int) -> None:
    c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search)))
    c.execute(sql.SQL("SET LOCAL hnsw.iterative_scan = {}").format(sql.Literal(ITERATIVE_SCAN)))


def _copy_pairs(c: psycopg.Connection, name: str, c1: np.ndarray, c2: np.ndarray) -> sql.Identifier:
    """A temporary (i, c1, c2) table of the given pairs, dropped at commit."""
    tmp = sql.Identifier(name)
    c.execute(sql.SQL("CREATE TEMP TABLE {} (i int, c1 int, c2 int) ON COMMIT DROP").format(tmp))
    with c.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(tmp)) as cp:
        cp.write(_int_pairs(c1, c2))
    return tmp


def _read_lists(
    c: psycopg.Connection, weak: sql.Composable, nb: sql.Composable
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cached lists of the pairs in {weak}: (i of each entry, d1, d2, sim) and, per listed pair, (i, cut):
    cut when the list holds all it was asked for (more pairs lie beyond it)."""
    row = c.cursor(binary=True).execute(sql.SQL(_READ_LISTS).format(weak=weak, nb=nb)).fetchone()  # bytea as is
    heads = np.frombuffer(row[0] or b"", _LIST_HEAD) if row else np.zeros(0, _LIST_HEAD)
    recs = np.frombuffer(row[1] or b"", _LIST_RECORD) if row else np.zeros(0, _LIST_RECORD)
    length = heads["bytes"].astype(np.int64) // _LIST_RECORD.itemsize
    listed = heads["i"].astype(np.int64)
    owner = np.repeat(listed, length)
    d1, d2, sim = recs["c1"].astype(np.int32), recs["c2"].astype(np.int32), recs["sim"].astype(np.float64)
    return owner, d1, d2, sim, np.stack([listed, length >= heads["m"]], axis=1)


def _donor_candidates(
    c: psycopg.Connection,
    store: Store,
    pi: PairIndex,
    r: Ranked,
    donor_view: sql.Composable,
    params: EvidenceParams,
    sid: int,
    prepare_view: Callable[[], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Candidate donors of the weak pairs (owner, d1, d2, similarity), from their cached lists. Pairs without
    a list get one, as long as this snapshot's share of donors needs (list_length). A pair whose list holds
    fewer than `neighbours` donors but more pairs lie beyond it gets one 4 times longer (at most
    MAX_NEIGHBOUR_LIST); if that is still short, it is searched in the donor view (made ready by
    `prepare_view` first)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pv, nb = store.ident(pi.vectors), store.ident(pi.lists)
    k = params.neighbours
    donors = _starts(r.c1.astype(np.int64) * _MAX_ID + r.c2)
    m = list_length(len(donors), pi.pairs, k)
    donor_keys = r.c1[donors].astype(np.int64) * _MAX_ID + r.c2[donors]  # sorted: rows are by pair

    def fill(weak: sql.Composable, length: int, have: int) -> int:
        # a candidate queue twice the list (pgvector allows at most 1000; the iterative scan goes on past it)
        _search_settings(c, min(max(params.ef_search, 2 * length), 1000))
        args = {"m": length, "have": have}
        return max(c.execute(sql.SQL(_FILL_LISTS).format(nb=nb, weak=weak, pv=pv), args).rowcount, 0)

    def donors_of(
        lists: tuple[np.ndarray, ...], index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The listed entries that are donors, owners mapped through `index`; and the owners left short."""
        owner, d1, d2, sim, heads = lists
        key = d1.astype(np.int64) * _MAX_ID + d2
        pos = np.minimum(np.searchsorted(donor_keys, key), max(len(donor_keys) - 1, 0))
        hit = (donor_keys[pos] == key) if len(donor_keys) else np.zeros(len(key), bool)
        owner, d1, d2, sim = index[owner[hit]], d1[hit], d2[hit], sim[hit]
        found = np.bincount(owner, minlength=len(r.weak_c1))
        cut = np.zeros(len(r.weak_c1), bool)
        cut[index[heads[:, 0]]] = heads[:, 1].astype(bool)
        return owner, d1, d2, sim, found, cut

    everyone = np.arange(len(r.weak_c1))
    weak = _copy_pairs(c, f"_weak_s{sid}", r.weak_c1, r.weak_c2)
    timings["lists_searched"] = float(fill(weak, m, 1))
    timings["lists_search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    owner, d1, d2, sim, found, cut = donors_of(_read_lists(c, weak, nb), everyone)
    short = np.flatnonzero(cut & (found < k))
    timings["lists_read_s"] = time.perf_counter() - t
    timings["lists_length"] = float(m)
    # Lists too short where donors are sparse: longer ones, kept for the next snapshots (a list already that
    # long is not searched again).
    longer = max(min(4 * m, MAX_NEIGHBOUR_LIST, max(pi.pairs - 1, 1)), m)
    if len(short):
        t = time.perf_counter()
        again = _copy_pairs(c, f"_again_s{sid}", r.weak_c1[short], r.weak_c2[short])
        timings["lists_grown"] = float(fill(again, longer, longer))
        o2, e1, e2, s2, f2, cut2 = donors_of(_read_lists(c, again, nb), short)
        keep = ~np.isin(owner, short)
        owner, d1, d2, sim = np.r_[owner[keep], o2], np.r_[d1[keep], e1], np.r_[d2[keep], e2], np.r_[sim[keep], s2]
        short = short[cut2[short] & (f2[short] < k)]
        timings["lists_grow_s"] = time.perf_counter() - t
    timings["searched_in_view"] = float(len(short))
    if len(short):
        t = time.perf_counter()
        prepare_view()
        fb = _copy_pairs(c, f"_short_s{sid}", r.weak_c1[short], r.weak_c2[short])
        _search_settings(c, params.ef_search)
        rows = c.execute(sql.SQL(_NEAREST_DONORS).format(weak=fb, pv=pv, pairs=donor_view), {"k": k}).fetchall()
        keep = ~np.isin(owner, short)
        owner, d1, d2, sim = owner[keep], d1[keep], d2[keep], sim[keep]
        if rows:
            a = np.array(rows, dtype=np.float64)
            owner = np.r_[owner, short[a[:, 0].astype(np.int64)]]
            d1 = np.r_[d1, a[:, 1].astype(np.int32)]
            d2 = np.r_[d2, a[:, 2].astype(np.int32)]
            sim = np.r_[sim, a[:, 3]]
        timings["view_search_s"] = time.perf_counter() - t
    return owner, d1, d2, sim, timings


# ------------------------------------------------------------------------------------------ snapshots

# A snapshot's donor pairs with their vectors: the view readers search (nearest_pairs, borrow_for). Its
# filter (a donor's own rank-1 row) is a scalar subquery, checked per candidate through the evidence table's
# primary key: the planner cannot turn it into a join, so a search always walks the shared index in distance
# order (an iterative scan) and skips the pairs that are not donors. As a join, a fresh snapshot without
# statistics got a scan of every donor and a sort (27 ms against about 1 ms at 3,453 donors of 22,350 pairs).
_DONOR_VIEW = """
CREATE VIEW {view} AS
SELECT v.c1, v.c2, (SELECT e.support FROM {ev} e WHERE e.c1 = v.c1 AND e.c2 = v.c2 AND e.rank = 1) AS support,
       v.embedding
FROM {pv} v
WHERE (SELECT NOT e.borrowed FROM {ev} e WHERE e.c1 = v.c1 AND e.c2 = v.c2 AND e.rank = 1)
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
    parts: dict[str, float] = {}
    t = time.perf_counter()
    r = rank_evidence(now, params, prev)
    parts["rank_s"] = time.perf_counter() - t
    with store.tx() as c:
        row = c.execute(
            "INSERT INTO snapshots (window_start, window_end, scoring, top_r, min_support, triples, state)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'building') RETURNING snapshot_id",
            (window[0], window[1], params.scoring, params.top_r, params.min_support, now.triples),
        ).fetchone()
    assert row is not None
    sid = int(row[0])
    ev, view = store.ident(f"evidence_s{sid}"), store.ident(f"evidence_pairs_s{sid}")
    pi: PairIndex | None = None
    try:
        t = time.perf_counter()
        own_pairs = _starts(r.c1.astype(np.int64) * _MAX_ID + r.c2)
        all_c1 = np.r_[r.c1[own_pairs], r.weak_c1]
        all_c2 = np.r_[r.c2[own_pairs], r.weak_c2]
        pi = pair_index(store, sid, (all_c1, all_c2))
        parts["pair_index_s"] = time.perf_counter() - t
        parts["pair_index_built"] = float(pi.built_s > 0)
        with store.tx() as c:
            t = time.perf_counter()
            c.execute(sql.SQL("CREATE TABLE {} (" + _EVIDENCE_COLUMNS + ")").format(ev))
            cur = c.cursor()
            _copy_evidence(cur, ev, [_own_records(r)])
            parts["copy_s"] = time.perf_counter() - t
            ready: list[bool] = []

            def index_and_view() -> None:
                # The primary key serves readers' lookups by pair and the donor view's filter. Built once,
                # after the borrowed rows unless a search in the view needs it first.
                if not ready:
                    c.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (c1, c2, rank)").format(ev))
                    c.execute(sql.SQL(_DONOR_VIEW).format(view=view, ev=ev, pv=store.ident(pi.vectors)))
                    ready.append(True)

            borrowed_pairs = 0
            if len(r.weak_c1) and len(r.c1):
                owner, d1, d2, sim, tm = _donor_candidates(c, store, pi, r, view, params, sid, index_and_view)
                parts.update(tm)
                t = time.perf_counter()
                b = borrow_evidence(r, owner, d1, d2, sim, params)
                parts["borrow_s"] = time.perf_counter() - t
                t = time.perf_counter()
                _copy_evidence(cur, ev, _borrowed_records(b))
                if np.isnan(b.share).any():  # donors all at similarity 0: no share, as before
                    c.execute(sql.SQL("UPDATE {} SET share = NULL WHERE borrowed AND share = 'NaN'").format(ev))
                parts["copy_borrowed_s"] = time.perf_counter() - t
                borrowed_pairs = b.pairs
            t = time.perf_counter()
            index_and_view()
            parts["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pairs = r.pairs + borrowed_pairs
        publish_snapshot(store, sid, pairs, borrowed_pairs)
    except BaseException:
        with store.tx() as c:
            _drop_snapshot_tables(c, store, sid)
            c.execute("DELETE FROM snapshots WHERE snapshot_id = %s", (sid,))
        raise
    prune_snapshots(store, keep)
    parts["publish_s"] = time.perf_counter() - t
    return Snapshot(sid, window[0], window[1], pairs, borrowed_pairs, now.triples, parts)


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


def _drop_relation(c: psycopg.Connection, store: Store, name: str) -> None:
    """DROP a view or a table by name, if it exists (snapshots before the shared pair index had a table of
    donor pairs where they now have a view)."""
    row = c.execute(
        "SELECT relkind FROM pg_class WHERE relname = %s AND relnamespace = %s::regnamespace",
        (name, f'"{store.schema}"'),
    ).fetchone()
    if row is not None:
        kind = "VIEW" if row[0] == "v" else "TABLE"
        c.execute(sql.SQL("DROP " + kind + " {}").format(store.ident(name)))


def _drop_snapshot_tables(c: psycopg.Connection, store: Store, sid: int) -> None:
    for name in (f"evidence_pairs_s{sid}", f"evidence_s{sid}", f"pair_vectors_s{sid}", f"pair_lists_s{sid}"):
        _drop_relation(c, store, name)


def prune_snapshots(store: Store, keep: int) -> list[int]:
    """Drop retired snapshots beyond the `keep` newest, except those a live release still points at; then the
    pair indexes that no snapshot uses, but the current catalogue's."""
    with store.tx() as c:
        rows = c.execute(
            "SELECT snapshot_id FROM snapshots WHERE state = 'retired' AND snapshot_id NOT IN"
            " (SELECT snapshot_id FROM releases WHERE state IN ('active', 'candidate') AND snapshot_id IS NOT NULL)"
            " ORDER BY snapshot_id DESC OFFSET %s",
            (max(keep - 1, 0),),
        ).fetchall()
        dropped = [int(r[0]) for r in rows]
        for sid in dropped:
            _drop_snapshot_tables(c, store, sid)
            c.execute("UPDATE snapshots SET state = 'dropped' WHERE snapshot_id = %s", (sid,))
    _prune_pair_indexes(store)
    return dropped


def _prune_pair_indexes(store: Store) -> None:
    current = f"pair_vectors_{catalogue_version(store)}"
    with store.tx() as c:
        unused = c.execute(
            "SELECT t.relname FROM pg_class t WHERE t.relnamespace = %s::regnamespace AND t.relkind = 'r'"
            " AND t.relname LIKE 'pair\\_vectors\\_%%' AND t.relname <> %s AND NOT EXISTS ("
            "  SELECT FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid"
            "  WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = t.oid AND w.ev_class <> t.oid)",
            (f'"{store.schema}"', current),
        ).fetchall()
        for (name,) in unused:
            _drop_relation(c, store, name)
            _drop_relation(c, store, "pair_lists_" + name.removeprefix("pair_vectors_"))


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


# Evidence for query pairs (table {q}: c1, c2, support) borrowed from their k nearest donor pairs:
# successor shares weighted by cosine similarity, never suggesting the query's own clusters. The same rule
# as borrow_evidence, in SQL, for the few pairs asked for at serving time.
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
        _search_settings(c, params.ef_search)
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
    The search walks the shared pair index with an iterative scan, which skips pairs that are not donors of
    the snapshot. On an autocommit connection this is one round trip: names are schema-qualified (no SET
    LOCAL search_path) and the search settings are session settings, set when they change."""
    query = _nearest_query(store.schema)
    args = {"c1": c1, "c2": c2, "k": k}
    if store.conn.autocommit:
        store.set_session("hnsw.ef_search", ef_search)
        store.set_session("hnsw.iterative_scan", ITERATIVE_SCAN)
        rows = store.conn.execute(query, args).fetchall()
    else:  # inside the caller's transaction: a session setting would not survive its rollback
        with store.tx() as c:
            _search_settings(c, ef_search)
            rows = c.execute(query, args).fetchall()
    return [(int(a), int(b), float(s)) for a, b, s in rows]
