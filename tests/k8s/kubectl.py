"""Run the real ``kubectl`` and ``helm`` from ``.tools/bin`` against an emulated cluster."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import subprocess
from collections.abc import Mapping

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"


def find_tool(name: str) -> pathlib.Path | None:
    """``.tools/bin/<name>`` (what ``make tools`` fetches), else the one on $PATH, else None."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    return pathlib.Path(found) if found else None


class Kubectl:
    """``kubectl --kubeconfig <cluster's>`` with a private discovery cache.

    * ``await kubectl("get", "rayjobs", "-o", "json")`` — from async tests, whose event loop
      also serves the emulated cluster (a blocking call would deadlock it);
    * ``kubectl.run("get", "rayjobs")`` — from sync tests against a ``ThreadedCluster``.

    Both return ``subprocess.CompletedProcess[str]``; ``check=True`` raises on a non-zero exit.
    ``input=`` feeds stdin (e.g. ``"apply", "-f", "-"`` with a YAML text).
    """

    def __init__(
        self,
        binary: pathlib.Path,
        kubeconfig: pathlib.Path,
        *,
        cache_dir: pathlib.Path | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir or kubeconfig.parent / "kubectl-cache"
        self._loop = loop  # the loop serving the cluster, when it is the caller's loop

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.setdefault("HOME", str(self.kubeconfig.parent))
        env.update(extra or {})
        return env

    def _fresh_cache(self) -> None:
        # Discovery is cheap against the emulator; a fresh cache sees CRDs registered a moment ago.
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    async def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        self._fresh_cache()
        argv = self.argv(*args)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(env),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        result = subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())
        if check:
            result.check_returncode()
        return result

    def run(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        if self._loop is not None and _running_loop() is self._loop:
            raise RuntimeError("the cluster is served by this event loop: use `await kubectl(...)` instead of .run()")
        self._fresh_cache()
        return subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self.env(env),
        )


class Helm(Kubectl):
    """``helm --kubeconfig <cluster's>`` with private HELM_* homes; called like ``Kubectl``.

    ``helm install/upgrade/uninstall/list`` work against the emulator (release Secrets arrive
    as protobuf, which the emulator decodes for Secret/ConfigMap/Namespace)."""

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        home = self.kubeconfig.parent / "helm"
        env = super().env()
        env.update(
            HELM_CACHE_HOME=str(home / "cache"),
            HELM_CONFIG_HOME=str(home / "config"),
            HELM_DATA_HOME=str(home / "data"),
        )
        env.update(extra or {})
        return env

    def _fresh_cache(self) -> None:
        pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


__all__ = ["REPO_ROOT", "TOOLS_BIN", "Helm", "Kubectl", "find_tool"]
