"""What the fine-tune and refresh entrypoints do. Each registers its run and a candidate release in the
store; neither activates anything (the controller decides, docs/architecture.md).

Both begin with the sync step (store/sync.py): what is new in the policy's data sources goes into the store.
fine-tune: curated triples of the window, each with the evidence as of its time -> LoRA on Ray Train ->
           gates on the held-out slice -> new evidence snapshot -> bulk inference -> candidate release.
refresh:   new evidence snapshot -> bulk inference with the active adapter -> gates -> candidate release.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recupdate_workloads.contract import entrypoints
from recupdate_workloads.contract.env import DSN_ENV, SYNC_ENV
from recupdate_workloads.contract.redact import redact_logs
from recupdate_workloads.data import evidence as evidence_mem
from recupdate_workloads.data.drift import MIN_SUPPORT, window_drift
from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.sequences import triples as to_triples
from recupdate_workloads.data.types import Catalogue, Triples
from recupdate_workloads.jobs import counting
from recupdate_workloads.jobs.change import table_change
from recupdate_workloads.jobs.config import RunConfig
from recupdate_workloads.jobs.gates import GateThresholds, gates, hits, lookup_predictions
from recupdate_workloads.jobs.materialize import materialize, publish
from recupdate_workloads.model.predictor import Predictor, local_path
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import evidence as ev
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store import tables
from recupdate_workloads.store.db import Store, open_store
from recupdate_workloads.store.owner import SchemaOwnedError
from recupdate_workloads.store.sync import sync as data_sync

log = logging.getLogger("recupdate.jobs")
TABLE_TOP_N = 10


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_triples(store: Store, start: int, end: int, threshold: float) -> tuple[Catalogue, Triples]:
    """Triples with start <= ts < end; contexts may reach back one more window before start."""
    catalogue, item_cluster = cat.load_catalogue(store)
    if not len(catalogue):
        raise RuntimeError(
            f"schema {store.schema} has no catalogue: name an items source in spec.data (docs/data.md), or load "
            "one with `recupdate ingest`"
        )
    lookback = start - (end - start)
    chunks = cat.iter_interactions(store, lookback, end, item_cluster, catalogue)
    parts = [to_triples(chunk, threshold).window(start, end) for chunk in chunks]
    if not parts:
        z = np.zeros(0, np.int32)
        return catalogue, Triples(np.zeros(0, np.int64), np.zeros(0, np.int64), z, z, z)
    return catalogue, Triples(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "ts", "c1", "c2", "c_next"))
    )


def refresh_snapshot(store: Store, cfg: RunConfig, end: int, catalogue: Catalogue) -> ev.Snapshot:
    """Count the retrieval window ending at `end` and publish it as the current evidence snapshot. The counting
    is split by user over the run's Ray cluster when it has several workers or the window is large
    (jobs/counting.py)."""
    start = end - cfg.retrieval_window

    def count(a: int, b: int) -> ev.Counts:
        workers, cpus, executor = cfg.workers, cfg.cpus_per_worker, cfg.executor
        n = len(catalogue)
        return counting.count_for_run(
            store, a, b, cfg.positive_threshold, n, workers=workers, cpus_per_worker=cpus, executor=executor
        )

    prev = count(start - cfg.retrieval_window, start) if cfg.scoring == "trend" else None
    params = ev.EvidenceParams(
        top_r=cfg.top_successors, min_support=cfg.min_support, scoring=cfg.scoring, neighbours=cfg.neighbours
    )
    return ev.build_snapshot(store, count(start, end), (start, end), params, prev=prev)


def evidence_as_of(history: Triples, cfg: RunConfig, catalogue: Catalogue) -> evidence_mem.Lookup:
    """Each example's evidence as of its own time, refreshed often (``data.evidence.training_evidence``: with a
    refresh per quarter window the model learnt to memorise pairs instead of reading their evidence)."""
    n = len(catalogue)
    return evidence_mem.training_evidence(history, n, cfg.retrieval_window, cfg.top_successors, cfg.min_support)


def _artifacts(cfg: RunConfig) -> Path:
    return Path(local_path(cfg.storage)).absolute() / cfg.store_schema


def ensure_base(store: Store, cfg: RunConfig, catalogue: Catalogue) -> str:
    """The base model: the policy's, or one bootstrapped once per schema from the history before the window."""
    if cfg.base_model:
        return cfg.base_model
    base = _artifacts(cfg) / "base"
    if (base / "config.json").exists():
        return str(base)
    from recupdate_workloads.model.bootstrap import bootstrap

    end = cfg.holdout_start
    _, hist = load_triples(store, end - 4 * (cfg.window_end - cfg.window_start), end, cfg.positive_threshold)
    if len(hist) == 0:
        raise RuntimeError("no history to bootstrap a base model from")
    lookup = evidence_as_of(hist, cfg, catalogue)
    tmp = base.with_name("base.tmp")
    bootstrap(catalogue, hist, lookup, tmp, size=cfg.model_size, max_examples=20_000)
    tmp.rename(base)  # atomic: a concurrent run never loads a half-written base
    return str(base)


def _active_table(store: Store, cfg: RunConfig) -> tuple[str, dict[tuple[int, int], list[int]]] | None:
    """(release id, its table as ranked cluster ids) of the active release; None before the first one. Read
    once per candidate: the gates and the change both compare with it."""
    active = reg.get_release(store, cfg.active_release) if cfg.active_release else reg.active_release(store)
    if active is None or active.table_version is None:
        return None
    served = tables.load_table(store, active.table_version).as_dict()
    return active.release_id, {k: [c for c, _, _ in v] for k, v in served.items()}


def _evaluate(
    store: Store,
    cfg: RunConfig,
    predictor: Predictor,
    catalogue: Catalogue,
    active: tuple[str, dict[tuple[int, int], list[int]]] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gates on the held-out slice [holdout_start, end), evidence as of holdout_start, paired with the active
    release's served table on the same triples."""
    _, test = load_triples(store, cfg.holdout_start, cfg.window_end, cfg.positive_threshold)
    _, recent = load_triples(store, cfg.holdout_start - cfg.retrieval_window, cfg.holdout_start, cfg.positive_threshold)
    evidence = evidence_mem.evidence_of(recent, len(catalogue), cfg.top_successors, cfg.min_support)
    pairs = np.unique(np.stack([test.c1, test.c2], axis=1), axis=0) if len(test) else np.zeros((0, 2), np.int32)
    # The served ranking (blended when retrieval.blend > 0) and the LLM's alone, from one forward pass: a
    # blend must never hide a model that ignores its prompt.
    (llm_ids, _), (ids, _) = predictor.rank_blends(pairs[:, 0], pairs[:, 1], evidence, 5, (0.0, cfg.blend))
    llm_table = {(int(a), int(b)): row.tolist() for (a, b), row in zip(pairs, llm_ids, strict=True)}
    table = {(int(a), int(b)): row.tolist() for (a, b), row in zip(pairs, ids, strict=True)}
    pred = lookup_predictions(table, test)
    cand = hits(pred, test.c_next)
    llm_pred = lookup_predictions(llm_table, test)
    llm_hits = hits(llm_pred, test.c_next)
    active_hits = hits(lookup_predictions(active[1], test), test.c_next) if active is not None else None
    exact = predictor.exact_match(pairs[:, 0], pairs[:, 1], evidence)
    verdict = gates(exact, cand, active_hits, GateThresholds.from_config(cfg.gates))
    top1 = pred[:, 0] == test.c_next
    metrics = {
        "exactMatch": exact,
        "recall@5": float(cand.mean()) if len(cand) else 0.0,
        "heldOutTriples": len(test),
        "hr1": float(top1.mean()) if len(test) else 0.0,
        "blend": cfg.blend,
        "recall@5Llm": float(llm_hits.mean()) if len(llm_hits) else 0.0,
        "hr1Llm": float((llm_pred[:, 0] == test.c_next).mean()) if len(test) else 0.0,
    }
    return metrics, verdict


def _candidate(
    store: Store,
    cfg: RunConfig,
    base: str,
    adapter_uri: str | None,
    catalogue: Catalogue,
    with_evidence: bool,
    cost: dict[str, Any],
    extra: dict[str, Any],
) -> reg.Release:
    from recupdate_workloads.model.prompt import prompt_hash

    predictor = Predictor.load(base, adapter_uri, catalogue, with_evidence, cfg.top_successors)
    active = _active_table(store, cfg)
    metrics, verdict = _evaluate(store, cfg, predictor, catalogue, active)
    snap = refresh_snapshot(store, cfg, cfg.window_end, catalogue)
    evidence = ev.load_evidence(store, snap.snapshot_id)
    m = materialize(predictor, evidence, TABLE_TOP_N, blend=cfg.blend)
    version = publish(store, m, snap.snapshot_id, adapter_uri)
    if active is not None:  # the first release has nothing to compare with
        metrics["change"] = table_change(m.as_table(), active[1]).as_dict() | {"against": active[0]}
    metrics |= {
        "pairs": len(m.c1),
        "materializePairsPerSecond": round(m.pairs_per_second, 1),
        "snapshotPairs": snap.pairs,
        "borrowedPairs": snap.borrowed_pairs,
        "evidenceAt": cfg.window_end,
        "withEvidence": with_evidence,
        **extra,
    }
    rel = reg.Release(
        release_id=cfg.run_id,
        base_model=base,
        adapter_uri=adapter_uri,
        snapshot_id=snap.snapshot_id,
        table_version=version,
        prompt_hash=prompt_hash(),
        metrics=metrics | {"cost": cost},
        gates=verdict,
        run_id=cfg.run_id,
    )
    reg.register_release(store, rel)
    return rel


class _Run:
    """One run's registry row and its cost clock: started on entry; on exit, succeeded with the cost, or
    failed with the reason (and the exception goes on)."""

    def __init__(self, store: Store, cfg: RunConfig, kind: str) -> None:
        self.store, self.cfg, self.kind = store, cfg, kind
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()
        self.cost: dict[str, Any] = {}

    def __enter__(self) -> _Run:
        reg.start_run(self.store, self.cfg.run_id, self.kind)
        return self

    def wall_seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def cpu_seconds(self) -> float:
        return round(_cpu_seconds() - self.c0, 2)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.cost["wallSeconds"] = self.wall_seconds()
        if exc is None:
            reg.finish_run(self.store, self.cfg.run_id, "succeeded", self.cost)
        else:  # the cost so far (the sync's) stays on record; finish_run redacts, then cuts the error
            reg.finish_run(self.store, self.cfg.run_id, "failed", self.cost, error=f"{type(exc).__name__}: {exc}")

    def sync(self) -> None:
        """The sync step (store/sync.py): what is new in the policy's data sources, into the store, before
        anything is counted. Its record (rows, new, duplicate, skipped per reason, seconds) goes into the
        run's cost at once, so it survives a failure later in the run. A source that cannot be read fails
        the run with the source and the reason; the store is then as it was."""
        if os.environ.get(SYNC_ENV, "").lower() == "off":
            self.cost["sync"] = {"off": True}
            return
        try:
            report = data_sync(self.store, self.cfg.data, run_id=self.cfg.run_id, until=self.cfg.window_end)
        except (DataError, OSError, pa.ArrowException) as exc:
            raise SyncFailed(f"data sync failed, nothing was ingested: {exc}") from None
        self.cost["sync"] = report.as_dict()
        reg.record_cost(self.store, self.cfg.run_id, {"sync": self.cost["sync"]})
        log.info("run %s sync: %s", self.cfg.run_id, report.summary())


class SyncFailed(RuntimeError):
    """A data source could not be read: the run fails, the store is unchanged."""


def _training_cost(run: _Run, cfg: RunConfig, tm: dict[str, Any], examples: int) -> dict[str, Any]:
    """CPU seconds of this process (plus the Ray workers', which they report), worker, GPU and wall seconds,
    examples and tokens."""
    worker_seconds = float(tm.get("seconds", 0.0)) * cfg.workers
    ray_cpu = float(tm.get("cpu_seconds", 0.0)) if cfg.executor == "ray" else 0.0
    return {
        "cpuSeconds": round(run.cpu_seconds() + ray_cpu, 2),
        "workerSeconds": round(worker_seconds, 2),
        "gpuSeconds": round(worker_seconds * cfg.gpus_per_worker, 2),
        "examples": int(tm.get("examples", examples)),
        "tokens": int(tm.get("tokens", 0)),
        "wallSeconds": run.wall_seconds(),
    }


def run_finetune(store: Store, cfg: RunConfig) -> reg.Release:
    from recupdate_workloads.model.examples import RELABEL, build_examples, curate
    from recupdate_workloads.model.train_loop import run_inline, run_ray

    with _Run(store, cfg, "finetune") as run:
        run.sync()
        catalogue, train = load_triples(store, cfg.window_start, cfg.holdout_start, cfg.positive_threshold)
        if len(train) == 0:
            raise RuntimeError("no training triples in the window")
        base = ensure_base(store, cfg, catalogue)
        train = curate(train, cfg.max_per_pair, seed=0)
        lookup = None
        if cfg.with_evidence:
            hist_start = cfg.window_start - cfg.retrieval_window
            _, hist = load_triples(store, hist_start, cfg.holdout_start, cfg.positive_threshold)
            lookup = evidence_as_of(hist, cfg, catalogue)
        examples = build_examples(
            catalogue, train, lookup, with_evidence=cfg.with_evidence, evidence_dropout=0.0, relabel=RELABEL
        )
        train_cfg = {
            "base_model": local_path(base),
            "examples": examples.to_records(),
            "output_dir": str(_artifacts(cfg) / "adapters" / cfg.run_id),
            "lora": cfg.lora,
            "lr": cfg.learning_rate,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
        }
        if cfg.executor == "inline":
            result = run_inline(train_cfg)
        else:
            cpus = max(1, int(cfg.cpus_per_worker))
            use_gpu = cfg.gpus_per_worker > 0
            result = run_ray(train_cfg, workers=cfg.workers, use_gpu=use_gpu, cpus_per_worker=cpus, name=cfg.run_id)
        run.cost |= _training_cost(run, cfg, result.metrics, len(examples))
        adapter = f"file://{result.adapter_dir}"
        # Which fine-tune trained the adapter, and on what: the window every refresh measures drift against.
        trained = {
            "run": cfg.run_id,
            "scheduledAt": cfg.window_end,
            "trainStart": cfg.window_start,
            "trainEnd": cfg.holdout_start,
        }
        extra = {"trainLoss": result.metrics.get("train_loss"), "adapter": trained}
        return _candidate(store, cfg, base, adapter, catalogue, cfg.with_evidence, run.cost, extra)


def measure_drift(store: Store, cfg: RunConfig, trained: dict[str, Any], n_clusters: int) -> dict[str, Any]:
    """Drift of this refresh's evidence window against the active adapter's training window (data/drift.py):
    the top-5 successor sets per context, beside the shuffled floor, and the contexts that had the support.
    The windows are kept disjoint (the training window stops where the evidence window starts), so that
    shared triples do not pass for stability. What the planner's fineTune.onDrift reads (docs/spec.md)."""
    t0 = time.perf_counter()
    new_start = cfg.window_end - cfg.retrieval_window
    ref_start, ref_end = int(trained["trainStart"]), min(int(trained["trainEnd"]), new_start)
    _, ref = load_triples(store, ref_start, ref_end, cfg.positive_threshold) if ref_end > ref_start else (None, None)
    _, new = load_triples(store, new_start, cfg.window_end, cfg.positive_threshold)
    if ref is None:
        ref = new.select(np.zeros(len(new), dtype=bool))
    measured = window_drift(ref, new, n_clusters, MIN_SUPPORT)
    out = measured.as_dict() | {
        "measuredAt": cfg.window_end,
        "adapterRun": trained.get("run"),
        "minSupport": MIN_SUPPORT,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("run %s drift against %s: %s", cfg.run_id, trained.get("run"), out)
    return out


def run_refresh(store: Store, cfg: RunConfig) -> reg.Release:
    with _Run(store, cfg, "refresh") as run:
        run.sync()
        active = reg.get_release(store, cfg.active_release) if cfg.active_release else reg.active_release(store)
        if active is None:
            raise RuntimeError("a refresh needs an active release (its adapter does the inference)")
        catalogue, _ = cat.load_catalogue(store)
        with_ev = bool(active.metrics.get("withEvidence", True))
        run.cost |= {"cpuSeconds": 0.0, "examples": 0, "tokens": 0}
        extra: dict[str, Any] = {"refreshOf": active.release_id}
        trained = active.metrics.get("adapter")
        if isinstance(trained, dict):
            extra["adapter"] = trained
            extra["drift"] = measure_drift(store, cfg, trained, len(catalogue))
        rel = _candidate(store, cfg, active.base_model, active.adapter_uri, catalogue, with_ev, run.cost, extra)
        run.cost["cpuSeconds"] = run.cpu_seconds()
        return rel


def main(kind: str, argv: list[str] | None = None) -> int:
    """The entrypoint of a run kind (contract.entrypoints): ``--config <json or file> --run-id <id>``."""

    prog = f"python -m {entrypoints.module_for(kind)}"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the run's config: inline JSON or a JSON file")
    p.add_argument("--run-id", default=None, help="the run id (default: the config's runId)")
    p.add_argument("--store-dir", default=None, help=f"embedded PostgreSQL dir when {DSN_ENV} is unset")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()  # the job's log (local mode's jobs/*.log, a RayJob's logs) must not show the DSN either
    cfg = RunConfig.parse(args.config, args.run_id)
    if cfg.owner is None:
        log.warning("the config names no policy: the owner of schema %s is not checked", cfg.store_schema)
    try:
        # Checks (and claims) the schema's owner before anything is written: another policy's schema is
        # refused, with no run row, snapshot or release in it.
        store = open_store(cfg.store_schema, data_dir=args.store_dir, owner=cfg.owner)
    except SchemaOwnedError as exc:
        log.error("run %s refused, nothing written: %s", cfg.run_id, exc)
        return 1
    except Exception as exc:  # a traceback would print libpq's error unredacted, which may quote the DSN
        log.error("run %s: cannot open the store: %s", cfg.run_id, f"{type(exc).__name__}: {exc}")
        return 1
    try:
        rel = (run_finetune if kind == "finetune" else run_refresh)(store, cfg)
    except Exception as exc:  # the run row says failed with the reason; exit non-zero
        log.error("run %s failed: %s", cfg.run_id, exc)
        return 1
    finally:
        store.close()
    log.info("run %s registered candidate %s (gates passed: %s)", cfg.run_id, rel.release_id, rel.gates.get("passed"))
    os.environ.pop("_", None)
    return 0
