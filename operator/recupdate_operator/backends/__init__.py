"""Backends: where runs execute and releases are served (base.Backend; kuberay.KubeRayBackend)."""

from .base import Backend, BackendError, PolicyRef, ServingStatus, serve_config

__all__ = ["Backend", "BackendError", "PolicyRef", "ServingStatus", "serve_config"]
