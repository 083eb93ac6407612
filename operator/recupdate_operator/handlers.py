"""kopf wiring: read state, call planner.plan, apply the actions through a backend and the registry, patch status.

Triggers. Every reconcile of a policy goes through one per-operator scheduler, so a policy is never
reconciled twice at once and bursts of triggers coalesce:

* the policy's watch events (``@kopf.on.event``): first sight (create, and resume at operator start), and
  every change of its generation (spec) or of the approve/rollback annotations; status-only changes, such as
  our own status writes, trigger nothing;
* time: the plan's ``wake_at`` (next scheduled run, end of a backoff, freshness deadline), and at most
  ``resync_seconds`` after the last reconcile (the timer: it picks up registry changes nobody announced);
* the owned RayJobs (an index plus ``@kopf.on.event`` on ``recupdate.io/policy``-labelled jobs): a job that
  turns terminal, or is deleted, reconciles its owner; the RayService likewise when it is deleted or serves
  another release than the status says.

Kopf's indices are filled before any handler runs, so the first reconcile after a restart already sees every
job: a restart never mistakes a running job for a vanished one, and never launches a run twice (names are
deterministic, and creating an existing name is treated as done).

Reconciles run the synchronous kubernetes client and psycopg in a thread pool; the scheduler measures time
with the event loop's clock and the planner reads ``now`` from an injectable clock, so looptime can run weeks
of schedules in seconds.

Finalizers: none of ours. Children (RayJobs, the RayService) carry ownerReferences to the policy and are
garbage-collected with it; the registry's schema outlives the policy on purpose (it is data, and a re-created
policy resumes from it). A standalone operator (the default) uses no kopf daemon or timer (either makes kopf
put a finalizer on every policy) and no change handler (on.create/on.update store progress in annotations on
every change; events do not need that). With peering (several replicas), kopf tells only daemons when this
operator must pause for a peer, so then a do-nothing daemon per policy gates the scheduler, and kopf adds its
finalizer (kopf.recupdate.io/finalizer; kopf removes it when the daemon has stopped). Persistence settings use
our own prefix.

Errors: a store that cannot be read gives Degraded=True (RegistryUnavailable), no action at all, and a retry
with exponential backoff; a failing action (API or store) stops the plan there, the status keeps none of the
plan's decisions and only turns Degraded=True (ReconcileFailed), and the retry recomputes the same decisions
(planner.py's contract). Reconciles are not kopf handlers, so kopf.TemporaryError would mean nothing to them:
the scheduler's backoff plays its part. A bad spec is the planner's to report (SpecValid=False and a Warning
Event); nothing here raises on it. Messages are scrubbed of secrets (events.redact).

Status writes: only when the status changes; a change of the Fresh message alone (it states the evidence's
age) is written at most hourly, so an idle policy costs about one API request an hour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from pydantic import ValidationError

from . import metrics
from .api import (
    ANNOTATION_APPROVE,
    ANNOTATION_ROLLBACK,
    GROUP,
    LABEL_POLICY,
    PLURAL,
    VERSION,
    ConditionStatus,
    ConditionType,
    PolicySpec,
    PolicyStatus,
    SecretKeyRef,
)
from .apply import apply_plan
from .backends.base import Backend, BackendError, PolicyRef, ServingStatus
from .backends.kuberay import RAY_GROUP, RAY_VERSION, RAYJOBS, RAYSERVICES, KubeRayBackend, observed_job, owner_key
from .backends.kuberay import serving_status_of as _serving_status_of
from .conditions import get_condition, set_condition
from .events import post, redact, redact_data
from .planner import (
    Event,
    LaunchRun,
    ObservedJob,
    Plan,
    Policy,
    Promote,
    RecordRun,
    RegistryView,
    Reject,
    Rollback,
    RollServe,
    StopServe,
    plan,
)
from .registry import Registry, SecretReader, StoreError, StoreSettings

log = logging.getLogger("recupdate.operator")

#: kopf's own annotations (progress, diff base, finalizer name). Not "recupdate.io": kopf ignores every
#: annotation under its storage prefix when it diffs an object, which would hide recupdate.io/approve and
#: recupdate.io/rollback-to.
KOPF_PREFIX = f"kopf.{GROUP}"
JOBS_INDEX = "recupdate_rayjobs"
SERVICES_INDEX = "recupdate_rayservices"
MIN_DELAY = 1.0  # never reconcile one policy in a tight loop, whatever wake_at says
AGE_MESSAGE_REFRESH_SECONDS = 3600.0  # how often a status write just to update an age in a message is worth it
REQUEST_TIMEOUT = (5, 30)

Key = tuple[str, str]  # (namespace, name)


@dataclass
class ControllerConfig:
    resync_seconds: float = 900.0  # reconcile every policy at least this often
    workers: int = 8  # reconciles in parallel (threads)
    backoff_min_seconds: float = 5.0  # first retry after a failed reconcile
    backoff_max_seconds: float = 300.0
    serve_grace_seconds: float = 60.0  # a RayService rolled this recently may not be in the index yet
    default_store_secret: SecretKeyRef | None = None  # jobs' DSN Secret for policies without secretRef
    default_dsn: str | None = None  # the operator's own DSN for policies without secretRef
    # Testing and benchmarks: the controller's clock runs this many times faster than real time (schedules,
    # resync, backoff and grace periods shrink alike). kopf's own timing is not scaled.
    time_scale: float = 1.0
    # On shutdown, wait this long (real seconds) for reconciles in flight: one cut off mid-way could leave a
    # registry transaction open, and a thread left running would outlive the operator's connections.
    shutdown_grace_seconds: float = 30.0


@dataclass
class _Entry:
    """What the controller keeps per policy. Guarded by `lock` (touched by the loop and worker threads)."""

    body: dict[str, Any] | None = None  # the newest object seen on the watch
    written: dict[str, Any] | None = None  # our last status write's answer, until the watch catches up
    written_rv: str | None = None
    unordered_events: int = 0  # events seen since our write that were not it (order unknown: GET)
    events: int = 0  # watch events seen, to tell whether any raced with a status write
    reconciled_sig: tuple[Any, ...] | None = None
    job_states: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    served_at: datetime | None = None  # when (the controller's clock) we last changed the RayService
    recheck: bool = False  # a serving check was put off for the grace period
    status_written_at: datetime | None = None
    failures: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


def _sig(body: Mapping[str, Any]) -> tuple[Any, ...]:
    meta = body.get("metadata") or {}
    ann = meta.get("annotations") or {}
    return (meta.get("generation"), ann.get(ANNOTATION_APPROVE), ann.get(ANNOTATION_ROLLBACK))


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _without_age(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without the Fresh condition's message (it states an age, which changes all the time)."""
    conditions = [
        {k: v for k, v in c.items() if not (c.get("type") == ConditionType.FRESH.value and k == "message")}
        for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conditions}


def _normalized_status(raw: Any) -> dict[str, Any] | None:
    try:
        return PolicyStatus.model_validate(dict(raw or {})).model_dump(mode="json", by_alias=True)
    except (ValidationError, TypeError, ValueError):
        return None


def _scaled_clock(scale: float) -> Callable[[], datetime]:
    if scale == 1.0:
        return lambda: datetime.now(UTC)
    start, t0 = datetime.now(UTC), time.monotonic()
    return lambda: start + timedelta(seconds=(time.monotonic() - t0) * scale)


def kube_api_client() -> Any:
    """A kubernetes ApiClient: in-cluster config, else $KUBECONFIG (read now, not at import time)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        configuration = client.Configuration()
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        config.load_kube_config(config_file=path, client_configuration=configuration)
        return client.ApiClient(configuration)


# ---------------------------------------------------------------------------------------------------------
# Scheduler


class Scheduler:
    """Runs `work(key)` for due keys, one at a time per key, at most `workers` at once. work returns the delay
    (seconds) to the key's next run, or None. Times are the event loop's (looptime fast-forwards them)."""

    def __init__(self, work: Callable[[Key], Any], workers: int, may_run: Callable[[Key], bool] | None = None) -> None:
        self._work = work
        self._may_run = may_run or (lambda key: True)
        self._sem = asyncio.Semaphore(workers)
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def trigger(self, key: Key, delay: float = 0.0, *, replace: bool = False) -> None:
        """Run `key` after `delay` seconds (earlier if it is already due sooner, unless `replace`)."""
        if key in self._running and delay <= 0:
            self._again.add(key)
            return
        when = self._loop.time() + max(0.0, delay)
        old = self._due.get(key)
        if old is not None and old <= when and not replace:
            return
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._wakeup.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)
        self._again.discard(key)

    def pending(self) -> int:
        return len(self._due) + len(self._running)

    def running(self, key: Key) -> bool:
        return key in self._running

    async def run(self) -> None:
        try:
            while True:
                # Due within a millisecond counts as due, and the wait is computed from the true time: float
                # rounding must never leave a timer that fires at once yet finds nothing due (under a fake
                # clock, time would then never move on).
                now = self._loop.time()
                while self._heap and self._heap[0][0] <= now + 1e-3:
                    when, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) != when:
                        continue  # superseded
                    del self._due[key]
                    if not self._may_run(key):
                        continue  # not ours to reconcile now (peering): activation triggers it again
                    if key in self._running:
                        self._again.add(key)
                        continue
                    self._running.add(key)
                    task = asyncio.create_task(self._run_one(key), name=f"reconcile {key[0]}/{key[1]}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                timeout = max(self._heap[0][0] - now, 1e-3) if self._heap else None
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_one(self, key: Key) -> None:
        delay: float | None = None
        try:
            async with self._sem:
                delay = await self._work(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile of %s/%s crashed", *key)
            delay = 60.0
        finally:
            self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.trigger(key, 0.0, replace=True)
        elif delay is not None:
            self.trigger(key, delay, replace=True)


# ---------------------------------------------------------------------------------------------------------
# Controller


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
        self._custom: Any = None
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
        from kubernetes import client

        self._custom = client.CustomObjectsApi(self.api_client)
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

    def _current_body(self, key: Key, entry: _Entry) -> dict[str, Any] | None:
        """The freshest object we know: the watch's, or our own last write while the watch lags behind it.
        When events arrived whose order against our write is unknown, read it from the API."""
        with entry.lock:
            if entry.written_rv is None:
                return entry.body
            if _rv(entry.body) == entry.written_rv:
                entry.written, entry.written_rv, entry.unordered_events = None, None, 0
                return entry.body
            if entry.unordered_events == 0:
                return entry.written
        from kubernetes.client.exceptions import ApiException

        try:
            # rbac: recupdate.io recommenderupdatepolicies get
            body = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, key[0], PLURAL, key[1], _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"get policy: {exc.status} {exc.reason}") from None
        with entry.lock:
            entry.body = dict(body)
            entry.written, entry.written_rv, entry.unordered_events = None, None, 0
            return entry.body

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
        body = self._current_body(key, entry)
        if body is None:
            return None
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        now = self.clock()
        raw_spec = body.get("spec") or {}
        spec: PolicySpec | None
        try:
            spec = PolicySpec.model_validate(raw_spec)
        except (ValidationError, TypeError, ValueError):
            spec = None  # the planner reports it (SpecValid=False, a Warning Event) and does nothing else
        policy = Policy(
            name=key[1],
            namespace=key[0],
            spec=spec if spec is not None else (raw_spec if isinstance(raw_spec, Mapping) else {}),
            generation=int(meta.get("generation") or 1),
            annotations=dict(meta.get("annotations") or {}),
            creation_timestamp=_parse_time(meta.get("creationTimestamp")),
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
            view = self.registry.read(ref)
            service = self._service(key)
            status_in = self._check_serving(key, entry, spec, status_in, service)

        p = plan(policy, status_in, jobs, view, now)
        if view.error:
            return self._store_unavailable(key, entry, body, p, view.error)

        finished = self._apply(key, entry, ref, body, p, now)
        if ref is not None:
            self._ensure_serving(ref, p, view, service, entry)
        self._write_status(key, entry, body, p.status_patch())
        # Counted once the status holds the decisions (a retry would decide them again).
        for kind, result, duration in finished:
            metrics.RUNS.labels(kind, result).inc()
            if duration is not None:
                metrics.RUN_DURATION.labels(kind).observe(duration)
        for launch in p.of(LaunchRun):
            metrics.RUNS_LAUNCHED.labels(launch.kind.value).inc()
        metrics.set_active_release(key[0], key[1], p.status.active_release)
        metrics.set_staleness(key[0], key[1], p.status.active_release_evidence_at, now)
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
    ) -> list[tuple[str, str, float | None]]:
        """Apply the plan's actions in order; the first failure raises and stops the rest."""
        backend, registry = self.backend, self.registry
        assert backend is not None and registry is not None
        finished: list[tuple[str, str, float | None]] = []

        def on_event(event: Event) -> None:
            post(body, event)
            if event.reason == "InvalidSpec":
                metrics.RECONCILE_ERRORS.labels("spec").inc()

        def on_action(action: Any) -> None:  # after each action succeeded: metrics and bookkeeping
            if isinstance(action, RecordRun):
                finished.append((action.kind.value, action.result.value, self._duration(p, action.run_id)))
            elif isinstance(action, Promote):
                metrics.PROMOTIONS.labels(action.reason).inc()
            elif isinstance(action, Rollback):
                metrics.PROMOTIONS.labels("Rollback").inc()
            elif isinstance(action, Reject):
                metrics.REJECTIONS.inc()
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
        self.backend.ensure_serving(
            ref,
            {
                "release_id": active.release_id,
                "adapter_uri": active.adapter_uri,
                "table_version": active.table_version,
                "store_schema": ref.schema,
            },
        )
        with entry.lock:
            entry.served_at = self.clock()

    def _write_status(self, key: Key, entry: _Entry, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        status = redact_data(status)  # every condition message, whatever produced it (a job's error, the store)
        current = _normalized_status(body.get("status"))
        if current == status:
            return
        # The Fresh condition's message tells the evidence's age ("evidence is 3h old"), so it changes on every
        # reconcile. Alone, such a change is written at most once an hour: an idle policy costs one write an
        # hour, not one per resync. (Fresh turning False, or anything else changing, is written at once.)
        now = self.clock()
        if (
            current is not None
            and _without_age(current) == _without_age(status)
            and entry.status_written_at is not None
            and (now - entry.status_written_at).total_seconds() < AGE_MESSAGE_REFRESH_SECONDS
        ):
            return
        from kubernetes.client.exceptions import ApiException

        with entry.lock:
            events_before = entry.events
        try:
            # rbac: recupdate.io recommenderupdatepolicies/status patch
            answer = self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, key[0], PLURAL, key[1], {"status": status}, _request_timeout=REQUEST_TIMEOUT,
                _content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise BackendError(f"status patch: {exc.status} {exc.reason}") from None
        except Exception as exc:
            raise BackendError(f"status patch: {type(exc).__name__}") from None
        with entry.lock:
            entry.status_written_at = now
            if _rv(entry.body) == _rv(answer):
                entry.written, entry.written_rv, entry.unordered_events = None, None, 0  # the watch has caught up
                return
            entry.written, entry.written_rv = dict(answer), _rv(answer)
            # Events that arrived while the patch was on its way may be newer than our write (someone else's
            # change) or older: their order is unknown, so the next reconcile reads the object afresh.
            entry.unordered_events = 1 if entry.events != events_before else 0

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
        self._write_conditions(key, entry, body, [(ConditionType.DEGRADED, ConditionStatus.TRUE, reason, message)])
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
        self._write_conditions(key, entry, body, updates)
        return delay

    def _write_conditions(
        self,
        key: Key,
        entry: _Entry,
        body: Mapping[str, Any],
        updates: list[tuple[ConditionType, ConditionStatus, str, str]],
    ) -> None:
        """Set some conditions, leaving the rest of the status as it is (best effort: a failure is logged)."""
        raw = _normalized_status(body.get("status"))
        old = PolicyStatus.model_validate(raw) if raw is not None else PolicyStatus()
        conditions = list(old.conditions)
        generation = (body.get("metadata") or {}).get("generation")
        for ctype, status, reason, message in updates:
            conditions = set_condition(conditions, ctype, status, reason, message, self.clock(), generation)
        status_patch = old.model_copy(update={"conditions": conditions}).model_dump(mode="json", by_alias=True)
        try:
            self._write_status(key, entry, body, status_patch)
        except BackendError as exc:
            log.warning("%s/%s: %s", key[0], key[1], exc)


# ---------------------------------------------------------------------------------------------------------
# kopf registration


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """recupdate's kopf settings: persistence under our own prefix, Events only for warnings."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    # Our decisions are posted as Events explicitly (events.post); kopf's own log lines only when they warn.
    settings.posting.level = logging.WARNING


def _index_value(body: Mapping[str, Any], value: Any) -> dict[Key, Any] | None:
    key = owner_key(body)
    return {key: value} if key is not None and value is not None else None


def register(
    registry: kopf.OperatorRegistry, controller: Controller, *, peering: bool = False
) -> kopf.OperatorRegistry:
    """Register the operator's handlers for `controller` on `registry` (a fresh one per operator or test).

    peering=True (several operators, kopf peering): policies are reconciled only while kopf runs a daemon for
    them. kopf delivers its pause (a peer with a higher priority is active) to daemons only, and a daemon
    makes kopf put its finalizer (kopf.recupdate.io/finalizer) on each policy, so standalone operators, the
    default, have no daemon and no finalizer.
    """
    jobs_filter = {LABEL_POLICY: kopf.PRESENT}
    controller.gated = peering

    @kopf.on.startup(registry=registry, id="recupdate_startup")
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)
        await controller.start()

    @kopf.on.cleanup(registry=registry, id="recupdate_cleanup")
    async def cleanup(**_: Any) -> None:
        await controller.stop()

    @kopf.index(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=jobs_filter, registry=registry, id=JOBS_INDEX)
    def jobs_index(body: kopf.Body, **_: Any) -> dict[Key, Any] | None:
        return _index_value(body, observed_job(body))

    @kopf.index(RAY_GROUP, RAY_VERSION, RAYSERVICES, labels=jobs_filter, registry=registry, id=SERVICES_INDEX)
    def services_index(body: kopf.Body, **_: Any) -> dict[Key, Any] | None:
        return _index_value(body, _serving_status_of(body))

    # rbac: recupdate.io recommenderupdatepolicies list
    # rbac: recupdate.io recommenderupdatepolicies watch
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="recupdate_policy")
    async def policy_event(type: str | None, body: kopf.Body, **kwargs: Any) -> None:
        controller.attach(kwargs.get(JOBS_INDEX), kwargs.get(SERVICES_INDEX))
        controller.on_policy(type, body)

    # rbac: ray.io rayjobs list
    # rbac: ray.io rayjobs watch
    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=jobs_filter, registry=registry, id="recupdate_rayjob")
    async def rayjob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_job(type, body)

    # rbac: ray.io rayservices list
    # rbac: ray.io rayservices watch
    @kopf.on.event(
        RAY_GROUP, RAY_VERSION, RAYSERVICES, labels=jobs_filter, registry=registry, id="recupdate_rayservice"
    )
    async def rayservice_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_service(type, body)

    if peering:

        @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="recupdate_lease", cancellation_timeout=60.0)
        async def lease(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
            key = (namespace or "", name)
            controller.activate(key)
            try:
                await stopped.wait()
            finally:
                await controller.deactivate(key)

    @kopf.on.probe(registry=registry, id="policies")
    def probe(**_: Any) -> int:
        if controller._scheduler_task is not None and not controller.alive:
            raise RuntimeError("the reconcile scheduler has stopped")
        return len(controller._entries)

    return registry
