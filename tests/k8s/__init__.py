"""Test helpers for Kubernetes: an emulated apiserver (kmock-based), kubectl/helm runners, kopf runner.

Modules: ``emulator`` (ApiServer, EmulatedCluster, ThreadedCluster, CRD helpers), ``schema``
(CRD defaulting/pruning/validation), ``protobuf`` (request bodies of typed clients), ``kubectl``
(Kubectl, Helm, find_tool), ``kopf_runner`` (run_kopf), ``fixtures`` (imported by tests/conftest.py).
"""
