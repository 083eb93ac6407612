"""Environment variables read by both the controller and the workloads."""

#: The store DSN: jobs, Serve replicas and the operator (for policies without spec.store.secretRef) read it.
DSN_ENV = "RECUPDATE_STORE_DSN"
