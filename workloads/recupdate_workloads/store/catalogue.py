"""The catalogue and the interaction log in the store: clusters (with embeddings), items, interactions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.embeddings import embed_texts

# Binary COPY rows of (int8 user, int8 item, int8 ts, float4 weight): fixed 46 bytes, parsed by numpy.
_ROW = np.dtype(
    [("n", ">i2"), ("l1", ">i4"), ("user", ">i8"), ("l2", ">i4"), ("item", ">i8"), ("l3", ">i4"), ("ts", ">i8"),
     ("l4", ">i4"), ("weight", ">f4")]
)  # fmt: skip
_HEADER = 19  # PGCOPY signature (11) + flags (4) + header extension length (4)


def save_catalogue(store: Store, catalogue: Catalogue, item_cluster: np.ndarray, embed: bool = True) -> None:
    """Replace the clusters and items (idempotent for the same catalogue); clusters get MiniLM embeddings."""
    vectors = embed_texts([f"{c.name}: {c.description}" for c in catalogue.clusters]) if embed else None
    with store.tx() as conn:
        conn.execute("TRUNCATE items")
        conn.execute("DELETE FROM clusters")
        with conn.cursor().copy("COPY clusters (cluster, name, keywords, embedding) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "text[]", "vector"])
            for c in catalogue.clusters:
                cp.write_row((c.id, c.name, list(c.keywords), None if vectors is None else vectors[c.id]))
        with conn.cursor().copy("COPY items (item_id, cluster) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "int4"])
            for i, cl in enumerate(item_cluster.tolist()):
                cp.write_row((i, cl))


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
    rows = np.empty(len(log), dtype=_ROW)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 8, 8, 8, 4
    rows["user"], rows["item"], rows["ts"], rows["weight"] = log.user, log.item, log.ts, log.weight
    header = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
    with store.tx() as conn, conn.cursor().copy("COPY interactions FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(header)
        view = rows.tobytes()
        step = 46 * 65536
        for i in range(0, len(view), step):
            cp.write(view[i : i + step])
        cp.write(b"\xff\xff")
    return len(log)


def iter_interactions(
    store: Store,
    start: int | None,
    end: int | None,
    item_cluster: np.ndarray,
    catalogue: Catalogue,
    rows_per_chunk: int = 1_000_000,
) -> Iterator[InteractionLog]:
    """Stream interactions with start <= ts < end, ordered by user then time, in chunks of whole users
    (a user's history never straddles two chunks), so refreshes never hold the whole log in Python."""
    cond, params = [], []
    if start is not None:
        cond.append("ts >= %s")
        params.append(start)
    if end is not None:
        cond.append("ts < %s")
        params.append(end)
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    query = (
        "COPY (SELECT user_id, item_id, ts, weight FROM interactions "
        f"{where} ORDER BY user_id, ts, item_id) TO STDOUT (FORMAT BINARY)"
    )
    pending = bytearray()
    carry: np.ndarray | None = None
    with store.tx() as conn, conn.cursor() as cur, cur.copy(query, params) as cp:  # type: ignore[arg-type]
        first = True
        for block in cp:  # PostgreSQL sends one message per row: batch them before parsing
            pending += block
            if first:
                del pending[:_HEADER]
                first = False
            if len(pending) < min(1 << 22, rows_per_chunk * _ROW.itemsize):
                continue
            carry = _take_rows(pending, carry)
            if carry is None or len(carry) < rows_per_chunk:
                continue
            users = carry["user"]
            cut = int(np.searchsorted(users, users[-1]))  # keep the last (maybe incomplete) user for later
            if cut > 0:
                yield _to_log(carry[:cut], item_cluster, catalogue)
                carry = carry[cut:]
        carry = _take_rows(pending, carry)
    if carry is not None and len(carry):
        yield _to_log(carry, item_cluster, catalogue)


def _take_rows(pending: bytearray, carry: np.ndarray | None) -> np.ndarray | None:
    """Move the whole rows at the front of `pending` onto `carry` (the 2-byte trailer stays behind)."""
    n = len(pending) // _ROW.itemsize
    if n == 0:
        return carry
    rows = np.frombuffer(bytes(pending[: n * _ROW.itemsize]), dtype=_ROW)
    del pending[: n * _ROW.itemsize]
    return rows if carry is None else np.concatenate([carry, rows])


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
