"""Shared pytest configuration. Fixtures live in helper modules and are imported here.

tests/ is on sys.path (pyproject: pythonpath), so the helpers import as ``k8s.*`` and ``fixtures.*``.
"""

import os

from k8s.fixtures import (  # noqa: F401  (pytest fixtures, used by name)
    helm,
    helm_binary,
    k8s_cluster,
    k8s_cluster_thread,
    kubectl,
    kubectl_binary,
    kubectl_sync,
)

pytest_plugins = [
    "fixtures.store",  # pg_dsn (one embedded PostgreSQL per session), store (a fresh schema)
    "fixtures.torch_threads",  # one_torch_thread
    "fixtures.serving",  # demo (a small serving store per module), client (the app over it, no Ray)
]

# One torch/OpenMP thread per process: tests share 2 cores with PostgreSQL and Ray, and oversubscribed
# OpenMP threads spin-wait (measured: a LoRA test took 196 s with 2 threads under load, 8 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
