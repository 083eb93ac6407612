"""The RecommenderUpdatePolicy API: pydantic models of spec and status.

These models are the single source of the CRD schema (crd.py renders them), so every field carries a
description, and constraints live in Field(...) where JSON schema can carry them. YAML and Kubernetes
JSON use camelCase (the alias); Python code uses snake_case (populate_by_name).
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

# Contract names the API re-exports (the "X as X" form), so that operator code imports the API from one place.
from recupdate_workloads.contract.durations import MAX_DURATION_SECONDS as MAX_DURATION_SECONDS
from recupdate_workloads.contract.durations import SPEC_DURATION_PATTERN
from recupdate_workloads.contract.durations import parse_duration as parse_duration
from recupdate_workloads.contract.labels import ANNOTATION_APPROVE as ANNOTATION_APPROVE
from recupdate_workloads.contract.labels import ANNOTATION_ROLLBACK as ANNOTATION_ROLLBACK
from recupdate_workloads.contract.labels import GROUP as GROUP
from recupdate_workloads.contract.labels import LABEL_GENERATION as LABEL_GENERATION
from recupdate_workloads.contract.labels import LABEL_KIND as LABEL_KIND
from recupdate_workloads.contract.labels import LABEL_POLICY as LABEL_POLICY
from recupdate_workloads.contract.labels import LABEL_RUN_ID as LABEL_RUN_ID
from recupdate_workloads.contract.registry import default_schema
from recupdate_workloads.contract.serve import APP_NAME, DEPLOYMENT_NAME

from . import schedule

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RecommenderUpdatePolicy"
PLURAL = "recommenderupdatepolicies"
SINGULAR = "recommenderupdatepolicy"
SHORT = "rup"
CRD_NAME = f"{PLURAL}.{GROUP}"

# ---------------------------------------------------------------------------------------------------------
# Durations: one grammar for both sides (contract.durations). The schema admits one unit only, so that CEL
# rules in the CRD can compare two durations (see generate/crd.py).

DURATION_PATTERN = SPEC_DURATION_PATTERN
DURATION_MAX_LENGTH = 10
MIN_REFRESH_INTERVAL = timedelta(minutes=1)
# The longest duration anywhere (contract.durations.MAX_DURATION_SECONDS, 10 years): it keeps every time the
# planner derives (fire +/- window, staleness limits, deadlines) inside datetime's range. The CRD carries it
# as a CEL rule (generate/crd.py), so the API server rejects what the planner could not schedule.
MAX_DURATION = timedelta(seconds=MAX_DURATION_SECONDS)


def _positive_duration(value: str) -> str:
    if parse_duration(value) <= timedelta(0):
        raise ValueError(f"duration {value!r} must be greater than zero")
    return value


Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=DURATION_MAX_LENGTH),
    AfterValidator(_positive_duration),
]

# Cron: five fields or a macro, like a Kubernetes CronJob (no seconds field, no CRON_TZ= prefix).
CRON_PATTERN = r"^(@(annually|yearly|monthly|weekly|daily|midnight|hourly)|\S+( +\S+){4})$"
# croniter's R (random) and H (hashed) fields: a random minute differs on every reconcile, so run ids (and
# launches) would too. Also a CEL rule in the CRD; RE2 and Python read this pattern alike.
CRON_RANDOM_PATTERN = r"(^|[ ,])[RrHh]([(/ ,]|$)"
# Any fixed time: the Gregorian calendar repeats every 400 years, so an expression that fires once fires in
# every window schedule.CRON_SEARCH_YEARS long, at any `now`, and one that never fires (Feb 30) fails here.
_CRON_PROBE_FROM = datetime(2000, 1, 1, tzinfo=UTC)


def _valid_cron(value: str) -> str:
    if re.search(CRON_RANDOM_PATTERN, value):
        raise ValueError(f"cron expression {value!r}: random (R) and hashed (H) fields are not supported")
    if not croniter.is_valid(value):
        raise ValueError(f"invalid cron expression {value!r}")
    try:
        schedule.next_cron_fire(value, _CRON_PROBE_FROM)
    except (ValueError, OverflowError) as exc:  # croniter's CroniterBadDateError is a ValueError
        raise ValueError(f"cron expression {value!r} never fires (e.g. February 30)") from exc
    return value


def _valid_time_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (KeyError, ValueError, OSError) as exc:  # not found, a bad key, or a path such as a directory
        raise ValueError(f"unknown time zone {value!r}") from exc
    return value


Cron = Annotated[str, Field(pattern=CRON_PATTERN, max_length=100), AfterValidator(_valid_cron)]
TimeZone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_valid_time_zone)]
# Kubernetes resource quantity, e.g. "512Mi", "4Gi".
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$"
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]


class CamelModel(BaseModel):
    """Base for spec models: camelCase on the wire, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)


# ---------------------------------------------------------------------------------------------------------
# Spec


class LoRASpec(CamelModel):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA scaling factor alpha.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout applied to the LoRA layers.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names to adapt (e.g. q_proj, v_proj). Empty: PEFT's 'all-linear'.",
    )


class ModelSpec(CamelModel):
    base: str = Field(
        default="",
        max_length=512,
        description="Base causal LM: a Hugging Face model id or a path in the workloads image. "
        "Empty: bootstrap a small model from scratch (demo and tests).",
    )
    lora: LoRASpec = Field(default_factory=LoRASpec, description="LoRA adapter hyperparameters.")


class SecretKeyRef(CamelModel):
    name: str = Field(..., min_length=1, max_length=253, description="Name of a Secret in the policy's namespace.")
    key: str = Field(default="dsn", min_length=1, max_length=253, description="Key in the Secret holding the value.")


class DataFormat(StrEnum):
    AUTO = "auto"
    PARQUET = "parquet"
    CSV = "csv"


class InteractionColumns(CamelModel):
    """Column names of an interactions source (file or SQL) for the canonical user, item, ts, weight, eventId."""

    user: str = Field(default="user", min_length=1, max_length=128, description="Column of the external user id.")
    item: str = Field(default="item", min_length=1, max_length=128, description="Column of the external item id.")
    ts: str = Field(
        default="ts",
        min_length=1,
        max_length=128,
        description="Column of the time: a timestamp, a date, unix seconds, or ISO-8601 text (docs/data.md).",
    )
    weight: str = Field(
        default="weight",
        min_length=1,
        max_length=128,
        description="Column of the rating or weight; a source without this column gives every row 1.0.",
    )
    event_id: str = Field(
        default="",
        max_length=128,
        description="Column of a unique event id: a row whose id the store holds is a duplicate and skipped. "
        "Empty: no event ids (files are still ingested exactly once, by file).",
    )


class ItemColumns(CamelModel):
    """Column names of an items source: each item's external id and its cluster's external id."""

    item: str = Field(default="item", min_length=1, max_length=128, description="Column of the external item id.")
    cluster: str = Field(
        default="cluster", min_length=1, max_length=128, description="Column of the item's cluster (its external id)."
    )


class ClusterColumns(CamelModel):
    """Column names of a clusters source: external id, display name and keywords."""

    cluster: str = Field(
        default="cluster", min_length=1, max_length=128, description="Column of the cluster's external id."
    )
    name: str = Field(
        default="name",
        min_length=1,
        max_length=128,
        description="Column of the cluster's name (what the model generates). Absent: the id is the name.",
    )
    keywords: str = Field(
        default="keywords",
        min_length=1,
        max_length=128,
        description="Column of keywords: a list, or text separated by ';' or ','. Absent: the name.",
    )


class SqlQuery(CamelModel):
    """A query against the user's PostgreSQL, read incrementally by a watermark column."""

    query: str = Field(
        ...,
        min_length=1,
        max_length=16384,
        description="A SELECT whose result has the mapped columns (and the watermark column). It is run as "
        "SELECT * FROM (<query>) q WHERE q.<watermark> > <last watermark> ORDER BY q.<watermark>.",
    )
    watermark: str = Field(
        default="",
        max_length=128,
        description="A column of the result that grows with every new row (a bigserial id, an insertion "
        "time): rows up to the largest value ingested are not read again. Empty: the whole result at every "
        "sync (fine for the catalogue, which is updated by id; interactions need a watermark or an eventId).",
    )


class SqlSource(CamelModel):
    """The user's own PostgreSQL, for data URIs `sql`."""

    dsn_secret_ref: SecretKeyRef = Field(
        ...,
        description="Secret key holding the DSN of the user's PostgreSQL, passed to jobs as "
        "RECUPDATE_SOURCE_DSN (never written into a manifest).",
    )
    interactions: SqlQuery | None = Field(default=None, description="The interactions query (interactions: sql).")
    items: SqlQuery | None = Field(default=None, description="The items query (items: sql).")
    clusters: SqlQuery | None = Field(default=None, description="The clusters query (clusters: sql).")


class ObjectStorage(CamelModel):
    """How s3:// URIs are reached (pyarrow's S3 filesystem)."""

    endpoint: str = Field(
        default="",
        max_length=512,
        description="host[:port] of an S3-compatible server (MinIO, Ceph, ...). Empty: AWS S3.",
    )
    scheme: str = Field(default="https", pattern=r"^https?$", description="https, or http for a plain endpoint.")
    region: str = Field(default="", max_length=64, description="Bucket region. Empty: the SDK's default.")
    credentials_secret: str = Field(
        default="",
        max_length=253,
        description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN), passed to jobs as those variables. Empty: the pods' own credentials (IRSA, "
        "instance profile).",
    )


#: URIs of a data source other than a path: docs/data.md.
_SOURCE_DESCRIPTION = (
    "'postgres' (the store's own inbox tables, docs/data.md 'The table contract'), 'sql' (the query in "
    "data.sql), a Parquet/CSV file or directory (a path in the job image, file://, or s3://bucket/prefix: "
    "new files are ingested once each)"
)


class DataSpec(CamelModel):
    interactions: str = Field(
        default="synthetic",
        min_length=1,
        max_length=1024,
        description="Interaction source URI: 'synthetic' (the deterministic drift stream, growing with time), "
        f"'movielens:<path>', {_SOURCE_DESCRIPTION}.",
    )
    items: str = Field(
        default="",
        max_length=1024,
        description=f"Items -> clusters source URI: {_SOURCE_DESCRIPTION}. Empty: derived from the interactions "
        "source (synthetic, MovieLens genres), else only the inbox tables.",
    )
    clusters: str = Field(
        default="",
        max_length=1024,
        description=f"Clusters (name, keywords) source URI: {_SOURCE_DESCRIPTION}. Empty: derived from the "
        "interactions source, else the clusters the items name (named by their ids) and the inbox tables.",
    )
    format: DataFormat = Field(
        default=DataFormat.AUTO,
        description="File format of file sources: auto (Parquet by its magic bytes, else CSV), parquet or csv.",
    )
    columns: InteractionColumns = Field(
        default_factory=InteractionColumns, description="Column mapping of the interactions source."
    )
    item_columns: ItemColumns = Field(default_factory=ItemColumns, description="Column mapping of the items source.")
    cluster_columns: ClusterColumns = Field(
        default_factory=ClusterColumns, description="Column mapping of the clusters source."
    )
    sql: SqlSource | None = Field(default=None, description="The user's PostgreSQL, for sources named 'sql'.")
    object_storage: ObjectStorage = Field(
        default_factory=ObjectStorage, description="Endpoint and credentials of s3:// sources."
    )
    positive_threshold: float = Field(
        default=4.0, description="An interaction is positive when its rating/value is at least this."
    )
    context_length: int = Field(
        default=2,
        ge=1,
        le=8,
        description="k: the number of distinct recent clusters that make a user's state.",
    )

    @model_validator(mode="after")
    def _check_sql(self) -> DataSpec:
        for name in ("interactions", "items", "clusters"):
            if getattr(self, name) == "sql" and (self.sql is None or getattr(self.sql, name) is None):
                raise ValueError(f"data.{name} is 'sql': data.sql.{name} must give the query")
        q = self.sql.interactions if self.sql is not None and self.interactions == "sql" else None
        if q is not None and not q.watermark and not self.columns.event_id:
            raise ValueError(
                "data.sql.interactions needs a watermark column (or data.columns.eventId): "
                "otherwise every sync would read every row again"
            )
        return self


class StoreSpec(CamelModel):
    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the PostgreSQL DSN, passed to jobs as RECUPDATE_STORE_DSN. "
        "Absent: jobs use the DSN the operator itself was given (local mode: the embedded store).",
    )
    db_schema: str = Field(
        default="",
        alias="schema",
        max_length=63,
        pattern=r"^([a-z_][a-z0-9_]*)?$",
        description="PostgreSQL schema holding this policy's registry, snapshots and tables. "
        "Empty: the policy name, sanitized (see schema_name). Immutable once set.",
    )


class ConcurrencyPolicy(StrEnum):
    FORBID = "Forbid"
    REPLACE = "Replace"
    ALLOW = "Allow"


class Hyperparameters(CamelModel):
    epochs: int = Field(default=1, ge=1, le=1000, description="Training epochs over the curated triples.")
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="Optimizer learning rate.")
    batch_size: int = Field(default=16, ge=1, le=65536, description="Per-worker batch size.")
    max_per_pair: int = Field(
        default=100,
        ge=0,
        description="Cap on training triples per (c1, c2) pair, against head pairs dominating. 0: no cap.",
    )
    with_evidence: bool = Field(
        default=True,
        description="Train with RAG evidence in the prompt (each triple with the evidence as of its time).",
    )


class WorkerResources(CamelModel):
    workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers.")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs per worker.")
    gpus_per_worker: float = Field(default=0.0, ge=0.0, description="GPUs per worker (0: CPU training).")
    memory_per_worker: Quantity = Field(default="4Gi", description="Memory per worker, a Kubernetes quantity.")


class OnDriftSpec(CamelModel):
    """Fine-tunes triggered by measured drift (docs/spec.md, fineTune.onDrift)."""

    threshold: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Launch a fine-tune when the drift beyond the noise floor, measured by the latest refresh "
        "against the window the active adapter was trained on, reaches this: the shuffled-window minus the "
        "observed mean Jaccard of the top-5 successor sets (0: no more change than sampling noise).",
    )
    min_interval: Duration = Field(
        default="7d",
        description="At least this long between a fine-tune's scheduled time and a drift-triggered one: the "
        "cost bound. Drift measured sooner waits for it.",
    )
    max_interval: Duration | None = Field(
        default=None,
        description="At most this long between fine-tunes: one is launched at the last one's scheduled time "
        "plus this, whatever the drift. Absent: no cap.",
    )

    @model_validator(mode="after")
    def _check_intervals(self) -> OnDriftSpec:
        # Same rule as the CEL rule in the CRD.
        if self.max_interval is not None and parse_duration(self.max_interval) < parse_duration(self.min_interval):
            raise ValueError("onDrift.maxInterval must be at least minInterval")
        return self


class FineTuneSpec(CamelModel):
    schedule: Cron | None = Field(
        default="0 3 1 * *",
        description="Cron schedule of LoRA fine-tunes (five fields or @macro). null: no schedule, fine-tunes "
        "only when onDrift asks for one (and the initial one).",
    )
    time_zone: TimeZone = Field(default="UTC", description="IANA time zone the schedule is read in.")
    initial_run: bool = Field(
        default=True,
        description="Launch a fine-tune at once when the policy has never fine-tuned and has no active "
        "release, instead of waiting for the first scheduled time.",
    )
    window: Duration = Field(default="365d", description="Training data window ending at the scheduled time.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings.")
    resources: WorkerResources = Field(default_factory=WorkerResources, description="Ray Train workers.")
    concurrency_policy: ConcurrencyPolicy = Field(
        default=ConcurrencyPolicy.FORBID,
        description="When a fine-tune is due while one runs: Forbid (wait for it), Replace (stop it, "
        "launch the new one) or Allow (run both).",
    )
    starting_deadline_seconds: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DURATION_SECONDS,
        description="A scheduled fine-tune that could not start within this many seconds of its time is "
        "skipped (like CronJob). Absent: a missed run starts late, whenever it can.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a failed fine-tune (same scheduled time), with exponential delay.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DURATION_SECONDS,
        description="Wall-clock limit of one fine-tune job, after which it is stopped and fails.",
    )
    on_drift: OnDriftSpec | None = Field(
        default=None,
        description="Also fine-tune when a refresh measures drift beyond the threshold, at most every "
        "minInterval and at least every maxInterval. Absent: the schedule alone decides.",
    )


class Scoring(StrEnum):
    FREQUENCY = "frequency"
    TREND = "trend"


class RetrievalSpec(CamelModel):
    refresh_interval: Duration = Field(
        default="6h",
        description="Interval of RAG refreshes, aligned to multiples of it since the Unix epoch (UTC).",
    )
    window: Duration = Field(default="30d", description="Evidence window: successors are counted over this period.")
    top_successors: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Successors per pair put into the prompt as evidence (the paper found 1 enough).",
    )
    scoring: Scoring = Field(
        default=Scoring.FREQUENCY,
        description="Evidence scoring: frequency (most frequent successors) or trend (largest rise between windows).",
    )
    min_support: int = Field(
        default=5,
        ge=1,
        description="A pair with fewer observed transitions borrows evidence from its neighbours.",
    )
    neighbours: int = Field(
        default=5,
        ge=0,
        le=100,
        description="Nearest pairs (pgvector similarity) that sparse pairs borrow from. 0: none.",
    )
    max_staleness: Duration = Field(
        default="24h",
        description="The policy is Fresh while its active release's evidence is younger than this.",
    )
    blend: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "How much the transition table's ranking leans on the evidence: each cluster is scored by "
            "(1 - blend) x the model's likelihood + blend x its evidence share. 0: the LLM alone; 1: the "
            "evidence's order, the model ordering what the evidence does not list. Releases record both figures."
        ),
    )

    @model_validator(mode="after")
    def _check_intervals(self) -> RetrievalSpec:
        # Same rules as the CEL rules in the CRD. Run ids have minute resolution: faster refreshes collide;
        # a staleness bound below the interval would mark every policy stale between refreshes.
        if parse_duration(self.refresh_interval) < MIN_REFRESH_INTERVAL:
            raise ValueError("refreshInterval must be at least 1m")
        if parse_duration(self.max_staleness) < parse_duration(self.refresh_interval):
            raise ValueError("maxStaleness must be at least refreshInterval")
        return self


class Promotion(StrEnum):
    AUTOMATIC = "Automatic"
    MANUAL = "Manual"


class AnalysisMode(StrEnum):
    SHADOW = "Shadow"
    CANARY = "Canary"


class AnalysisSpec(CamelModel):
    """Analysis on live events before promotion (docs/analysis.md): a candidate that passed the offline gates is
    scored against the active release on the interactions that arrive after the analysis starts, by HR@5 on
    the users' actual next novel clusters, and promoted only if it is no worse beyond maxRegression."""

    mode: AnalysisMode = Field(
        default=AnalysisMode.SHADOW,
        description="Shadow: both tables are scored on every new event and no user sees the candidate. Canary: "
        "a stable hash of the user id sends trafficPercent of /recommend requests to the candidate (both tables "
        "in the same Serve replicas); each arm is scored with the table that served it.",
    )
    duration: Duration = Field(
        default="1h",
        description="How long the analysis runs. The candidate is promoted when it ends with at least minEvents "
        "events and no regression beyond maxRegression; with fewer events it is Inconclusive and held.",
    )
    traffic_percent: int = Field(
        default=10,
        ge=1,
        le=50,
        description="Canary only: the percentage of users (by a stable hash of the request's user_id) whose "
        "/recommend requests the candidate answers.",
    )
    min_events: int = Field(
        default=500,
        ge=1,
        le=1_000_000_000,
        description="Scored events (a user's next novel cluster after two distinct ones) needed for a verdict; "
        "in Canary mode, in each arm.",
    )
    max_regression: float = Field(
        default=0.005,
        ge=0.0,
        le=1.0,
        description="Largest allowed drop of the candidate's HR@5 below the active release's (absolute). Once "
        "minEvents are scored, a larger drop aborts the analysis at once: the candidate is rejected.",
    )


class GatesSpec(CamelModel):
    min_exact_match: float = Field(
        default=0.90,
        ge=0.0,
        le=1.0,
        description="Minimum rate of generated answers that map exactly to a cluster.",
    )
    min_recall: float = Field(
        default=0.015, ge=0.0, le=1.0, description="Minimum recall on the most recent held-out window."
    )
    max_regression: float = Field(
        default=0.002,
        ge=0.0,
        le=1.0,
        description="Largest allowed drop in recall against the active release on the same window (absolute).",
    )
    promotion: Promotion = Field(
        default=Promotion.AUTOMATIC,
        description="Automatic: promote every candidate that passes its gates. Manual: wait for the "
        "annotation recupdate.io/approve=<release id>.",
    )
    analysis: AnalysisSpec | None = Field(
        default=None,
        description="Analysis on live events before an automatic promotion (Shadow or Canary). Absent: a "
        "candidate that passes its gates is promoted at once.",
    )


class ServeResources(CamelModel):
    cpus: float = Field(default=1.0, gt=0.0, description="CPUs per Serve replica.")
    gpus: float = Field(default=0.0, ge=0.0, description="GPUs per Serve replica.")
    memory: Quantity = Field(default="2Gi", description="Memory per Serve replica, a Kubernetes quantity.")


class ServingSpec(CamelModel):
    enabled: bool = Field(default=True, description="Own a RayService that serves the active release.")
    image: str = Field(default="", max_length=512, description="Serving image. Empty: runtime.image.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Serve replicas of the recommender deployment.")
    resources: ServeResources = Field(default_factory=ServeResources, description="Per-replica resources.")
    application_name: str = Field(
        default=APP_NAME, min_length=1, max_length=63, description="Ray Serve application name."
    )
    deployment_name: str = Field(
        default=DEPLOYMENT_NAME,
        min_length=1,
        max_length=63,
        description="Ray Serve deployment name in the application.",
    )
    grpc_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Also serve the gRPC API (recupdate.v1.Recommender, docs/serving.md) through Ray Serve's gRPC "
        "proxy on this port of the Ray head. Unset: HTTP only.",
    )


class EnvVar(CamelModel):
    name: str = Field(..., min_length=1, max_length=256, description="Environment variable name.")
    value: str = Field(default="", description="Environment variable value.")


class RuntimeSpec(CamelModel):
    image: str = Field(
        default="recupdate-workloads:0.1.0",
        min_length=1,
        max_length=512,
        description="Workloads image for Ray jobs.",
    )
    ray_version: str = Field(default="2.60.0", min_length=1, max_length=32, description="Ray version in the image.")
    cluster_selector: dict[str, str] | None = Field(
        default=None,
        min_length=1,
        description="Labels of an existing RayCluster to run jobs on, instead of a RayCluster per job.",
    )
    service_account_name: str = Field(
        default="",
        max_length=253,
        description="Service account of job and serving pods. Empty: the namespace default.",
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables for job pods.")

    @model_validator(mode="after")
    def _unique_env(self) -> RuntimeSpec:
        # The CRD makes env a list-map keyed by name (crd.py): the API server rejects a name given twice.
        names = [e.name for e in self.env]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"env: duplicate name(s) {', '.join(dup)}")
        return self


class HistorySpec(CamelModel):
    successful_runs_limit: int = Field(default=3, ge=0, le=100, description="Finished successful jobs kept, per kind.")
    failed_runs_limit: int = Field(default=1, ge=0, le=100, description="Finished failed jobs kept, per kind.")
    releases_limit: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Retired and rejected releases kept in the store (rollback targets).",
    )


class PolicySpec(CamelModel):
    suspend: bool = Field(default=False, description="No new runs while true; running ones continue.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model and LoRA adapter.")
    data: DataSpec = Field(default_factory=DataSpec, description="Where interactions and clusters come from.")
    store: StoreSpec = Field(default_factory=StoreSpec, description="The PostgreSQL + pgvector store.")
    fine_tune: FineTuneSpec = Field(default_factory=FineTuneSpec, description="Scheduled LoRA fine-tunes.")
    retrieval: RetrievalSpec = Field(default_factory=RetrievalSpec, description="Interval RAG evidence refreshes.")
    gates: GatesSpec = Field(default_factory=GatesSpec, description="Quality gates and promotion mode.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The owned RayService.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Where and how jobs run.")
    history: HistorySpec = Field(default_factory=HistorySpec, description="How much history is kept.")

    @model_validator(mode="after")
    def _check_analysis(self) -> PolicySpec:
        # Every refresh registers a candidate, and a newer candidate restarts the analysis (as a new revision
        # restarts an Argo Rollouts analysis): a longer analysis would never end.
        a = self.gates.analysis
        if a is not None and parse_duration(a.duration) >= parse_duration(self.retrieval.refresh_interval):
            raise ValueError("gates.analysis.duration must be shorter than retrieval.refreshInterval")
        return self


# A policy name that maps to its default schema by '-' -> '_' alone (what every name mapped to before schemas
# had owners, kept so that existing policies keep their data).


def schema_name(policy_name: str, spec: PolicySpec | None = None) -> str:
    """The store schema of a policy: spec.store.schema, else the default for its name (contract.registry)."""
    if spec is not None and spec.store.db_schema:
        return spec.store.db_schema
    return default_schema(policy_name)


# ---------------------------------------------------------------------------------------------------------
# Validation as the API server does it. The operator's planner and local mode both go through validate_spec,
# so a spec gets the same verdict from `kubectl apply` + the operator and from `recupdate local`.

# RFC 1123, the rules the API server applies to metadata.name of a custom resource (a DNS subdomain) and to a
# namespace (a DNS label); apimachinery's IsDNS1123Subdomain and IsDNS1123Label.
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1123_SUBDOMAIN_MAX = 253
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL_MAX = 63
_INT64 = (-(2**63), 2**63 - 1)
_MAX_NODES = 100_000  # values in one document: YAML aliases can make a small file expand enormously
_ROOT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


class PolicyError(ValueError):
    """A policy the API server would reject, or the planner would mark SpecValid=False. One line of text."""


def check_name(name: Any, field: str = "metadata.name") -> str:
    """A policy name as the API server checks it: a DNS-1123 subdomain (lowercase, digits, '-', '.')."""
    if name is None or name == "":
        raise PolicyError(f"{field} is required")
    if not isinstance(name, str):
        raise PolicyError(f"{field} must be a string, not {_json_type(name)} {_shown(name)}")
    if len(name) > DNS1123_SUBDOMAIN_MAX or not DNS1123_SUBDOMAIN.fullmatch(name):
        raise PolicyError(
            f"{field} {_shown(name)} is not a lowercase RFC 1123 subdomain: lowercase letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, at most {DNS1123_SUBDOMAIN_MAX} characters"
        )
    return name


def check_namespace(namespace: Any, field: str = "metadata.namespace") -> str:
    """A namespace as the API server checks it: a DNS-1123 label. Absent or empty: 'default'."""
    if namespace is None or namespace == "":
        return "default"
    if not isinstance(namespace, str):
        raise PolicyError(f"{field} must be a string, not {_json_type(namespace)} {_shown(namespace)}")
    if len(namespace) > DNS1123_LABEL_MAX or not DNS1123_LABEL.fullmatch(namespace):
        raise PolicyError(
            f"{field} {_shown(namespace)} is not a lowercase RFC 1123 label: lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {DNS1123_LABEL_MAX} characters"
        )
    return namespace


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def as_json(value: Any, path: str = "") -> Any:
    """`value` as plain JSON data (dict, list, str, int, float, bool, None), or PolicyError saying where it is
    not: what the API server can receive. No NaN or infinity, integers within int64, string keys only."""
    budget = [_MAX_NODES]

    def walk(v: Any, where: str) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise PolicyError(f"more than {_MAX_NODES} values in one document")
        if v is None or isinstance(v, str | bool):
            return v
        if isinstance(v, int):
            if not _INT64[0] <= v <= _INT64[1]:
                raise PolicyError(f"{where or '<root>'}: integer {v} is outside the 64-bit range")
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise PolicyError(f"{where or '<root>'}: {v} is not a JSON number")
            return v
        if isinstance(v, Mapping):
            out = {}
            for key, item in v.items():
                if not isinstance(key, str):
                    raise PolicyError(f"{where or '<root>'}: key {key!r} is not a string (quote it)")
                out[key] = walk(item, f"{where}.{key}" if where else key)
            return out
        if isinstance(v, list | tuple):
            return [walk(item, f"{where}[{i}]") for i, item in enumerate(v)]
        raise PolicyError(f"{where or '<root>'}: a {type(v).__name__} is not a JSON value")

    return walk(value, path)


def _field_shape(annotation: Any) -> tuple[bool, type[BaseModel] | None, bool]:
    """(nullable, nested model, is a list of it) of a field annotation, the way crd.py renders it."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    nullable = type(None) in args
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return nullable, arg, False
        if typing.get_origin(arg) is list:
            item = typing.get_args(arg)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                return nullable, item, True
    return nullable, None, False


def _drop_nulls(value: Any, model: type[BaseModel]) -> Any:
    """The API server prunes null from a field that is not nullable, then defaults it: do the same."""
    if not isinstance(value, dict):
        return value
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    out: dict[str, Any] = {}
    for key, item in value.items():
        f = fields.get(key)
        if f is not None:
            nullable, nested, many = _field_shape(f.annotation)
            if item is None and not nullable:
                continue
            if nested is not None and many and isinstance(item, list):
                item = [_drop_nulls(v, nested) for v in item]
            elif nested is not None and not many:
                item = _drop_nulls(item, nested)
        out[key] = item
    return out


def validate_spec(raw: Mapping[str, Any] | None) -> PolicySpec:
    """A spec validated as the CRD's schema types it: strict JSON types ('yes' is not a boolean, 1.0 not an
    integer, 5 not a string), camelCase names only, null in a non-nullable field treated as absent. Then the
    checks a schema cannot express (cron expressions, time zones). Raises ValidationError or PolicyError."""
    data = _drop_nulls(as_json(raw if raw is not None else {}, "spec"), PolicySpec)
    return PolicySpec.model_validate_json(json.dumps(data), strict=True, by_alias=True, by_name=False)


def describe(exc: ValidationError, prefix: str = "") -> str:
    """A ValidationError as one line: 'spec.suspend: Input should be a valid boolean; ...'."""
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validate_policy_object(obj: Any) -> tuple[str, str, PolicySpec]:
    """(name, namespace, spec) of a whole RecommenderUpdatePolicy object, checked as `kubectl apply` and the
    API server check it (kind, names, the spec schema) plus what the operator checks. Raises PolicyError."""
    if not isinstance(obj, Mapping):
        raise PolicyError(f"expected a {KIND} object (a mapping), got {_json_type(obj)}")
    obj = as_json(obj)
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise PolicyError(
            f"expected apiVersion {API_VERSION} and kind {KIND}, got {obj.get('apiVersion')!r} and {obj.get('kind')!r}"
        )
    unknown = sorted(set(obj) - _ROOT_FIELDS)
    if unknown:
        raise PolicyError(f"unknown field(s) {', '.join(unknown)}")
    meta = obj.get("metadata")
    if meta is None:
        raise PolicyError("metadata.name is required")
    if not isinstance(meta, dict):
        raise PolicyError(f"metadata must be a mapping, not {_json_type(meta)} {_shown(meta)}")
    name = check_name(meta.get("name"))
    namespace = check_namespace(meta.get("namespace"))
    for key in ("labels", "annotations"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise PolicyError(f"metadata.{key} must map strings to strings")
    try:
        spec = validate_spec(obj.get("spec"))
    except ValidationError as exc:
        raise PolicyError(f"invalid spec: {describe(exc, 'spec')}") from None
    return name, namespace, spec


# ---------------------------------------------------------------------------------------------------------
# Status


class StatusModel(CamelModel):
    # Status may come from a newer or older operator: ignore what we don't know.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, alias_generator=to_camel)


class ConditionType(StrEnum):
    READY = "Ready"
    FRESH = "Fresh"
    FINE_TUNING = "FineTuning"
    REFRESHING = "Refreshing"
    DEGRADED = "Degraded"
    SPEC_VALID = "SpecValid"
    ANALYZING = "Analyzing"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    type: ConditionType = Field(..., description="Condition type.")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="One CamelCase word saying why.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="The spec generation this condition reflects.")


class RunKind(StrEnum):
    FINETUNE = "finetune"
    REFRESH = "refresh"


class RunResult(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class RunCost(StatusModel):
    """What a run cost, as it recorded in the registry (runs.cost)."""

    cpu_seconds: float = Field(default=0.0, ge=0.0, description="CPU seconds of the job and its Ray workers.")
    gpu_seconds: float = Field(default=0.0, ge=0.0, description="GPU seconds (training workers x GPUs each).")
    training_tokens: int = Field(default=0, ge=0, description="Tokens the fine-tune trained on (0 for a refresh).")
    wall_seconds: float = Field(default=0.0, ge=0.0, description="Wall seconds of the run.")
    rows_ingested: int = Field(default=0, ge=0, description="Interactions its sync step added to the store.")


class RunRef(StatusModel):
    run_id: str = Field(..., description="Run id; also the name of its RayJob.")
    kind: RunKind = Field(..., description="finetune or refresh.")
    job_name: str = Field(default="", description="Name of the RayJob (or local job) running it.")
    scheduled_at: datetime | None = Field(default=None, description="The scheduled time the run was launched for.")
    attempt: int = Field(default=0, ge=0, description="0 for the first try of a scheduled time, n for its n-th retry.")
    generation: int | None = Field(default=None, description="The spec generation the run was launched for.")
    config_hash: str = Field(
        default="", description="Hash of the run's inputs, to tell whether a spec change affects it."
    )
    started_at: datetime | None = Field(default=None, description="When the run was launched.")
    finished_at: datetime | None = Field(default=None, description="When the run finished.")
    result: RunResult = Field(default=RunResult.RUNNING, description="Running, Succeeded or Failed.")
    reason: str = Field(default="", description="Why it ended so (e.g. JobFailed, JobDeleted, Replaced).")
    message: str = Field(default="", description="Details, e.g. the job's error.")
    cost: RunCost | None = Field(default=None, description="What the run cost, once it ended (from the registry).")


class FailureCounts(StatusModel):
    finetune: int = Field(default=0, ge=0, description="Consecutive failed fine-tunes (drives backoff).")
    refresh: int = Field(default=0, ge=0, description="Consecutive failed refreshes (drives backoff).")


class SyncStatus(StatusModel):
    """The data sync of a run (docs/data.md): what came in from the policy's sources before it counted."""

    run_id: str = Field(..., description="The run whose sync step this was.")
    rows: int = Field(default=0, ge=0, description="Interaction rows read: new + duplicate + skipped.")
    new: int = Field(default=0, ge=0, description="Interactions added to the store.")
    duplicate: int = Field(default=0, ge=0, description="Rows whose event id the store already held.")
    skipped: dict[str, int] = Field(default_factory=dict, description="Bad rows skipped, per reason.")
    files: int = Field(default=0, ge=0, description="Files ingested.")
    seconds: float = Field(default=0.0, ge=0.0, description="Wall seconds of the sync.")


class ChangeStatus(StatusModel):
    """A candidate's change against the table that was active when it was built (its job measured it)."""

    release_id: str = Field(..., description="The candidate release.")
    kind: RunKind | None = Field(default=None, description="The kind of run that built it (finetune or refresh).")
    against: str = Field(default="", description="The release that was active, whose table it is compared with.")
    pairs: int = Field(default=0, ge=0, description="Context pairs both tables hold (the figures are over these).")
    top1_changed: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of those pairs whose top-1 changed.")
    top5_overlap: float = Field(default=1.0, ge=0.0, le=1.0, description="Mean overlap of their top-5 lists.")
    new_pairs: int = Field(default=0, ge=0, description="Pairs only the candidate's table holds.")
    dropped_pairs: int = Field(default=0, ge=0, description="Pairs only the active table held.")


class DriftStatus(StatusModel):
    """The drift the newest refresh measured: its evidence window against the active adapter's training
    window (docs/spec.md, fineTune.onDrift)."""

    release_id: str = Field(..., description="The release (refresh candidate) whose run measured it.")
    measured_at: datetime | None = Field(default=None, description="The end of the evidence window measured.")
    adapter_run: str | None = Field(default=None, description="The fine-tune whose training window it is against.")
    jaccard: float | None = Field(default=None, description="Mean Jaccard of the top-5 successor sets.")
    floor_jaccard: float | None = Field(
        default=None, description="The same with the windows' labels shuffled within each context (noise floor)."
    )
    excess: float | None = Field(
        default=None, description="Drift beyond the noise floor: floorJaccard - jaccard (what onDrift compares)."
    )
    contexts: int = Field(default=0, ge=0, description="Contexts with enough support in both windows.")


class AnalysisPhase(StrEnum):
    RUNNING = "Running"
    PROMOTED = "Promoted"
    ABORTED = "Aborted"
    INCONCLUSIVE = "Inconclusive"
    CANCELLED = "Cancelled"


class AnalysisStatus(StatusModel):
    """The analysis of a candidate on live events (gates.analysis), in progress or its verdict."""

    release_id: str = Field(..., description="The candidate under analysis.")
    baseline_release: str = Field(..., description="The active release it is compared with.")
    mode: AnalysisMode = Field(default=AnalysisMode.SHADOW, description="Shadow or Canary.")
    traffic_percent: int = Field(default=0, ge=0, le=100, description="Canary: the candidate's share of users.")
    phase: AnalysisPhase = Field(
        default=AnalysisPhase.RUNNING, description="Running, Promoted, Aborted, Inconclusive or Cancelled."
    )
    started_at: datetime | None = Field(default=None, description="When it started; events after it are scored.")
    ends_at: datetime | None = Field(default=None, description="When the analysis window ends.")
    finished_at: datetime | None = Field(default=None, description="When the verdict was given.")
    measured_at: datetime | None = Field(default=None, description="When the figures were last measured.")
    candidate_events: int = Field(default=0, ge=0, description="Events the candidate's table was scored on.")
    baseline_events: int = Field(default=0, ge=0, description="Events the active table was scored on.")
    candidate_hit_rate: float | None = Field(default=None, description="The candidate's HR@5 on its events.")
    baseline_hit_rate: float | None = Field(default=None, description="The active release's HR@5 on its events.")
    message: str = Field(default="", max_length=4096, description="The figures or the reason for the verdict.")


class PolicyStatus(StatusModel):
    observed_generation: int | None = Field(default=None, description="The spec generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Fresh, FineTuning, ...")
    active_release: str | None = Field(default=None, description="The release the registry marks active.")
    active_release_evidence_at: datetime | None = Field(
        default=None, description="End of the evidence window of the active release (for Fresh)."
    )
    served_release: str | None = Field(default=None, description="The release the RayService was last rolled to.")
    candidate_release: str | None = Field(
        default=None,
        description="The newest candidate that passed its gates but is held (Manual promotion, spec change).",
    )
    last_fine_tune: RunRef | None = Field(default=None, description="The latest finished or running fine-tune.")
    last_refresh: RunRef | None = Field(default=None, description="The latest finished or running refresh.")
    last_sync: SyncStatus | None = Field(
        default=None, description="The data sync of the newest run that recorded one (rows, bad rows per reason)."
    )
    last_change: ChangeStatus | None = Field(
        default=None, description="The change of the newest candidate that measured one, against the active table."
    )
    last_drift: DriftStatus | None = Field(
        default=None, description="The drift the newest refresh measured against the active adapter."
    )
    next_fine_tune_reason: str | None = Field(
        default=None, description="Why the next fine-tune is due: schedule, drift or maxInterval."
    )
    active_runs: list[RunRef] = Field(default_factory=list, description="Runs in flight.")
    failures: FailureCounts = Field(default_factory=FailureCounts, description="Consecutive failures per kind.")
    fine_tune_scheduled_at: datetime | None = Field(
        default=None, description="The latest scheduled fine-tune time that was launched or skipped."
    )
    refresh_scheduled_at: datetime | None = Field(
        default=None, description="The latest scheduled refresh time that was launched or skipped."
    )
    next_fine_tune_at: datetime | None = Field(default=None, description="When the next fine-tune is due.")
    next_refresh_at: datetime | None = Field(default=None, description="When the next refresh is due.")
    served_canary: str | None = Field(
        default=None, description="The candidate the RayService also serves to a canary share of users."
    )
    analysis: AnalysisStatus | None = Field(
        default=None, description="The latest analysis on live events (gates.analysis): in progress, or its verdict."
    )
    handled_approval: str | None = Field(default=None, description="The last recupdate.io/approve value acted on.")
    handled_rollback: str | None = Field(default=None, description="The last recupdate.io/rollback-to value acted on.")


class RecommenderUpdatePolicy(CamelModel):
    """The whole object, for documentation and for tests; the operator reads spec and status separately."""

    api_version: str = Field(default=API_VERSION, description="API version.")
    kind: str = Field(default=KIND, description="Kind.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Object metadata.")
    spec: PolicySpec = Field(default_factory=PolicySpec, description="Desired behaviour.")
    status: PolicyStatus | None = Field(default=None, description="Observed state, written by the operator.")
