"""Pytest fixtures for Kubernetes tests; tests/conftest.py imports them all.

* ``k8s_cluster`` (async, function-scoped): an ``EmulatedCluster`` in the test's event loop,
  with ``$KUBECONFIG`` pointing at it for the duration of the test.
* ``kubectl``: a ``Kubectl`` bound to ``k8s_cluster``; call it as ``await kubectl("get", ...)``.
* ``helm``: a ``Helm`` bound to ``k8s_cluster``; ``await helm("install", "r1", chart_dir)``.
* ``k8s_cluster_thread`` (sync): a ``ThreadedCluster`` for synchronous tests and subprocesses.
* ``kubectl_sync``: a ``Kubectl`` bound to ``k8s_cluster_thread``; ``kubectl_sync.run("get", ...)``.
* ``kubectl_binary`` / ``helm_binary``: paths of the real tools (the test is skipped without them;
  ``make tools`` fetches them into .tools/bin).
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest

from .emulator import EmulatedCluster, ThreadedCluster
from .kubectl import Helm, Kubectl, find_tool


@pytest.fixture
def kubectl_binary() -> pathlib.Path:
    path = find_tool("kubectl")
    if path is None:
        pytest.skip("kubectl is not in .tools/bin nor on $PATH: run `make tools` (scripts/fetch-k8s-tools.sh .tools)")
    return path


@pytest.fixture
def helm_binary() -> pathlib.Path:
    path = find_tool("helm")
    if path is None:
        pytest.skip("helm is not in .tools/bin nor on $PATH: run `make tools` (scripts/fetch-k8s-tools.sh .tools)")
    return path


@pytest.fixture
async def k8s_cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[EmulatedCluster]:
    async with EmulatedCluster(workdir=tmp_path / "k8s") as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
        yield cluster


@pytest.fixture
async def kubectl(k8s_cluster: EmulatedCluster, kubectl_binary: pathlib.Path) -> Kubectl:
    return Kubectl(kubectl_binary, k8s_cluster.kubeconfig_path, loop=asyncio.get_running_loop())


@pytest.fixture
async def helm(k8s_cluster: EmulatedCluster, helm_binary: pathlib.Path) -> Helm:
    return Helm(helm_binary, k8s_cluster.kubeconfig_path, loop=asyncio.get_running_loop())


@pytest.fixture
def k8s_cluster_thread(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedCluster]:
    with ThreadedCluster(workdir=tmp_path / "k8s") as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
        yield cluster


@pytest.fixture
def kubectl_sync(k8s_cluster_thread: ThreadedCluster, kubectl_binary: pathlib.Path) -> Kubectl:
    return Kubectl(kubectl_binary, k8s_cluster_thread.kubeconfig_path)


__all__ = ["helm", "helm_binary", "k8s_cluster", "k8s_cluster_thread", "kubectl", "kubectl_binary", "kubectl_sync"]
