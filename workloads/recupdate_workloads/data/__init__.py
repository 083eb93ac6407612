"""Interaction data: the canonical log, the cluster catalogue, loaders and the synthetic drift generator."""

from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.types import (
    Catalogue,
    Cluster,
    InteractionLog,
    PairEvidence,
    Successor,
    Triples,
    normalize_name,
)

__all__ = [
    "Catalogue",
    "Cluster",
    "DataError",
    "InteractionLog",
    "PairEvidence",
    "Successor",
    "Triples",
    "normalize_name",
]
