"""The catalogue and the interaction log in the store: clusters (with embeddings), items, interactions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.embeddings import embed_texts

#: Binary COPY rows of (int8 user, int8 item, int8 ts, float4 weight): fixed 46 bytes, built and parsed by numpy.
COPY_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("user", ">i8"),
        ("l2", ">i4"),
        ("item", ">i8"),
        ("l3", ">i4"),
        ("ts", ">i8"),
        ("l4", ">i4"),
        ("weight", ">f4"),
    ]
)


def save_catalogue(
    store: Store,
    catalogue: Catalogue,
    item_cluster: np.ndarray,
    embed: bool = True,
    item_names: list[str] | None = None,
) -> None:
    """Replace the clusters and items (idempotent for the same catalogue); clusters get MiniLM embeddings.

    Local mode's path (ids are the loader's dense ids). External ids: a cluster's name, an item's `item_names`
    entry (default: its id as text). Real data goes through store.ingest.write_catalogue instead, which
    updates by external id and never deletes."""
    if item_names is not None and len(item_names) != len(item_cluster):
        raise ValueError("item_names must name every item")
    vectors = embed_texts([f"{c.name}: {c.description}" for c in catalogue.clusters]) if embed else None
    with store.tx() as conn:
        conn.execute("TRUNCATE items")
        conn.execute("DELETE FROM clusters")
        copy = "COPY clusters (cluster, name, keywords, embedding, external) FROM STDIN (FORMAT BINARY)"
        with conn.cursor().copy(copy) as cp:
            cp.set_types(["int4", "text", "text[]", "vector", "text"])
            for c in catalogue.clusters:
                cp.write_row((c.id, c.name, list(c.keywords), None if vectors is None else vectors[c.id], c.name))
        with conn.cursor().copy("COPY items (item_id, cluster, external) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "int4", "text"])
            for i, cl in enumerate(item_cluster.tolist()):
                cp.write_row((i, cl, item_names[i] if item_names is not None else str(i)))


def load_catalogue(store: Store) -> tuple[Catalogue, np.ndarray]:
    """The catalogue and the dense item -> cluster array."""
    with store.tx() as conn:
        rows = conn.execute("SELECT cluster, name, keywords FROM clusters ORDER BY cluster").fetchall()
        items = conn.execute("SELECT item_id, cluster FROM items ORDER BY item_id").fetchall()
    catalogue = Catalogue([Cluster(id=r[0], name=r[1], keywords=tuple(r[2])) for r in rows])
    item_cluster = np.zeros(len(items), dtype=np.int32)
    if items:
        arr = np.asarray(items, dtype=np.int64)
        item_cluster = np.zeros(int(arr[:, 0].max()) + 1, dtype=np.int32)
        item_cluster[arr[:, 0]] = arr[:, 1]
    return catalogue, item_cluster


def append_interactions(store: Store, log: InteractionLog) -> int:
    """Append interactions with binary COPY. Returns the number of rows written."""
    rows = np.empty(len(log), dtype=COPY_ROW)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 8, 8, 8, 4
    rows["user"], rows["item"], rows["ts"], rows["weight"] = log.user, log.item, log.ts, log.weight
    header = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
    copy = "COPY interactions (user_id, item_id, ts, weight) FROM STDIN (FORMAT BINARY)"
    with store.tx() as conn, conn.cursor().copy(copy) as cp:
        cp.write(header)
        view = rows.tobytes()
        step = 46 * 65536
        for i in range(0, len(view), step):
            cp.write(view[i : i + step])
        cp.write(b"\xff\xff")
    return len(log)


#: Records of (user, item, ts, weight) as PostgreSQL's int8send/float4send write them: 28 bytes, big-endian.
_REC = np.dtype([("user", ">i8"), ("item", ">i8"), ("ts", ">i8"), ("weight", ">f4")])
#: At most this many user ids per message of iter_interactions (fewer when users have long histories)...
USERS_PER_BLOCK = 1000
#: ...so that a message holds about this many rows (28 MB), far below PostgreSQL's 1 GB cap on one bytea.
ROWS_PER_BLOCK = 1_000_000


#: What splits users into shards (its value modulo the number of shards): PostgreSQL's hash of the bigint
#: id, made non-negative, so that shards are even whatever the ids, and each user falls in exactly one.
USER_SHARD_SQL = "(hashint8(user_id) & 2147483647)"


def block_size(store: Store) -> int:
    """User ids per packed block: USERS_PER_BLOCK, or fewer where the planner's statistics (reltuples and
    n_distinct of user_id, from ANALYZE or autovacuum) say users hold more than ROWS_PER_BLOCK / USERS_PER_BLOCK
    interactions each. Without statistics, USERS_PER_BLOCK."""
    with store.tx() as conn:
        row = conn.execute(
            "SELECT c.reltuples, s.n_distinct FROM pg_class c LEFT JOIN pg_stats s"
            " ON s.schemaname = %s AND s.tablename = 'interactions' AND s.attname = 'user_id'"
            " WHERE c.oid = 'interactions'::regclass",
            (store.schema,),
        ).fetchone()
    if row is None or row[0] is None or row[1] is None or row[0] <= 0 or row[1] == 0:
        return USERS_PER_BLOCK
    rows, distinct = float(row[0]), float(row[1])
    users = -distinct * rows if distinct < 0 else distinct  # negative: a fraction of the rows
    per_user = rows / max(users, 1.0)
    return max(1, min(USERS_PER_BLOCK, int(ROWS_PER_BLOCK / per_user)))


def iter_interactions(
    store: Store,
    start: int | None,
    end: int | None,
    item_cluster: np.ndarray,
    catalogue: Catalogue,
    rows_per_chunk: int = 1_000_000,
    users_per_block: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[InteractionLog]:
    """Stream interactions with start <= ts < end, ordered by user then time (ties by item), in chunks of whole
    users (a user's history never straddles two chunks), so refreshes never hold the whole log in Python.
    A chunk is whole blocks of `users_per_block` user ids (default: block_size(store)), with at least
    `rows_per_chunk` rows but in the last. A single user with more than ~38M rows in the window would exceed
    PostgreSQL's 1 GB limit on one value.

    PostgreSQL packs each block of users into one bytea of fixed records (string_agg, ordered), which numpy
    reads in place: a row-by-row COPY TO STDOUT sends one protocol message per row, and handling those in
    Python cost more than PostgreSQL's own scan and sort (measured in benchmarks/bench_evidence.py).

    shard=(i, n): only the users whose id hashes to i modulo n (USER_SHARD_SQL), so that n readers split a window
    by user. A block then holds about 1/n of its user ids, so blocks span n times as many ids."""
    cond, params = [], []
    if start is not None:
        cond.append("ts >= %s")
        params.append(start)
    if end is not None:
        cond.append("ts < %s")
        params.append(end)
    n_shards = 1
    if shard is not None:
        index, n_shards = int(shard[0]), int(shard[1])
        if not 0 <= index < n_shards:
            raise ValueError(f"shard {index} of {n_shards}: need 0 <= index < count")
        cond.append(f"{USER_SHARD_SQL} %% %s = %s")
        params += [n_shards, index]
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    # user_id / block truncates toward zero: monotone, so blocks keep user order
    block = int(users_per_block) if users_per_block else block_size(store) * n_shards
    query = (
        "SELECT string_agg(int8send(user_id) || int8send(item_id) || int8send(ts) || float4send(weight),"
        f" ''::bytea ORDER BY user_id, ts, item_id) FROM interactions {where}"
        f" GROUP BY user_id / {block} ORDER BY user_id / {block}"
    )
    with store.tx() as conn, conn.cursor(name="iter_interactions", binary=True) as cur:
        cur.itersize = 8
        cur.execute(query, params)
        blocks: list[bytes] = []
        rows = 0
        for (b,) in cur:
            blocks.append(b)
            rows += len(b) // _REC.itemsize
            if rows >= rows_per_chunk:
                yield _to_log(np.frombuffer(b"".join(blocks), dtype=_REC), item_cluster, catalogue)
                blocks, rows = [], 0
        if blocks:
            yield _to_log(np.frombuffer(b"".join(blocks), dtype=_REC), item_cluster, catalogue)


def _to_log(rows: np.ndarray, item_cluster: np.ndarray, catalogue: Catalogue) -> InteractionLog:
    return InteractionLog(
        user=rows["user"].astype(np.int64),
        item=rows["item"].astype(np.int64),
        ts=rows["ts"].astype(np.int64),
        weight=rows["weight"].astype(np.float32),
        item_cluster=item_cluster,
        catalogue=catalogue,
    )


def count_interactions(store: Store) -> int:
    with store.tx() as conn:
        row = conn.execute("SELECT count(*) FROM interactions").fetchone()
    return int(row[0]) if row else 0
