"""Contract code shared by the operator and the workloads (standard library and pydantic only)."""
