"""One release in memory: the immutable ``Loaded`` bundle (catalogue, transition table, popularity, optional
model, a store connection for fresh evidence), and how it is loaded from the store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql

from recupdate_workloads.contract.env import env_number
from recupdate_workloads.contract.redact import register
from recupdate_workloads.contract.secret_file import file_env, secret_from_env
from recupdate_workloads.contract.serve import UserConfig
from recupdate_workloads.data.types import Catalogue, Cluster, PairEvidence, Successor
from recupdate_workloads.serving.schema import UnknownClusters
from recupdate_workloads.store.db import Store, check_schema, connect
from recupdate_workloads.store.evidence import EvidenceParams, borrow_for
from recupdate_workloads.store.registry import get_release
from recupdate_workloads.store.tables import load_table

log = logging.getLogger("recupdate.serving")

_CACHE_LIMIT = 50_000


class PairIndex(Mapping[tuple[int, int], int]):
    """The table's pairs as one sorted int64 array (c1 << 32 | c2): ``get((c1, c2))`` is the row, by binary
    search. Built with numpy alone, so a load holds the GIL for milliseconds, not seconds; measured at 1M pairs,
    a dict of tuples took 5.0 s and 165 MiB against 8 MiB here. A lookup costs ~5 us against a dict's 0.3."""

    __slots__ = ("packed",)

    def __init__(self, c1: np.ndarray, c2: np.ndarray) -> None:
        keys = (np.asarray(c1, np.int64) << 32) | np.asarray(c2, np.int64)
        if keys.size > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise ValueError("table pairs must be unique and sorted by (c1, c2)")
        self.packed = keys

    def get(self, key: tuple[int, int], default: Any = None) -> Any:  # type: ignore[override]
        c1, c2 = key
        if not (0 <= c1 < 2**31 and 0 <= c2 < 2**31):
            return default
        k = c1 << 32 | c2
        i = int(self.packed.searchsorted(k))
        return i if i < self.packed.size and int(self.packed[i]) == k else default

    def __getitem__(self, key: tuple[int, int]) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return int(row)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((int(k) >> 32, int(k) & 0xFFFFFFFF) for k in self.packed)

    def __len__(self) -> int:
        return int(self.packed.size)


@dataclass(frozen=True, eq=False)
class Loaded:
    """Everything one release serves with. Immutable once built, except the memo caches (which belong to
    this bundle only, so they never leak answers across releases). Swapped as one reference."""

    config: UserConfig
    catalogue: Catalogue
    table_index: Mapping[tuple[int, int], int]  # a PairIndex when loaded from the store
    table_ids: np.ndarray
    table_scores: np.ndarray
    table_source: np.ndarray
    popular: tuple[tuple[int, float], ...]
    model: Any = None
    tokenizer: Any = None
    store: Any = None  # a Store; None for in-memory bundles (tests)
    base_model: str | None = None
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    db_lock: threading.Lock = field(default_factory=threading.Lock)
    evidence_cache: dict[tuple[int, int], PairEvidence | None] = field(default_factory=dict)
    model_cache: dict[tuple[int, int], tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON fragments computed once per bundle: names and the release label.
        object.__setattr__(self, "_name_json", [json.dumps(c.name) for c in self.catalogue.clusters])
        object.__setattr__(self, "_release_json", json.dumps(self.config.release_id))
        object.__setattr__(self, "_by_name", {c.name: c.id for c in self.catalogue.clusters})

    @property
    def release_id(self) -> str:
        return self.config.release_id

    @property
    def release_json(self) -> bytes:
        return self._release_json.encode()  # type: ignore[attr-defined]

    # -- request helpers (pure, in-memory) --

    def resolve(self, refs: Sequence[int | str], loc: Sequence[str | int] = ("body",)) -> list[int]:
        """Cluster ids of ids or names; raises UnknownClusters listing every bad entry (at ``loc`` +
        recent_clusters + its index: a batch names the item too)."""
        n = len(self.catalogue)
        out: list[int] = []
        errors: list[dict[str, Any]] = []
        for i, r in enumerate(refs):
            if isinstance(r, int):
                c: int | None = r if r < n else None
            else:
                c = self._by_name.get(r)  # type: ignore[attr-defined]
                if c is None:
                    c = self.catalogue.lookup(r)
            if c is None:
                errors.append(
                    {
                        "type": "unknown_cluster",
                        "loc": [*loc, "recent_clusters", i],
                        "msg": f"unknown cluster {r!r} (release {self.release_id} has ids 0..{n - 1})",
                        "input": r,
                    }
                )
            else:
                out.append(c)
        if errors:
            raise UnknownClusters(errors)
        return out

    def entry(self, cluster: int, score: float, source: str) -> str:
        score = float(score)
        s = f"{score:.6g}" if np.isfinite(score) else "null"
        return f'{{"id":{cluster},"name":{self._name_json[cluster]},"score":{s},"source":"{source}"}}'  # type: ignore[attr-defined]

    def body(self, entries: list[str]) -> bytes:
        return f'{{"clusters":[{",".join(entries)}],"release":{self._release_json}}}'.encode()  # type: ignore[attr-defined]

    def table_entries(self, row: int, n: int) -> tuple[list[str], set[int]]:
        ids = self.table_ids[row]
        scores = self.table_scores[row]
        src = "evidence" if int(self.table_source[row]) == 1 else "model"
        out: list[str] = []
        used: set[int] = set()
        for c, s in zip(ids[:n].tolist(), scores[:n].tolist(), strict=True):
            if c < 0:
                break
            out.append(self.entry(c, s, src))
            used.add(c)
        return out, used

    def fill_popular(self, entries: list[str], used: set[int], n: int) -> list[str]:
        for c, s in self.popular:
            if len(entries) >= n:
                break
            if c not in used:
                entries.append(self.entry(c, s, "popular"))
                used.add(c)
        return entries

    def ranked_entries(
        self, ranked: Sequence[tuple[int, float]], source: str, n: int, exclude: set[int]
    ) -> tuple[list[str], set[int]]:
        out: list[str] = []
        used = set(exclude)
        for c, s in ranked:
            if len(out) >= n:
                break
            if c not in used:
                out.append(self.entry(c, s, source))
                used.add(c)
        return out, used

    # -- store access (blocking; called from worker threads) --

    def evidence_for(self, c1: int, c2: int) -> PairEvidence | None:
        """Fresh evidence for a pair: its own in the current snapshot, else borrowed from its nearest pairs
        (pgvector). Memoised per bundle; errors propagate (and are not memoised)."""
        key = (c1, c2)
        if key in self.evidence_cache:
            return self.evidence_cache[key]
        if self.store is None:
            return None

        with self.db_lock, self.store.tx() as c:
            rows = c.execute(
                sql.SQL(
                    "SELECT support, successor, count, share, score, borrowed FROM {} WHERE c1 = %s AND c2 = %s"
                    " ORDER BY rank"
                ).format(self.store.ident("evidence")),
                (c1, c2),
            ).fetchall()
        if rows:
            ev: PairEvidence | None = PairEvidence(
                c1=c1,
                c2=c2,
                support=int(rows[0][0]),
                successors=tuple(Successor(int(r[1]), float(r[3]), int(r[2]), float(r[4]), bool(r[5])) for r in rows),
            )
        else:
            with self.db_lock:
                ev = borrow_for(self.store, [key], EvidenceParams()).get(key)
        _bounded_put(self.evidence_cache, key, ev)
        return ev

    def close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self.store.close()


def _bounded_put(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread got there first
            cache.pop(next(iter(cache)))
    cache[key] = value


def last_two_distinct(ids: Sequence[int]) -> list[int]:
    """The context: collapse consecutive repeats, keep the last two (distinct by construction), oldest first."""
    out: list[int] = []
    for c in reversed(ids):
        if not out or out[-1] != c:
            out.append(c)
            if len(out) == 2:
                break
    return out[::-1]


# ---------------------------------------------------------------------------------------------------------
# Loading a release from the store


def _load_clusters(store: Any) -> Catalogue:
    """Clusters only (catalogue.load_catalogue also reads every item, which serving never needs)."""
    with store.tx() as c:
        rows = c.execute("SELECT cluster, name, keywords FROM clusters ORDER BY cluster").fetchall()
    return Catalogue([Cluster(id=int(r[0]), name=r[1], keywords=tuple(r[2] or ())) for r in rows])


def _popularity(store: Any, n_clusters: int, table_ids: np.ndarray) -> tuple[tuple[int, float], ...]:
    """Clusters ranked by how often they follow a pair in the current evidence window (own evidence, not
    borrowed); without evidence, by how often (and how high) the table recommends them; then by id."""
    weight = np.zeros(n_clusters, np.float64)
    try:
        with store.tx() as c:
            rows = c.execute(
                "SELECT successor, sum(count) FROM evidence WHERE NOT borrowed GROUP BY successor"
            ).fetchall()
        for cl, cnt in rows:
            if 0 <= int(cl) < n_clusters:
                weight[int(cl)] = float(cnt)
    except Exception as exc:  # no snapshot yet: the view does not exist
        log.info("no evidence for popularity (%s); using the table", type(exc).__name__)
    if weight.sum() == 0 and table_ids.size:
        ranks = np.broadcast_to(np.arange(1, table_ids.shape[1] + 1), table_ids.shape)
        ok = table_ids >= 0
        np.add.at(weight, table_ids[ok], 1.0 / ranks[ok])
    total = weight.sum()
    share = weight / total if total > 0 else weight
    order = np.lexsort((np.arange(n_clusters), -weight))
    return tuple((int(c), float(share[c])) for c in order)


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def load_model(adapter_uri: str, base_model: str | None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, base) for online ranking. ``adapter_uri`` is a PEFT adapter directory (its base is
    ``base_model``, else the adapter's ``base_model_name_or_path``), or a full model directory. The only call
    sites of the model package's loading API."""
    path = _local_path(adapter_uri)
    is_adapter = (path / "adapter_config.json").exists()
    if not is_adapter and not (path / "config.json").exists():
        raise FileNotFoundError(f"no adapter or model at {adapter_uri}")
    import torch

    from recupdate_workloads.model.bootstrap import load_base
    from recupdate_workloads.model.hf import default_device, default_dtype
    from recupdate_workloads.model.train_loop import load_adapter

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = default_device()  # the replica's GPU when serving.resources gives it one
    if is_adapter:
        base = base_model or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"adapter {adapter_uri} names no base model and the release has none")
        model, tokenizer = load_base(base, device=device, dtype=default_dtype(device))
        model = load_adapter(model, path, merge=True)
        return model, tokenizer, str(base)
    model, tokenizer = load_base(path, device=device, dtype=default_dtype(device))
    return model, tokenizer, str(path)


def rank_online(bundle: Loaded, c1: int, c2: int, evidence: PairEvidence | None) -> tuple[tuple[int, float], ...]:
    """Every cluster but c1 and c2, ranked by the model for the RAG prompt of (c1, c2): the only call sites of
    the model package's prompt and ranking API."""
    from recupdate_workloads.model.generate import rank_clusters
    from recupdate_workloads.model.prompt import render

    prompt = render(bundle.catalogue, c1, c2, evidence, with_evidence=True)
    ids, scores = rank_clusters(
        bundle.model,
        bundle.tokenizer,
        bundle.catalogue,
        [prompt],
        top_n=len(bundle.catalogue),
        exclude=np.array([[c1, c2]]),
    )
    return tuple((int(c), float(s)) for c, s in zip(ids[0], scores[0], strict=True) if c not in (c1, c2))


def canary_config(cfg: UserConfig) -> UserConfig | None:
    """The second slot of a replica: the UserConfig of the canary candidate in ``cfg`` (its own release id,
    table and adapter; the schema, DSN and knobs of the served release), or None without a canary."""
    c = cfg.canary
    if c is None:
        return None
    return cfg.model_copy(
        update={
            "release_id": c.release_id,
            "adapter_uri": c.adapter_uri,
            "table_version": c.table_version,
            "canary": None,
        }
    )


#: The share of time a background swap's table load may work (store.tables.load_table's ``duty``), so that the
#: replica and its PostgreSQL backend leave the cores to the requests still being answered (docs/serving.md).
SWAP_DUTY = 0.5
SWAP_DUTY_ENV = "RECUPDATE_SERVE_SWAP_DUTY"


def swap_duty(environ: Mapping[str, str] | None = None) -> float:
    """``$RECUPDATE_SERVE_SWAP_DUTY`` (a number in (0, 1]; 1: no bound) when set, else SWAP_DUTY."""
    return env_number(
        SWAP_DUTY_ENV, SWAP_DUTY, environ, parse=float, valid=lambda v: 0 < v <= 1, expect="a number in (0, 1]"
    )


def load_release(cfg: UserConfig, environ: Mapping[str, str] | None = None, *, duty: float = 1.0) -> Loaded:
    """Build a bundle from the store (blocking: run it in a thread). Raises on anything that makes the
    release unservable: no DSN, no catalogue, an unpublished table, a table naming unknown clusters, an
    adapter that does not load. ``duty`` < 1 bounds the table load's rate (a background swap)."""
    from recupdate_workloads.model.prompt import prompt_hash

    t0 = time.perf_counter()
    env = os.environ if environ is None else environ
    dsn = secret_from_env(cfg.dsn_env, env)
    if not dsn:
        raise RuntimeError(f"${cfg.dsn_env} is not set in the replica (nor ${file_env(cfg.dsn_env)}, a file with it)")
    register(dsn)  # before connecting: libpq's errors may quote the DSN or parts of its password
    store = Store(dsn=dsn, schema=check_schema(cfg.store_schema), conn=connect(dsn))
    warnings: list[str] = []
    try:
        if store.conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (cfg.store_schema,)).fetchone() is None:
            raise LookupError(f"schema {cfg.store_schema} does not exist in the store")
        catalogue = _load_clusters(store)
        if not len(catalogue):
            raise LookupError(f"schema {cfg.store_schema} has no clusters")
        table = load_table(store, cfg.table_version, duty=duty)
        if table.ids.size and int(table.ids.max()) >= len(catalogue):
            raise ValueError(f"table v{cfg.table_version} names clusters beyond the catalogue ({len(catalogue)})")
        rel = get_release(store, cfg.release_id)
        if rel is None:
            warnings.append(f"release {cfg.release_id} is not in the registry")
        else:
            if rel.table_version is not None and rel.table_version != cfg.table_version:
                warnings.append(f"registry says table v{rel.table_version}, user_config v{cfg.table_version}")
            if rel.adapter_uri != cfg.adapter_uri:
                warnings.append(f"registry says adapter {rel.adapter_uri}, user_config {cfg.adapter_uri}")
        model = tokenizer = base = None
        if cfg.adapter_uri:
            if rel is not None and rel.prompt_hash and rel.prompt_hash != prompt_hash():
                warnings.append("release prompt hash differs from this image's template: online generation off")
            else:
                rel_base = rel.base_model if rel is not None and rel.base_model else None
                model, tokenizer, base = load_model(cfg.adapter_uri, rel_base)
        index = PairIndex(table.c1, table.c2)  # load_table returns the pairs sorted and unique
        bundle = Loaded(
            config=cfg,
            catalogue=catalogue,
            table_index=index,
            table_ids=table.ids,
            table_scores=table.scores,
            table_source=table.source,
            popular=_popularity(store, len(catalogue), table.ids),
            model=model,
            tokenizer=tokenizer,
            store=store,
            base_model=base,
            load_seconds=time.perf_counter() - t0,
            warnings=tuple(warnings),
        )
    except BaseException:
        store.close()
        raise
    for w in warnings:
        log.warning("release %s: %s", cfg.release_id, w)
    return bundle
