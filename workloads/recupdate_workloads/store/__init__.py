"""PostgreSQL + pgvector store: migrations, catalogue and interactions, evidence snapshots, transition
tables and the registry of runs and releases (docs/architecture.md)."""

from recupdate_workloads.store.db import Store, open_store, schema_for

__all__ = ["Store", "open_store", "schema_for"]
