"""Shared pytest configuration. Fixtures live in helper modules and are imported here.

tests/ has no __init__.py, so pytest puts tests/ on sys.path and the helpers import as ``k8s.*``.
"""

from k8s.fixtures import (  # noqa: F401  (pytest fixtures, used by name)
    helm,
    helm_binary,
    k8s_cluster,
    k8s_cluster_thread,
    kubectl,
    kubectl_binary,
    kubectl_sync,
)

pytest_plugins = ["fixtures.store"]  # pg_dsn (one embedded PostgreSQL per session), store (a fresh schema)
