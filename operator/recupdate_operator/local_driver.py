"""`recupdate local -f policy.yaml`: the operator's planner driving one policy on this machine.

The same RecommenderUpdatePolicy YAML that kubectl applies, validated by the same models, reconciled by the
same planner; work runs through the local backend (subprocess jobs on a local Ray, a local Ray Serve) against
an embedded PostgreSQL. The clock is real, accelerated (`--speed 3600`: an hour per second) or simulated
(`--simulate 90d`: time jumps to the next planned wake-up and stands still while jobs run). An interaction
stream (synthetic, or a replayed dataset) is appended to the store as time passes, so refreshes and
fine-tunes see new data, and served recommendations are probed with the interactions that just happened.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml

from recupdate_workloads.contract.env import DSN_ENV, SYNC_ENV
from recupdate_workloads.contract.redact import redact, redact_data, redact_logs

from .api import PolicyError, PolicySpec, PolicyStatus, RunKind, RunResult, parse_duration, validate_policy_object
from .apply import apply_plan
from .backends.base import BackendError, PolicyRef
from .planner import Event, Plan, Policy, Promote, RecordRun, Rollback, RollServe, plan
from .registry import Registry, StoreError, StoreSettings

#: Consecutive store or backend errors that `recupdate local` retries (with backoff) before it gives up.
MAX_RETRIES = 8

log = logging.getLogger("recupdate.local")
DAY = 86_400
LOCAL_UID = "local"  # the uid local mode records as its schema's owner (a policy here has no metadata.uid)


class _Loader(yaml.SafeLoader):
    """YAML as kubectl reads it into JSON: a key given twice is an error, and timestamps stay strings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where and what, e.g. 'line 3, column 1: found a tab character ...'."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:  # PyYAML: "found character '\t' that cannot start any token"
            problem += " (indent YAML with spaces, not tabs)"
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"invalid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def load_policy(path: str | Path) -> tuple[str, str, PolicySpec, dict[str, Any]]:
    """(name, namespace, spec, raw document) of a RecommenderUpdatePolicy file, validated as `kubectl apply`
    and the API server would (api.validate_policy_object). Raises PolicyError with one line saying why."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: {_yaml_problem(exc)}") from None
    if not docs:
        raise PolicyError(f"{path}: no YAML document in the file")
    if len(docs) > 1:
        raise PolicyError(f"{path}: {len(docs)} YAML documents; local mode runs one policy, put it alone in a file")
    try:
        name, namespace, spec = validate_policy_object(docs[0])
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return name, namespace, spec, docs[0]


def _status_filename(name: str) -> str:
    """`<name>.status.json`; a name near Kubernetes' 253 characters is cut (and hashed, to stay unique) to fit
    the 255-byte file name limit."""
    if len(name) <= 200:
        return f"{name}.status.json"
    return f"{name[:190]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.status.json"


class StoreUnavailable(RuntimeError):
    """The store could not be opened or reached: the embedded PostgreSQL, or RECUPDATE_STORE_DSN."""


@dataclass
class Probe:
    """Served recommendations checked against what users did next, per reporting period."""

    period: int
    served_hits: dict[int, list[int]] = field(default_factory=dict)  # period index -> [hits, n]
    static_hits: dict[int, list[int]] = field(default_factory=dict)
    failures: int = 0
    requests: int = 0

    def add(self, bucket: dict[int, list[int]], idx: int, hit: bool) -> None:
        cell = bucket.setdefault(idx, [0, 0])
        cell[0] += int(hit)
        cell[1] += 1


class LocalRun:
    """One policy, one store, one clock. Everything that touches torch/Ray is imported lazily."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name, self.namespace, self.spec, _ = load_policy(args.file)
        for flag in ("simulate", "warmup", "tick", "report_period"):  # bad flags fail before anything starts
            value = getattr(args, flag, None)
            if value is not None:
                try:
                    parse_duration(value)
                except ValueError as exc:
                    raise ValueError(f"--{flag.replace('_', '-')}: {exc}") from None
        self.workdir = Path(args.workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.status_file = Path(args.status_file or self.workdir / _status_filename(self.name))
        self.stop = False
        self.timeline: list[dict[str, Any]] = []
        self._last_line = ""
        # when fine-tunes ended and releases were promoted (this process's), for the plot
        self.finetunes: list[datetime] = []
        self.promotions: list[datetime] = []
        self.static_release: str | None = None

    # -- setup ---------------------------------------------------------------------------------------------

    def _open(self) -> None:
        from recupdate_workloads.data.loaders import load
        from recupdate_workloads.data.sequences import triples
        from recupdate_workloads.data.synthetic import SyntheticSpec
        from recupdate_workloads.store import catalogue as cat
        from recupdate_workloads.store.db import open_store
        from recupdate_workloads.store.owner import Owner

        from .api import schema_name

        # The data first: a bad source is one clear error (DataError, a ValueError) before any store starts,
        # and load() refuses a source without a usable row (the clock starts from the data's first timestamp).
        source = self.args.data or self.spec.data.interactions
        self.data = load(source, synthetic=SyntheticSpec(n_interactions=self.args.interactions, seed=self.args.seed))
        log.info("data %s: %s", self.data.name, self.data.report.summary())
        self.schema = schema_name(self.name, self.spec)
        # Claimed before the catalogue and interactions are written: another policy's schema is refused
        # (SchemaOwnedError, a ValueError: `recupdate local` reports it and exits 2).
        owner = Owner(self.namespace, self.name, LOCAL_UID)
        try:
            self.store = open_store(self.schema, data_dir=self.workdir / "pg", owner=owner, adopt=True)
        except (psycopg.Error, OSError, subprocess.SubprocessError) as exc:
            where = f"{DSN_ENV}" if os.environ.get(DSN_ENV) else f"the embedded PostgreSQL in {self.workdir / 'pg'}"
            raise StoreUnavailable(f"cannot open the store ({where}): {_first_line(exc)}") from None
        if not len(cat.load_catalogue(self.store)[0]):
            cat.save_catalogue(self.store, self.data.catalogue, self.data.log.item_cluster)
        self.triples = triples(self.data.log, self.spec.data.positive_threshold)
        with self.store.tx() as c:
            row = c.execute("SELECT max(ts) FROM interactions").fetchone()
        self.watermark = int(row[0]) + 1 if row and row[0] is not None else int(self.data.log.ts.min())

    def _clock_start(self) -> datetime:
        if self.status_file.exists():
            saved = json.loads(self.status_file.read_text()).get("localClock")
            if saved:
                return datetime.fromisoformat(saved)
        warmup = parse_duration(self.args.warmup).total_seconds()
        return datetime.fromtimestamp(int(self.data.log.ts.min()) + warmup, UTC).replace(minute=0, second=0)

    def _append_until(self, now: datetime) -> int:
        from recupdate_workloads.store import catalogue as cat

        end = int(now.timestamp())
        if end <= self.watermark:
            return 0
        chunk = self.data.log.window(self.watermark, end)
        n = cat.append_interactions(self.store, chunk) if len(chunk) else 0
        self.watermark = end
        return n

    # -- serving probe -------------------------------------------------------------------------------------

    def _probe(self, start: int, end: int, probe: Probe, static: dict[tuple[int, int], list[int]] | None) -> None:
        """Ask /recommend for a sample of the contexts that occurred in [start, end), score the answers."""
        import numpy as np

        t = self.triples.window(start, end)
        if not len(t):
            return
        idx = np.random.default_rng(start).permutation(len(t))[: self.args.probe_requests]
        bucket = (start - int(self.data.log.ts.min())) // probe.period
        for i in idx.tolist():
            c1, c2, nxt = int(t.c1[i]), int(t.c2[i]), int(t.c_next[i])
            # The user's id as the store holds it: during a canary its hash picks the release that answers.
            body = json.dumps({"recent_clusters": [c1, c2], "n": 5, "user_id": str(int(t.user[i]))}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{self.args.port}/recommend", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
            probe.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    ids = [c["id"] for c in json.loads(resp.read())["clusters"]]
            except Exception:  # counted: serving must not fail during rollouts
                probe.failures += 1
                continue
            probe.add(probe.served_hits, bucket, nxt in ids)
            if static is not None:
                probe.add(probe.static_hits, bucket, nxt in static.get((c1, c2), [])[:5])

    def _static_table(self, release_id: str) -> dict[tuple[int, int], list[int]]:
        from recupdate_workloads.store import registry as reg
        from recupdate_workloads.store import tables

        rel = reg.get_release(self.store, release_id)
        assert rel is not None and rel.table_version is not None
        return {k: [c for c, _, _ in v] for k, v in tables.load_table(self.store, rel.table_version).as_dict().items()}

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        from recupdate_workloads.serving.deployment import ensure_local_ray, shutdown_local_ray

        self._open()
        started = ensure_local_ray(num_cpus=self.args.cpus)
        try:
            return self._run()
        finally:
            if started:
                shutdown_local_ray()  # and remove its session directory: Ray never removes its logs

    def _run(self) -> int:
        import ray

        from .backends.local import LocalBackend

        ray_address = ray.get_runtime_context().gcs_address
        now = self._clock_start()
        sim_end = now + parse_duration(self.args.simulate) if self.args.simulate else None
        real0, sim0 = time.monotonic(), now
        self.now = now
        env = {"RAY_ADDRESS": ray_address, "RECUPDATE_STORAGE": str(self.workdir / "artifacts"),
               "RECUPDATE_EXECUTOR": self.args.executor, "RECUPDATE_MODEL_SIZE": self.args.model_size,
               # one OpenMP thread per job: jobs share the cores with Serve and PostgreSQL, and oversubscribed
               # OpenMP threads spin-wait (a LoRA fine-tune ran 20x slower with 2 threads under load)
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               # local mode feeds the store itself as its clock advances: the jobs' sync step stays off
               SYNC_ENV: "off"}  # fmt: skip
        backend = LocalBackend(self.store.dsn, self.workdir, env=env, port=self.args.port, clock=lambda: self.now,
                               fail_runs=tuple(self.args.fail_run or ()),
                               worse_runs=tuple(self.args.worse_run or ()))  # fmt: skip
        registry = Registry(None, StoreSettings(default_dsn=self.store.dsn))  # registers the DSN as a secret
        status: dict[str, Any] = {}
        if self.status_file.exists():
            status = json.loads(self.status_file.read_text()).get("status") or {}
        probe = Probe(period=int(parse_duration(self.args.report_period).total_seconds()))
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, stop the jobs, report
            signal.signal(sig, lambda *_: setattr(self, "stop", True))
        policy = Policy(self.name, self.namespace, self.spec, 1, {}, sim0, uid=LOCAL_UID)
        ref = PolicyRef(self.name, self.namespace, LOCAL_UID, self.spec, 1)
        last_probe = int(now.timestamp())
        t_start = time.monotonic()
        static: dict[tuple[int, int], list[int]] | None = None
        failures = 0
        try:
            while not self.stop:
                self.now = now
                self._append_until(now)
                if backend._served is not None:
                    self._probe(last_probe, int(now.timestamp()), probe, static)
                last_probe = int(now.timestamp())
                try:
                    view = registry.with_analysis(ref, status, registry.read(ref))
                    p = plan(policy, status, backend.observe_jobs(ref), view, now)
                    apply_plan(p, ref, backend, registry, now, self._event, self._action)
                except (BackendError, StoreError) as exc:
                    # As the operator does: a store or job error is retried with backoff, the step unchanged
                    # (the plan is recomputed, so nothing is done twice); only a persistent one ends the run.
                    failures += 1
                    if failures > MAX_RETRIES:
                        print(f"recupdate local: giving up after {MAX_RETRIES} retries: {redact(exc)}", file=sys.stderr)
                        return 2
                    delay = min(30.0, 2.0**failures)
                    log.warning("store or backend unavailable, retrying in %.0fs: %s", delay, redact(exc))
                    time.sleep(delay)
                    continue
                failures = 0
                if static is None and p.status.active_release:
                    static = self._static_table(p.status.active_release)  # the first release, never updated
                    self.static_release = p.status.active_release
                status = p.status_patch()
                self._write_status(status, now)
                self._status_line(p, now, probe)
                if sim_end is not None:
                    if backend.running():
                        time.sleep(0.5)  # simulated time stands still while jobs run
                        continue
                    if now >= sim_end:
                        break
                    step = timedelta(seconds=parse_duration(self.args.tick).total_seconds())
                    nxt = min(p.wake_at or now + step, now + step, sim_end)
                    now = max(nxt, now + timedelta(seconds=1))
                else:
                    time.sleep(1.0)
                    now = sim0 + timedelta(seconds=(time.monotonic() - real0) * self.args.speed)
        finally:
            # Jobs run in their own sessions (a terminal's Ctrl-C does not reach them): stop them here, or they
            # would run on, reparented to PID 1. Their runs stay 'running' in the store; a rerun reports them
            # failed ("interrupted") and retries them with backoff.
            stopped = backend.shutdown()
            if stopped:
                print(f"\nstopped {len(stopped)} running job(s): {', '.join(stopped)}", file=sys.stderr)
        print()
        self._report(probe, time.monotonic() - t_start)
        registry.close()
        backend.close()
        return 0 if probe.failures == 0 else 1

    def _event(self, e: Event) -> None:
        now = self.now
        message = redact(e.message)  # e.g. a run's error, a store error: they may quote the DSN
        self.timeline.append({"time": now.isoformat(), "event": e.reason, "message": message, "type": e.type})
        log.info("%s %s %s: %s", now.isoformat(), e.type, e.reason, message)

    def _action(self, action: Any) -> None:
        if isinstance(action, RollServe):
            log.info("%s serving %s", self.now.isoformat(), action.release_id)
        elif isinstance(action, Promote | Rollback):
            self.promotions.append(self.now)
        elif isinstance(action, RecordRun) and action.kind == RunKind.FINETUNE and action.result == RunResult.SUCCEEDED:
            self.finetunes.append(self.now)

    def _write_status(self, status: dict[str, Any], now: datetime) -> None:
        tmp = self.status_file.with_suffix(".tmp")
        doc = {"localClock": now.isoformat(), "status": redact_data(status)}  # masked before JSON escapes it
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(self.status_file)

    def _status_line(self, p: Plan, now: datetime, probe: Probe) -> None:
        s: PolicyStatus = p.status
        fresh = "?"
        if s.active_release_evidence_at:
            fresh = f"{(now - s.active_release_evidence_at).total_seconds() / DAY:.1f}d"
        ft = s.last_fine_tune.run_id if s.last_fine_tune else "-"
        rf = s.last_refresh.run_id if s.last_refresh else "-"
        nft = s.next_fine_tune_at.strftime("%Y-%m-%d") if s.next_fine_tune_at else "-"
        nrf = s.next_refresh_at.strftime("%m-%d %H:%M") if s.next_refresh_at else "-"
        line = (f"\r{now:%Y-%m-%d %H:%M} active={s.active_release or '-'} ft={ft} rf={rf} staleness={fresh} "
                f"next ft={nft} rf={nrf} probes={probe.requests} failed={probe.failures}")  # fmt: skip
        if not self.args.status_line:
            return
        if sys.stdout.isatty():
            sys.stdout.write(line[:200].ljust(200))
        elif line != self._last_line:  # a log, not a terminal: one line per change
            sys.stdout.write(line[1:] + "\n")
        self._last_line = line
        sys.stdout.flush()

    # -- report --------------------------------------------------------------------------------------------

    def _report(self, probe: Probe, seconds: float) -> None:
        from recupdate_workloads.store import registry as reg

        print(f"\nreleases of policy {self.name} (schema {self.schema}):")
        # top1 Δ: the share of pairs whose top-1 changed against the table active when it was built
        # (jobs/change.py); for a refresh, which keeps the adapter, that is its rag_change (docs/rag.md)
        print(
            f"{'release':<28} {'state':<9} {'gates':<6} {'exact':>6} {'recall@5':>8} {'Δ vs active':>11} {'top1 Δ':>6}  created"
        )
        for r in reg.list_releases(self.store):
            g = r.gates or {}
            reg_v = (g.get("regression") or {}).get("value")
            print(f"{r.release_id:<28} {r.state:<9} {('pass' if g.get('passed') else 'FAIL'):<6} "
                  f"{(g.get('exactMatch') or {}).get('value', float('nan')):6.3f} "
                  f"{(g.get('recall') or {}).get('value', float('nan')):8.3f} "
                  f"{(f'{reg_v:+.3f}' if reg_v is not None else '-'):>11} "
                  f"{(f'{rc:.2f}' if (rc := ((r.metrics or {}).get('change') or {}).get('top1Changed')) is not None else '-'):>6}  "
                  f"{r.created_at:%Y-%m-%d %H:%M}")  # fmt: skip
        print(
            f"\nhit rate (HR@5) of served recommendations per {self.args.report_period}, against the first release kept static:"
        )
        print(f"{'period':>6} {'served':>8} {'static':>8} {'probes':>7}")
        rows = []
        for b in sorted(probe.served_hits):
            sh, sn = probe.served_hits[b]
            th, tn = probe.static_hits.get(b, [0, 0])
            rows.append((b, sh / sn, th / tn if tn else float("nan"), sn))
            print(f"{b:>6} {sh / sn:8.3f} {(th / tn if tn else float('nan')):8.3f} {sn:>7}")
        tot_s = sum(probe.served_hits[b][0] for b in probe.served_hits) / max(
            1, sum(v[1] for v in probe.served_hits.values())
        )
        tot_t = sum(v[0] for v in probe.static_hits.values()) / max(1, sum(v[1] for v in probe.static_hits.values()))
        print(f"{'all':>6} {tot_s:8.3f} {tot_t:8.3f} {probe.requests:>7}")
        analyses = [r for r in reg.list_releases(self.store) if isinstance((r.gates or {}).get("analysis"), dict)]
        if analyses:
            print("\nanalysis on live events (gates.analysis): HR@5 of the candidate vs the active release")
            print(
                f"{'release':<28} {'verdict':<12} {'mode':<7} {'candidate':>9} {'events':>7} {'active':>7} {'events':>7}"
            )
            for r in analyses:
                a = r.gates["analysis"]
                cand, base = _rate(a.get("candidateHitRate")), _rate(a.get("baselineHitRate"))
                print(
                    f"{r.release_id:<28} {a.get('verdict', '?'):<12} {a.get('mode', '?'):<7} {cand:>9} "
                    f"{a.get('candidateEvents', 0):>7} {base:>7} {a.get('baselineEvents', 0):>7}"
                )
        print(f"\nrequests to /recommend: {probe.requests}, failed: {probe.failures}; took {seconds / 60:.1f} min")
        if rows:
            print()
            print(self._cost_quality(tot_s - tot_t if probe.static_hits else None))
            print(f"plot: {self._plot(rows, probe.period)} (fine-tunes and promotions marked)")
        (self.workdir / "timeline.json").write_text(json.dumps(redact_data(self.timeline), indent=2))

    def _cost_quality(self, delta_hr5: float | None) -> str:
        """ΔHR@5 of the served releases over the first one, per CPU-hour of the runs after it (runs.cost)."""
        from recupdate_workloads.replay.report import CostQuality, format_cost_quality
        from recupdate_workloads.store import registry as reg

        runs = [r for r in reg.list_runs(self.store) if r.kind in (RunKind.FINETUNE.value, RunKind.REFRESH.value)]
        first = reg.get_release(self.store, self.static_release) if self.static_release else None
        first_run = first.run_id if first is not None else None
        cpu = {r.run_id: float((r.cost or {}).get("cpuSeconds") or 0.0) for r in runs}
        static_cpu = cpu.get(first_run or "", 0.0)
        total = sum(cpu.values())
        rows = [
            CostQuality("static", None, None, static_cpu, 0.0, int(first_run is not None), int(first is not None)),
            CostQuality(
                "served",
                delta_hr5,
                None,
                total,
                total - static_cpu,
                finetunes=len(self.finetunes),
                promotions=len(self.promotions),
            ),
        ]
        return format_cost_quality(rows)

    def _plot(self, rows: list[tuple[int, float, float, int]], period: int) -> Path:
        from recupdate_workloads.replay.report import Marks, plot_over_time

        t0 = int(self.data.log.ts.min())
        mids = [datetime.fromtimestamp(t0 + (r[0] + 0.5) * period, UTC) for r in rows]
        series = [
            ("served (refreshed + fine-tuned)", mids, [r[1] for r in rows]),
            ("static: the first release, never updated", mids, [r[2] for r in rows]),
        ]
        marks = {"served": Marks(list(self.finetunes), list(self.promotions))}
        title = f"recupdate local: policy {self.name} (HR@5 per {self.args.report_period})"
        return plot_over_time(self.workdir / "served-hr5.png", title, series, marks)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", required=True, help="a RecommenderUpdatePolicy YAML (as for kubectl apply)")
    clock = p.add_mutually_exclusive_group()
    clock.add_argument("--simulate", default=None, help="simulate this span (e.g. 90d), jumping between wake-ups")
    clock.add_argument("--speed", type=float, default=1.0, help="real clock times this (3600: an hour per second)")
    p.add_argument("--data", default=None,
                   help="override spec.data.interactions: synthetic, movielens:PATH or table:I,ITEMS[,C]")  # fmt: skip
    p.add_argument("--interactions", type=int, default=100_000, help="size of the synthetic stream")
    p.add_argument("--seed", type=int, default=7, help="synthetic seed")
    p.add_argument("--warmup", default="180d", help="history already in the store when the clock starts")
    p.add_argument("--tick", default="1d", help="longest simulated step between reconciles")
    p.add_argument("--workdir", default=".recupdate/local", help="store, artifacts, logs and status live here")
    p.add_argument("--status-file", default=None, help="where the policy status is written (default: in workdir)")
    p.add_argument("--port", type=int, default=8000, help="port of /recommend")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--executor", default="ray", choices=["ray", "inline"], help="fine-tunes on Ray Train or inline")
    p.add_argument("--model-size", default="small", choices=["tiny", "small", "medium"], help="bootstrap size")
    p.add_argument("--probe-requests", type=int, default=40, help="requests to /recommend per reconcile step")
    p.add_argument("--report-period", default="30d", help="bucket of the served hit-rate report")
    p.add_argument("--no-status-line", dest="status_line", action="store_false", help="no live status line")
    p.add_argument("--fail-run", action="append", metavar="TEXT",
                   help="chaos: runs whose id contains TEXT get unpassable gates (repeatable)")  # fmt: skip
    p.add_argument(
        "--worse-run",
        action="append",
        metavar="TEXT",
        help="chaos: runs whose id contains TEXT pass their gates but publish a shuffled table, worse on live "
        "events (for gates.analysis; repeatable)",
    )


def _rate(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every probe succeeded, 1 when some failed, 2 on bad input or an unreachable store (one line
    on stderr, no traceback), 130 when interrupted before the loop started."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()
    try:
        return LocalRun(args).run()
    except (ValueError, StoreUnavailable) as exc:  # PolicyError is a ValueError
        print(f"recupdate local: {_first_line(exc)}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:  # the store went away while running
        print(f"recupdate local: lost the store: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recupdate local: interrupted", file=sys.stderr)
        return 130
