"""The recommender's HTTP API and request handling, without Ray: the same FastAPI app runs inside a Ray Serve
replica (serving.py) and under plain uvicorn (the benchmark's baseline).

A release is held in memory as one immutable ``Loaded`` bundle (catalogue, transition table, popularity,
optional model, a store connection for fresh evidence). ``RecommenderService.reconfigure`` builds the next
bundle beside the current one and swaps it in with one reference assignment; a request reads the reference
once, so a response never mixes two releases. When a load fails, the current bundle keeps serving and
``/release`` says why.

Answering ``(c1, c2)`` (the last two distinct clusters, c2 the newest):
1. a table hit: the precomputed ranking (source ``model`` or ``evidence``, as the table recorded it);
2. a miss: fresh evidence for the pair (its own in the current snapshot, or borrowed from neighbour pairs),
   then the adapter ranks every cluster online within ``online_timeout_ms`` (source ``model``); past the
   limit, or without a model, the evidence answers (``evidence``); without evidence, popularity (``popular``);
3. fewer than two distinct clusters: the most popular clusters, excluding the known one (``popular``).
Short answers are filled up to ``n`` from popularity. Online rankings are cached per bundle, including those
that finished after their request had given up waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PlainValidator
from pydantic_core import PydanticCustomError

from recupdate_workloads.contract.redact import redact, redact_logs, register
from recupdate_workloads.contract.secret_file import file_env, secret_from_env
from recupdate_workloads.data.types import Catalogue, Cluster, PairEvidence, Successor
from recupdate_workloads.serving_config import DSN_ENV

log = logging.getLogger("recupdate.serving")
redact_logs(log)  # a load error may quote the DSN (libpq does), and tracebacks repeat it

MAX_RECENT = 100
MAX_N = 100
_CACHE_LIMIT = 50_000


# ---------------------------------------------------------------------------------------------------------
# Configuration and API models


class UserConfig(BaseModel):
    """A release's Serve user_config (DESIGN.md section 4) plus optional tuning knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release_id: str = Field(min_length=1, description="The release to serve.")
    adapter_uri: str | None = Field(
        None, description="LoRA adapter directory (or a full model directory); None: no online generation."
    )
    table_version: int = Field(ge=0, description="The transition table version to serve.")
    store_schema: str = Field(min_length=1, description="The policy's schema in the store.")
    dsn_env: str = Field(DSN_ENV, min_length=1, description="Environment variable holding the store DSN.")
    online_timeout_ms: float = Field(200.0, ge=0, le=60_000, description="Time limit of online generation.")
    evidence_timeout_ms: float = Field(200.0, ge=0, le=60_000, description="Time limit of a fresh evidence lookup.")
    background_swap: bool = Field(
        False, description="Load in the background and return from reconfigure() at once (for single replicas)."
    )

    def same_release(self, other: UserConfig) -> bool:
        keys = ("release_id", "adapter_uri", "table_version", "store_schema", "dsn_env")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _cluster_ref(v: Any) -> int | str:
    """One entry of recent_clusters: a cluster id or a name, with one clear error for anything else."""
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 <= v < 2**31:
            raise PydanticCustomError("cluster_id_range", "cluster ids are integers from 0 to 2147483647")
        return v
    if isinstance(v, str):
        if not 1 <= len(v) <= 200:
            raise PydanticCustomError("cluster_name_length", "cluster names have 1 to 200 characters")
        return v
    raise PydanticCustomError("cluster_ref_type", "expected a cluster id (integer) or a cluster name (string)")


ClusterRef = Annotated[int | str, PlainValidator(_cluster_ref, json_schema_input_type=int | str)]


class RecommendRequest(BaseModel):
    """What /recommend takes. Strict: numbers are not accepted as strings, nor strings as numbers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | None = Field(None, max_length=256, description="Optional caller-side user id; not used for ranking.")
    recent_clusters: list[ClusterRef] = Field(
        max_length=MAX_RECENT,
        description=(
            "The user's recent positive clusters, oldest first, newest last: cluster ids or names (names match "
            "case- and punctuation-insensitively). Consecutive repeats are collapsed; the last two distinct "
            f"clusters form the context. At most {MAX_RECENT}."
        ),
    )
    n: int = Field(10, ge=1, le=MAX_N, description=f"How many clusters to return, 1..{MAX_N}.")


Source = Literal["model", "evidence", "popular"]


class RecommendedCluster(BaseModel):
    id: int = Field(description="Cluster id.")
    name: str = Field(description="Cluster name.")
    score: float = Field(description="Log-probability (model), share (evidence) or popularity share (popular).")
    source: Source = Field(description="What produced this entry.")


class RecommendResponse(BaseModel):
    clusters: list[RecommendedCluster]
    release: str = Field(description="The release that produced every entry of this response.")


class UnknownClusters(ValueError):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("unknown clusters")
        self.errors = errors


# ---------------------------------------------------------------------------------------------------------
# The loaded release


@dataclass(frozen=True, eq=False)
class Loaded:
    """Everything one release serves with. Immutable once built, except the memo caches (which belong to
    this bundle only, so they never leak answers across releases). Swapped as one reference."""

    config: UserConfig
    catalogue: Catalogue
    table_index: dict[tuple[int, int], int]
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

    # -- request helpers (pure, in-memory) --

    def resolve(self, refs: Sequence[int | str]) -> list[int]:
        """Cluster ids of ids or names; raises UnknownClusters listing every bad entry."""
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
                        "loc": ["body", "recent_clusters", i],
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
        from psycopg import sql

        from recupdate_workloads.store.evidence import EvidenceParams, borrow_for

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
    from recupdate_workloads.train_loop import load_adapter

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if is_adapter:
        base = base_model or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"adapter {adapter_uri} names no base model and the release has none")
        model, tokenizer = load_base(base)
        model = load_adapter(model, path, merge=True)
        return model, tokenizer, str(base)
    model, tokenizer = load_base(path)
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


def load_release(cfg: UserConfig, environ: Mapping[str, str] | None = None) -> Loaded:
    """Build a bundle from the store (blocking: run it in a thread). Raises on anything that makes the
    release unservable: no DSN, no catalogue, an unpublished table, a table naming unknown clusters, an
    adapter that does not load."""
    from recupdate_workloads.model.prompt import prompt_hash
    from recupdate_workloads.store.db import Store, check_schema, connect
    from recupdate_workloads.store.registry import get_release
    from recupdate_workloads.store.tables import load_table

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
        table = load_table(store, cfg.table_version)
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
        index = {(a, b): i for i, (a, b) in enumerate(zip(table.c1.tolist(), table.c2.tolist(), strict=True))}
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


# ---------------------------------------------------------------------------------------------------------
# The service


@contextlib.contextmanager
def _short_gil_slices(seconds: float = 0.0005) -> Iterator[None]:
    """Let the event loop thread take the GIL back sooner from a loader thread (5 ms slices by default; measured
    with a 173-cluster table: event-loop lag p99 during a load 48-59 ms -> 21-22 ms). Process-wide, restored
    after; C calls that hold the GIL throughout (psycopg's fetchall, numpy conversions) are not shortened."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


RankFn = Callable[[Loaded, int, int, PairEvidence | None], tuple[tuple[int, float], ...]]
Loader = Callable[[UserConfig], Loaded]


class RecommenderService:
    """The state of one replica: the current bundle, the last reconfigure's outcome, and the worker threads
    for the store and the model (one model thread: calls queue instead of oversubscribing the CPU, and at most
    ``max_pending_model_calls`` wait; beyond that a miss is answered from evidence at once)."""

    def __init__(
        self,
        *,
        loader: Loader | None = None,
        rank_fn: RankFn = rank_online,
        max_pending_model_calls: int = 4,
        retry_delays_s: Sequence[float] = (2.0, 5.0, 15.0, 30.0, 60.0),
    ) -> None:
        self.loaded: Loaded | None = None
        self.loader: Loader = loader or (lambda cfg: load_release(cfg))
        self.rank_fn = rank_fn
        self.last_error: str | None = None
        self.last_attempt: dict[str, Any] | None = None
        self.last_attempt_at: float | None = None
        self.reconfigures = 0
        self._lock = asyncio.Lock()
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="recupdate-model")
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="recupdate-store")
        self._model_slots = threading.BoundedSemaphore(max(1, max_pending_model_calls))
        self._retry_delays = tuple(retry_delays_s)
        self._retry: asyncio.Task | None = None
        self._generation = 0
        self.loading: str | None = None
        self._replica = os.environ.get("RAY_SERVE_REPLICA_ID") or f"pid-{os.getpid()}"

    # -- releases --

    async def reconfigure(self, user_config: Mapping[str, Any]) -> bool:
        """Load the release beside the current one and swap it in. On failure keep the current one, record the
        error and retry in the background (with backoff) while this stays the target. Never raises: a raising
        reconfigure would make Serve restart the replica and drop the release that still works.

        With ``background_swap`` (and a release already serving) it returns at once and the load and swap
        happen in the background: Serve takes a replica out of routing while its reconfigure() runs, which
        with a single replica would queue every request for the whole load. Returns whether the release is
        (being) served; a later reconfigure supersedes a load still in flight."""
        self._generation += 1
        gen = self._generation
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
        cfg = dict(user_config)
        self.loading = str(cfg.get("release_id"))
        if cfg.get("background_swap") and self.loaded is not None:
            self._retry = asyncio.get_running_loop().create_task(self._attempt_then_retry(cfg, gen))
            return True
        ok = await self._attempt(cfg, gen)
        if not ok and self._retry_delays and gen == self._generation:
            self._retry = asyncio.get_running_loop().create_task(self._retry_loop(cfg, gen))
        return ok

    async def _attempt_then_retry(self, cfg: dict[str, Any], gen: int) -> None:
        if not await self._attempt(cfg, gen) and self._retry_delays:
            await self._retry_loop(cfg, gen)

    async def _retry_loop(self, cfg: dict[str, Any], gen: int) -> None:
        for delay in (*self._retry_delays, *([self._retry_delays[-1]] * 1000)):
            await asyncio.sleep(delay)
            if gen != self._generation or await self._attempt(cfg, gen):
                return

    async def _attempt(self, user_config: dict[str, Any], gen: int) -> bool:
        async with self._lock:
            if gen != self._generation:
                return False  # superseded while waiting for the lock
            self.last_attempt = user_config
            self.last_attempt_at = time.time()
            self.reconfigures += 1
            old = self.loaded
            self.loading = str(user_config.get("release_id"))
            try:
                cfg = UserConfig.model_validate(user_config)
                if old is not None and old.config.same_release(cfg):
                    new = replace(old, config=cfg)  # only tuning knobs changed: keep the data, share caches
                elif old is None:
                    new = await asyncio.to_thread(self.loader, cfg)
                else:
                    with _short_gil_slices():  # requests keep being answered while the loader thread runs
                        new = await asyncio.to_thread(self.loader, cfg)
            except Exception as exc:
                error = redact(f"{type(exc).__name__}: {exc}")  # shown by /release, /healthz and logs
                if gen == self._generation:
                    self.last_error = error
                log.error(
                    "reconfigure to %s failed; still serving %s: %s",
                    user_config.get("release_id"),
                    old.release_id if old else None,
                    error,
                    exc_info=not isinstance(exc, (LookupError, ValueError)),
                )
                return False
            finally:
                if gen == self._generation:
                    self.loading = None
            if gen != self._generation:  # a newer reconfigure arrived during the load: drop this one
                if new.store is not (old.store if old else None):
                    new.close()
                return False
            self.loaded = new  # the swap: one reference assignment
            self.last_error = None
            if old is not None and old is not new and old.store is not new.store:
                # Requests in flight hold their own reference; the old bundle's memory goes with the last one.
                asyncio.get_running_loop().call_later(30.0, old.close)
            log.info(
                "serving release %s (table v%s, adapter %s) loaded in %.2fs",
                new.release_id,
                new.config.table_version,
                new.config.adapter_uri,
                new.load_seconds,
            )
            return True

    def release_info(self) -> dict[str, Any]:
        b = self.loaded
        info: dict[str, Any] = {
            "release_id": b.release_id if b else None,
            "table_version": b.config.table_version if b else None,
            "adapter_uri": b.config.adapter_uri if b else None,
            "store_schema": b.config.store_schema if b else None,
            "base_model": b.base_model if b else None,
            "online_generation": bool(b and b.model is not None),
            "loaded_at": datetime.fromtimestamp(b.loaded_at, UTC).isoformat() if b else None,
            "load_seconds": round(b.load_seconds, 4) if b else None,
            "pairs": len(b.table_index) if b else 0,
            "clusters": len(b.catalogue) if b else 0,
            "warnings": list(b.warnings) if b else [],
            "loading": self.loading,
            "last_reconfigure_failed": self.last_error is not None,
            "last_reconfigure_error": redact(self.last_error) if self.last_error is not None else None,
            "last_reconfigure_target": (self.last_attempt or {}).get("release_id"),
            "last_reconfigure_at": (
                datetime.fromtimestamp(self.last_attempt_at, UTC).isoformat() if self.last_attempt_at else None
            ),
            "reconfigures": self.reconfigures,
            "replica": self._replica,
        }
        return info

    # -- requests --

    async def recommend(self, req: RecommendRequest) -> bytes:
        b = self.loaded  # read once: everything below uses this bundle only
        if b is None:
            raise HTTPException(503, detail=f"no release loaded yet ({self.last_error or 'loading'})")
        ids = b.resolve(req.recent_clusters)
        ctx = last_two_distinct(ids)
        n = req.n
        if len(ctx) < 2:
            entries = b.fill_popular([], set(ctx), n)
            return b.body(entries)
        c1, c2 = ctx
        row = b.table_index.get((c1, c2))
        if row is not None:
            entries, used = b.table_entries(row, n)
            used.update(ctx)
        else:
            entries, used = await self._miss(b, c1, c2, n)
        return b.body(b.fill_popular(entries, used, n))

    async def _miss(self, b: Loaded, c1: int, c2: int, n: int) -> tuple[list[str], set[int]]:
        loop = asyncio.get_running_loop()
        key = (c1, c2)
        ev: PairEvidence | None = None
        if key in b.evidence_cache:
            ev = b.evidence_cache[key]
        elif b.store is not None and b.config.evidence_timeout_ms > 0:
            fut = loop.run_in_executor(self._io_pool, b.evidence_for, c1, c2)
            try:
                ev = await asyncio.wait_for(asyncio.shield(fut), b.config.evidence_timeout_ms / 1000)
            except TimeoutError:
                log.warning("evidence for %s past %.0f ms", key, b.config.evidence_timeout_ms)
            except Exception as exc:
                log.warning("evidence for %s failed: %s", key, exc)
        ranked = b.model_cache.get(key) if b.model is not None else None
        if ranked is None and b.model is not None and b.config.online_timeout_ms > 0:
            if self._model_slots.acquire(blocking=False):
                fut2 = loop.run_in_executor(self._model_pool, self._rank_and_cache, b, c1, c2, ev)
                try:
                    ranked = await asyncio.wait_for(asyncio.shield(fut2), b.config.online_timeout_ms / 1000)
                except TimeoutError:
                    pass  # the ranking goes on in its thread and lands in the cache for the next request
                except Exception as exc:
                    log.warning("online generation for %s failed: %s", key, exc)
            else:
                log.debug("model busy; answering %s from evidence", key)
        if ranked:
            return b.ranked_entries(ranked, "model", n, {c1, c2})
        if ev is not None and ev.successors:
            return b.ranked_entries([(s.cluster, s.share) for s in ev.successors], "evidence", n, {c1, c2})
        return [], {c1, c2}

    def _rank_and_cache(
        self, b: Loaded, c1: int, c2: int, ev: PairEvidence | None
    ) -> tuple[tuple[int, float], ...] | None:
        try:
            ranked = self.rank_fn(b, c1, c2, ev)
            _bounded_put(b.model_cache, (c1, c2), ranked)
            return ranked
        finally:
            self._model_slots.release()

    def shutdown(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._model_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------
# The HTTP API


def _summary(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            where = list(e.get("loc", ()))
            why = (e.get("ctx") or {}).get("error") or e.get("msg")
            parts.append(f"body: invalid JSON at character {where[-1] if len(where) > 1 else 0}: {why}")
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def _safe(v: Any, limit: int = 200) -> Any:
    """A value as echoed back in an error: JSON-safe (no inf/nan) and short."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else str(v)
    text = v if isinstance(v, str) else json.dumps(jsonable_encoder(v), default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _invalid(errors: Sequence[Mapping[str, Any]], hint: str = "") -> JSONResponse:
    errs = []
    for e in errors:
        out = {k: e[k] for k in ("type", "loc", "msg") if k in e}
        out["loc"] = list(out.get("loc", ()))
        if "input" in e:
            out["input"] = _safe(e["input"])
        if e.get("ctx"):
            out["ctx"] = {str(k): _safe(v) for k, v in e["ctx"].items()}
        errs.append(out)
    return JSONResponse(status_code=422, content={"message": hint + _summary(errs), "detail": errs})


def make_api(service: RecommenderService, lifespan: Any = None) -> FastAPI:
    """The FastAPI app over a service: POST /recommend, GET /healthz, GET /release."""
    api = FastAPI(
        title="recupdate recommender",
        description="Next novel interest clusters from the transition table of the active release.",
        version="1",
        lifespan=lifespan,
    )

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        hint = "" if "json" in ctype else f"send Content-Type: application/json (got {ctype or 'none'!r}); "
        return _invalid(exc.errors(), hint)

    @api.exception_handler(UnknownClusters)
    async def _on_unknown(request: Request, exc: UnknownClusters) -> JSONResponse:
        return _invalid(exc.errors)

    @api.post(
        "/recommend",
        response_model=RecommendResponse,
        responses={422: {"description": "Invalid request: the message says what and where."}},
    )
    async def recommend(req: RecommendRequest) -> Response:
        return Response(content=await service.recommend(req), media_type="application/json")

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        b = service.loaded
        if b is None:
            return JSONResponse(status_code=503, content={"status": "loading", "error": service.last_error})
        return JSONResponse({"status": "ok", "release": b.release_id})

    @api.get("/release")
    async def release() -> JSONResponse:
        return JSONResponse(service.release_info())

    return api


USER_CONFIG_ENV = "RECUPDATE_SERVE_USER_CONFIG"


def create_app() -> FastAPI:
    """The same app without Ray, for ``uvicorn --factory recupdate_workloads.serving_app:create_app``: the release
    comes from ``$RECUPDATE_SERVE_USER_CONFIG`` (a user_config as JSON) and loads at start-up."""
    from contextlib import asynccontextmanager

    service = RecommenderService()
    raw = os.environ.get(USER_CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"set ${USER_CONFIG_ENV} to a release's user_config (JSON)")
    user_config = json.loads(raw)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if not await service.reconfigure(user_config):
            log.error("release failed to load: %s", service.last_error)
        yield
        service.shutdown()

    return make_api(service, lifespan=lifespan)
