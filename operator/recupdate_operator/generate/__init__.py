"""Build-time generators: the CRD from the API models, the RBAC rules, the chart's copies."""
