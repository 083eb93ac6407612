"""The reconcile of one policy: read its state, call the planner, apply the plan, write the status; and the
failure paths (backoff, Degraded, one Warning Event per distinct error)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kubernetes import client as k8s_client
from pydantic import ValidationError

from recupdate_workloads.contract.serve import canary_keys, release_keys
from recupdate_workloads.contract.timefmt import parse_time

from .. import metrics
from ..api import (
    ConditionStatus,
    ConditionType,
    PolicySpec,
    PolicyStatus,
    validate_spec,
)
from ..apply import apply_plan
from ..backends.base import Backend, BackendError, PolicyRef, ServingStatus
from ..backends.kuberay import KubeRayBackend, observed_job, owner_key
from ..backends.kuberay import serving_status_of as _serving_status_of
from ..conditions import get_condition
from ..events import post, redact
from ..planner import (
    Event,
    LaunchRun,
    ObservedJob,
    Plan,
    Policy,
    Promote,
    RecordAnalysis,
    RecordRun,
    RegistryView,
    Reject,
    Rollback,
    RollServe,
    StopServe,
    plan,
)
from ..registry import Registry, SecretReader, StoreError, StoreSettings
from .config import MIN_DELAY, ControllerConfig, Key, _scaled_clock, kube_api_client
from .scheduler import Scheduler
from .status import StatusWriteThrough, _Entry, _normalized_status, _rv, _sig

log = logging.getLogger("recupdate.operator")


class Controller:
    """The operator's state and reconcile logic; kopf handlers (see `register`) only feed it.

    Dependencies are injectable for tests: `api_client` (kubernetes ApiClient), `backend`, `registry`, and
    `clock` (the planner's now()). Whatever is not given is built at start from the environment.
    """

    def __init__(
        self,
        *,
        api_client: Any = None,
        backend: Backend | None = None,
        registry: Registry | None = None,
        clock: Callable[[], datetime] | None = None,
        config: ControllerConfig | None = None,
    ) -> None:
        self.config = config or ControllerConfig()
        self.api_client = api_client
        self.backend = backend
        self.registry = registry
        self.clock = clock or _scaled_clock(self.config.time_scale)
        self._entries: dict[Key, _Entry] = {}
        self._jobs_index: Any = None
        self._services_index: Any = None
        self._scheduler: Scheduler | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._busy = 0  # reconciles running in threads, guarded by _idle
        self._idle = threading.Condition()
        self._owns_registry = registry is None
        self.status = StatusWriteThrough(None, self.clock)  # the API client is made at start
        self._kopf_context: contextvars.Context | None = None
        # With peering, a policy is reconciled only while kopf runs its daemon (kopf stops daemons when this
        # operator pauses for a peer with a higher priority, and restarts them when it resumes).
        self.gated = False
        self._active: set[Key] = set()
        self.reconciles = 0

    # -- lifecycle (event loop) ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._scheduler_task is not None:
            return
        if self.api_client is None:
            self.api_client = await asyncio.to_thread(kube_api_client)
        self.status = StatusWriteThrough(k8s_client.CustomObjectsApi(self.api_client), self.clock)
        if self.backend is None:
            self.backend = KubeRayBackend(self.api_client, default_secret=self.config.default_store_secret)
        if self._owns_registry:  # a fresh one per start: stop() closes it
            self.registry = Registry(
                SecretReader(self.api_client),
                StoreSettings(default_dsn=self.config.default_dsn),
            )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix="recupdate-reconcile"
        )
        self._scheduler = Scheduler(self._work, self.config.workers, self._may_run)
        self._scheduler_task = asyncio.create_task(self._scheduler.run(), name="recupdate scheduler")
        for key in self._entries:
            self._scheduler.trigger(key)

    async def stop(self) -> None:
        task, self._scheduler_task = self._scheduler_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._scheduler = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            # A real-time wait in a thread: the loop's clock may be simulated (tests).
            if not await asyncio.to_thread(self._wait_idle, self.config.shutdown_grace_seconds):
                log.warning("%d reconcile(s) still running at shutdown", self._busy)
        if self._owns_registry and self.registry is not None:
            self.registry.close()

    @property
    def alive(self) -> bool:
        return self._scheduler_task is not None and not self._scheduler_task.done()

    async def _work(self, key: Key) -> float | None:
        loop = asyncio.get_running_loop()
        # kopf's event queue lives in context variables that kopf sets for resource handlers only.
        ctx = self._kopf_context.copy() if self._kopf_context is not None else contextvars.copy_context()
        return await loop.run_in_executor(self._executor, ctx.run, self._tracked_reconcile, key)

    def _tracked_reconcile(self, key: Key) -> float | None:
        with self._idle:
            self._busy += 1
        try:
            return self.reconcile(key)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # -- watch feeds (event loop) --------------------------------------------------------------------------

    def _may_run(self, key: Key) -> bool:
        return not self.gated or key in self._active

    def activate(self, key: Key) -> None:
        """kopf's daemon for the policy started: this operator holds it now."""
        self._active.add(key)
        self._trigger(key)

    async def deactivate(self, key: Key, timeout: float = 30.0) -> None:
        """kopf stops the policy's daemon (pause for a peer, deletion, exit): stop reconciling it, and wait
        for a reconcile in flight so that two operators never act on one policy at once."""
        self._active.discard(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._scheduler is not None and self._scheduler.running(key) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def attach(self, jobs: Any, services: Any) -> None:
        """Called from a kopf resource handler: keep kopf's indices, and its context (Events are posted
        through a queue kopf keeps in context variables)."""
        self._jobs_index, self._services_index = jobs, services
        if self._kopf_context is None:
            self._kopf_context = contextvars.copy_context()

    def _trigger(self, key: Key) -> None:
        if self._scheduler is not None:
            self._scheduler.trigger(key)

    def on_policy(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name")))
        if event_type == "DELETED":
            self._entries.pop(key, None)
            if self._scheduler is not None:
                self._scheduler.forget(key)
            metrics.forget_policy(*key)
            metrics.POLICIES.set(len(self._entries))
            return
        raw = copy.deepcopy(dict(body))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            metrics.POLICIES.set(len(self._entries))
        with entry.lock:
            entry.body = raw
            entry.events += 1
            if entry.written_rv is not None and _rv(raw) != entry.written_rv:
                entry.unordered_events += 1
            sig = _sig(raw)
            changed = sig != entry.reconciled_sig
        if changed and not meta.get("deletionTimestamp"):
            self._trigger(key)

    def on_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        entry = self._entries.get(key) if key else None
        if key is None or entry is None:
            return  # not ours, or its policy is not seen yet (its first reconcile will see the job)
        name = str((body.get("metadata") or {}).get("name"))
        if event_type == "DELETED":
            entry.job_states.pop(name, None)
            self._trigger(key)
            return
        job = observed_job(body)
        if job is None:
            return
        state = (job.terminal, job.job_deployment_status, job.job_status)
        previous = entry.job_states.get(name)
        entry.job_states[name] = state
        if job.terminal and previous != state:
            self._trigger(key)

    def on_service(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        entry = self._entries.get(key) if key else None
        if key is None or entry is None:
            return
        if event_type == "DELETED":
            self._trigger(key)
            return
        served = ((entry.body or {}).get("status") or {}).get("servedRelease")
        svc = _serving_status_of(body)
        if served and svc.release_id != served and not self._recently_served(entry):
            self._trigger(key)

    def _recently_served(self, entry: _Entry) -> bool:
        if entry.served_at is None:
            return False
        return (self.clock() - entry.served_at).total_seconds() < self.config.serve_grace_seconds

    # -- reconcile (worker threads) ------------------------------------------------------------------------

    def _jobs(self, key: Key) -> list[ObservedJob]:
        if self._jobs_index is None:
            return []
        return [j for j in self._jobs_index.get(key, []) if isinstance(j, ObservedJob)]

    def _service(self, key: Key) -> ServingStatus | None:
        if self._services_index is None:
            return None
        return next((s for s in self._services_index.get(key, []) if isinstance(s, ServingStatus)), None)

    def reconcile(self, key: Key) -> float | None:
        """One reconcile of one policy. Returns the delay (seconds) until it should run again."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        started = time.perf_counter()
        metrics.RECONCILES.inc()
        self.reconciles += 1
        try:
            return self._reconcile(key, entry)
        except (BackendError, StoreError) as exc:
            return self._failed(key, entry, "store" if isinstance(exc, StoreError) else "api", str(exc))
        except Exception as exc:
            log.error("reconcile of %s/%s failed: %s", key[0], key[1], redact(f"{type(exc).__name__}: {exc}"))
            return self._failed(key, entry, "internal", f"internal error: {type(exc).__name__}")
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)

    def _reconcile(self, key: Key, entry: _Entry) -> float | None:
        body = self.status.current_body(key, entry)
        if body is None:
            return None
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        now = self.clock()
        raw_spec = body.get("spec") or {}
        spec: PolicySpec | None
        try:
            spec = validate_spec(raw_spec if isinstance(raw_spec, Mapping) else None)  # as strict as the CRD
        except (ValidationError, TypeError, ValueError):
            spec = None  # the planner reports it (SpecValid=False, a Warning Event) and does nothing else
        policy = Policy(
            name=key[1],
            namespace=key[0],
            spec=spec if spec is not None else (raw_spec if isinstance(raw_spec, Mapping) else {}),
            generation=int(meta.get("generation") or 1),
            annotations=dict(meta.get("annotations") or {}),
            creation_timestamp=parse_time(meta.get("creationTimestamp")),
            uid=str(meta.get("uid") or ""),
        )
        with entry.lock:
            entry.reconciled_sig = _sig(body)
        status_in: dict[str, Any] = dict(body.get("status") or {})
        ref: PolicyRef | None = None
        jobs: list[ObservedJob] = []
        view = RegistryView()
        service: ServingStatus | None = None
        if spec is not None:
            ref = PolicyRef(key[1], key[0], str(meta.get("uid") or ""), spec, policy.generation)
            jobs = self._jobs(key)
            assert self.registry is not None
            view = self.registry.read(ref)  # claims the schema first: another policy's gives SpecValid=False
            view = self.registry.with_analysis(ref, status_in, view)  # the running analysis's figures
            service = self._service(key)
            status_in = self._check_serving(key, entry, spec, status_in, service)

        p = plan(policy, status_in, jobs, view, now)
        if view.error:
            return self._store_unavailable(key, entry, body, p, view.error)

        finished = self._apply(key, entry, ref, body, p, now)
        if ref is not None:
            self._ensure_serving(ref, p, view, service, entry)
        self.status.write(key, entry, body, p.status_patch())
        # Counted once the status holds the decisions (a retry would decide them again).
        for record, duration in finished:
            kind = record.kind.value
            metrics.RUNS.labels(kind, record.result.value).inc()
            if duration is not None:
                metrics.RUN_DURATION.labels(kind).observe(duration)
            if record.cost is not None:
                metrics.count_run_cost(key[0], key[1], kind, record.run_id, record.cost)
        for launch in p.of(LaunchRun):
            metrics.RUNS_LAUNCHED.labels(launch.kind.value).inc()
        sync = p.status.last_sync
        if sync is not None and sync.run_id != (status_in.get("lastSync") or {}).get("runId"):
            metrics.count_sync(key[0], key[1], sync)  # once per run: the status remembers the last one counted
        metrics.set_active_release(key[0], key[1], p.status.active_release)
        metrics.set_staleness(key[0], key[1], p.status.active_release_evidence_at, now)
        metrics.set_change(key[0], key[1], p.status.last_change)
        metrics.set_drift(key[0], key[1], p.status.last_drift)
        metrics.set_analysis(key[0], key[1], p.status.analysis)
        with entry.lock:
            entry.failures, entry.last_error = 0, None
        return self._delay(p, now, entry)

    def _delay(self, p: Plan, now: datetime, entry: _Entry) -> float:
        delay = self.config.resync_seconds
        if p.wake_at is not None:
            delay = min(delay, (p.wake_at - now).total_seconds())
        if entry.recheck:
            entry.recheck = False
            delay = min(delay, self.config.serve_grace_seconds + 1)
        return max(MIN_DELAY, delay / self.config.time_scale)

    def _check_serving(
        self,
        key: Key,
        entry: _Entry,
        spec: PolicySpec,
        status: dict[str, Any],
        service: ServingStatus | None,
    ) -> dict[str, Any]:
        """If the RayService is gone or serves another release than status.servedRelease says, forget what the
        status says, so the planner rolls Serve again."""
        served = status.get("servedRelease")
        if not served or not spec.serving.enabled or self._services_index is None:
            return status
        if service is not None and service.release_id == served:
            return status
        if self._recently_served(entry):
            entry.recheck = True  # the index may lag behind our own change: look again after the grace
            return status
        what = "is missing" if service is None else f"serves {service.release_id}"
        log.info("%s/%s: the RayService %s; serving %s again", key[0], key[1], what, served)
        return {**status, "servedRelease": None}

    def _apply(
        self, key: Key, entry: _Entry, ref: PolicyRef | None, body: Mapping[str, Any], p: Plan, now: datetime
    ) -> list[tuple[RecordRun, float | None]]:
        """Apply the plan's actions in order; the first failure raises and stops the rest."""
        backend, registry = self.backend, self.registry
        assert backend is not None and registry is not None
        finished: list[tuple[RecordRun, float | None]] = []

        def on_event(event: Event) -> None:
            post(body, event)
            if event.reason in ("InvalidSpec", "SchemaInUse"):
                metrics.RECONCILE_ERRORS.labels("spec").inc()

        def on_action(action: Any) -> None:  # after each action succeeded: metrics and bookkeeping
            if isinstance(action, RecordRun):
                finished.append((action, self._duration(p, action.run_id)))
            elif isinstance(action, Promote):
                metrics.PROMOTIONS.labels(action.reason).inc()
            elif isinstance(action, Rollback):
                metrics.PROMOTIONS.labels("Rollback").inc()
            elif isinstance(action, Reject):
                metrics.REJECTIONS.inc()
            elif isinstance(action, RecordAnalysis):
                metrics.ANALYSIS_VERDICTS.labels(key[1], action.verdict).inc()
            elif isinstance(action, RollServe):
                with entry.lock:
                    entry.served_at = self.clock()

        apply_plan(p, ref, backend, registry, now, on_event, on_action)
        return finished

    @staticmethod
    def _duration(p: Plan, run_id: str) -> float | None:
        for ref in (p.status.last_fine_tune, p.status.last_refresh):
            if ref is not None and ref.run_id == run_id and ref.started_at and ref.finished_at:
                return max(0.0, (ref.finished_at - ref.started_at).total_seconds())
        return None

    def _ensure_serving(
        self, ref: PolicyRef, p: Plan, view: RegistryView, service: ServingStatus | None, entry: _Entry
    ) -> None:
        """After a spec change, bring the RayService's cluster and Serve settings in line with the spec (the
        served release stays as it is)."""
        if not ref.spec.serving.enabled or service is None or service.generation == ref.generation:
            return
        if p.of(RollServe) or p.of(StopServe) or self._recently_served(entry):
            entry.recheck = True  # just changed: the index shows the old object; look again after the grace
            return
        active = view.active()
        if active is None or active.release_id != p.status.served_release:
            return
        assert self.backend is not None
        user_config = release_keys(active.release_id, active.adapter_uri, active.table_version, ref.schema)
        a, canary = p.status.analysis, view.release(p.status.served_canary or "")
        if canary is not None and a is not None and a.release_id == canary.release_id:  # a canary keeps running
            user_config["canary"] = canary_keys(
                canary.release_id, canary.adapter_uri, canary.table_version, a.traffic_percent
            )
        self.backend.ensure_serving(ref, user_config)
        with entry.lock:
            entry.served_at = self.clock()

    def _backoff(self, entry: _Entry) -> float:
        with entry.lock:
            entry.failures += 1
            n = entry.failures
        delay = min(self.config.backoff_max_seconds, self.config.backoff_min_seconds * 2 ** min(n - 1, 20))
        return delay / self.config.time_scale

    def _failed(self, key: Key, entry: _Entry, cause: str, message: str) -> float:
        """A reconcile stopped half-way through its actions: nothing more is done, the status keeps its decisions
        unwritten (the next try recomputes the same ones) and only says Degraded; one Warning Event per
        distinct error; retry with backoff."""
        message = redact(message)
        metrics.RECONCILE_ERRORS.labels(cause).inc()
        delay = self._backoff(entry)
        log.warning("%s/%s: reconcile failed (%s), retrying in %.0fs: %s", key[0], key[1], cause, delay, message)
        with entry.lock:
            repeated = entry.last_error == message
            entry.last_error = message
            body = entry.body
        if body is None:
            return delay
        if not repeated:
            post(body, Event("Warning", "ReconcileFailed", message))
        reason = "RegistryUnavailable" if cause == "store" else "ReconcileFailed"
        self.status.write_conditions(
            key, entry, body, [(ConditionType.DEGRADED, ConditionStatus.TRUE, reason, message)]
        )
        return delay

    def _store_unavailable(self, key: Key, entry: _Entry, body: Mapping[str, Any], p: Plan, error: str) -> float:
        """The registry cannot be read: apply nothing; report Degraded/Ready/Fresh from the plan, keep the rest
        of the status as it was, and retry with backoff."""
        error = redact(error)
        metrics.RECONCILE_ERRORS.labels("store").inc()
        was = get_condition(PolicyStatus.model_validate(_normalized_status(body.get("status")) or {}).conditions,
                            ConditionType.DEGRADED)  # fmt: skip
        updates = []
        for ctype in (ConditionType.READY, ConditionType.FRESH, ConditionType.DEGRADED):
            new = get_condition(p.status.conditions, ctype)
            if new is not None:
                updates.append((ctype, new.status, new.reason, error if new.message else ""))
        if not (was and was.status == ConditionStatus.TRUE and was.reason == "RegistryUnavailable"):
            post(body, Event("Warning", "RegistryUnavailable", f"cannot read the release registry: {error}"))
        delay = self._backoff(entry)
        log.warning("%s/%s: registry unavailable, retrying in %.0fs: %s", key[0], key[1], delay, error)
        self.status.write_conditions(key, entry, body, updates)
        return delay
