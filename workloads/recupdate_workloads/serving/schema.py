"""What /recommend takes and answers: the request and response models, with one clear error per bad field."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from recupdate_workloads.contract.env import positive_int

log = logging.getLogger("recupdate.serving")

MAX_RECENT = 100
MAX_N = 100
_MAX_KEYS = 16  # keys a /recommend body may have before it gets one error for them all
#: Contexts one POST /recommend/batch may carry (``$RECUPDATE_SERVE_MAX_BATCH`` changes it); more is a 413.
MAX_BATCH = 256
MAX_BATCH_ENV = "RECUPDATE_SERVE_MAX_BATCH"
#: The error type of a batch over the limit: the app answers it with 413, not 422.
BATCH_TOO_LARGE = "batch_too_large"


def max_batch(environ: Mapping[str, str] | None = None) -> int:
    """The batch limit: ``$RECUPDATE_SERVE_MAX_BATCH`` (a positive integer) when set, else MAX_BATCH. A bad
    value is a clear error (the app checks it at start-up)."""
    return positive_int(MAX_BATCH_ENV, MAX_BATCH, environ, unit="contexts")


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

    user_id: str | None = Field(
        None,
        max_length=256,
        description="Optional caller-side user id (the id the interactions carry); not used for ranking. During a "
        "canary analysis a stable hash of it picks the release that answers (the response's `release`).",
    )
    recent_clusters: list[ClusterRef] = Field(
        max_length=MAX_RECENT,
        description=(
            "The user's recent positive clusters, oldest first, newest last: cluster ids or names (names match "
            "case- and punctuation-insensitively). Consecutive repeats are collapsed; the last two distinct "
            f"clusters form the context. At most {MAX_RECENT}."
        ),
    )
    n: int = Field(10, ge=1, le=MAX_N, description=f"How many clusters to return, 1..{MAX_N}.")

    @model_validator(mode="before")
    @classmethod
    def _few_keys(cls, data: Any) -> Any:
        # One error for a body of many keys, not one per unknown key (building 100k errors takes seconds).
        if isinstance(data, dict) and len(data) > _MAX_KEYS:
            raise PydanticCustomError(
                "too_many_keys",
                "the body has {count} keys; /recommend takes only {fields}",
                {"count": len(data), "fields": ", ".join(cls.model_fields)},
            )
        return data


class RecommendBatchRequest(BaseModel):
    """What /recommend/batch takes: many contexts, each exactly what /recommend takes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RecommendRequest] = Field(
        min_length=1,
        description=(
            f"The contexts, each a /recommend body. At most {MAX_BATCH} (``${MAX_BATCH_ENV}``); more is "
            "answered 413 before any item is read."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if len(data) > _MAX_KEYS:
                raise PydanticCustomError(
                    "too_many_keys",
                    "the body has {count} keys; /recommend/batch takes only requests",
                    {"count": len(data)},
                )
            items = data.get("requests")
            limit = max_batch()
            if isinstance(items, list) and len(items) > limit:
                raise PydanticCustomError(
                    BATCH_TOO_LARGE,
                    "the batch has {count} requests; at most {max_items} per batch",
                    {"count": len(items), "max_items": limit},
                )
        return data


Source = Literal["model", "evidence", "popular"]


class RecommendedCluster(BaseModel):
    id: int = Field(description="Cluster id.")
    name: str = Field(description="Cluster name.")
    score: float = Field(description="Log-probability (model), share (evidence) or popularity share (popular).")
    source: Source = Field(description="What produced this entry.")


class RecommendResponse(BaseModel):
    clusters: list[RecommendedCluster]
    release: str = Field(description="The release that produced every entry of this response.")


class RecommendBatchResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="One answer per context, in order; each as /recommend's.")
    release: str = Field(description="The release that produced every result of the batch.")


class UnknownClusters(ValueError):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("unknown clusters")
        self.errors = errors
