"""The operator's controller: kopf feeds it, the planner decides, a backend and the registry carry out.

Modules: ``handlers`` (kopf registration, thin), ``reconcile`` (the Controller: one reconcile of one policy and
its failure paths), ``status`` (per-policy state and the status write-through), ``scheduler``, ``config``.

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
policy of the same namespace and name resumes from it, adopting its owner record). A standalone operator (the default) uses no kopf daemon or timer (either makes kopf
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
Event); nothing here raises on it. So is a store schema that another policy owns (the registry read claims
the schema first, and the planner refuses a policy that is not its owner: SpecValid=False, SchemaInUse).
Messages are scrubbed of secrets (events.redact).

Status writes: only when the status changes; a change of the Fresh message alone (it states the evidence's
age) is written at most hourly, so an idle policy costs about one API request an hour.
"""

from .config import ControllerConfig, kube_api_client
from .handlers import configure_settings, register
from .reconcile import Controller

__all__ = ["Controller", "ControllerConfig", "configure_settings", "kube_api_client", "register"]
