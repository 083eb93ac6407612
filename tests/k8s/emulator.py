"""An emulated Kubernetes API server for tests: kmock 0.8 plus the realism an operator relies on.

kmock's :class:`kmock.KubernetesEmulator` serves discovery and keeps objects in memory. This module
replaces its object handling with apiserver semantics (see ``ApiServer``), keeps kmock's discovery
and its DSL (user reactions such as ``cluster.api['patch', kmock.resource('ray.io/v1/rayjobs')]
<< 500`` still take priority over the emulated behaviour), and wraps it into a cluster object::

    async with EmulatedCluster() as cluster:          # or the ``k8s_cluster`` fixture
        cluster.url, cluster.kubeconfig_path
        await cluster.apply(crd_dict)                 # CRDs become discoverable and validated
        await cluster.create({...})                   # through the same admission as HTTP
        cluster.objects("ray.io", "v1", "rayjobs", "default")

For subprocesses against a synchronous test, ``ThreadedCluster`` runs the same in a thread.

What the emulated server does, like kube-apiserver:

* create answers 201; ``metadata.uid``, ``resourceVersion`` (one global counter, bumped on every
  change), ``generation`` (bumped only when something outside metadata and status changes),
  ``creationTimestamp``; ``generateName``; 409 AlreadyExists / Conflict (stale resourceVersion);
* no-op writes change nothing (no new resourceVersion, no watch event);
* merge patch (RFC 7386), JSON patch (a failed ``test`` or a bad path answers 422),
  strategic merge patch for built-in kinds (approximated; CRs answer 415 like the real server),
  apply patch (approximated as create-or-merge), PUT with optimistic concurrency;
* the ``status`` subresource: ``/status`` writes touch only status, main writes never touch
  status, create drops status;
* finalizers and ``deletionTimestamp``; owner-reference garbage collection (Background,
  Foreground, Orphan), done synchronously at deletion; namespace deletion removes its content;
* list with ``kind``/``apiVersion``, label and field selectors, Table output for kubectl;
* watch with ``resourceVersion`` replay, ``sendInitialEvents`` + initial-events-end bookmark,
  ``timeoutSeconds``, selectors (objects leaving a selector are seen as DELETED);
* CRDs: ``POST apiextensions.k8s.io/v1 customresourcedefinitions`` registers the served versions
  (discovery, short names, categories, printer columns); their ``openAPIV3Schema`` defaults, prunes
  (dropped paths are recorded in ``ApiServer.pruned``) and validates (422 Invalid, with the
  apiserver's message and causes); ``fieldValidation=Strict`` rejects unknown fields;
  deleting a CRD deletes its objects;
* metadata validation: names (RFC 1123), label keys/values, annotation keys, owner references;
* ``dryRun=All``; ``/openapi/v3`` documents good enough for kubectl's server-side field
  validation (``kubectl apply`` without ``--validate=false``);
* protobuf request bodies for Secret/ConfigMap/Namespace (helm's release storage,
  ``kubectl create namespace|configmap|secret``); answers are always JSON.

The real ``kubectl`` (get/apply/create/patch/label/delete, server-side apply, Table output) and
``helm`` (install/upgrade/uninstall/list) work against it.

Not emulated: authn/authz, admission webhooks, controllers (no Pods from Jobs, no KubeRay: tests
play the controller with ``cluster.patch_status``), CEL rules and ``format`` checks, CRD version
conversion (each served version is a separate store), managedFields/server-side-apply ownership
(apply is create-or-merge), pagination (``limit`` is ignored), watch bookmarks other than the
initial one, 410 Gone, protobuf for other kinds, ``/openapi/v2``. GC runs synchronously inside
the DELETE (or the PATCH that removes the last finalizer), not in the background.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import math
import pathlib
import random
import re
import tempfile
import threading
import traceback
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import enums, parsing, rendering

from . import protobuf as k8sproto
from . import schema as crdschema

T = TypeVar("T")

SERVER_VERSION = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-12-17T00:00:00Z",
    "goVersion": "go1.25.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


# =============================================================================================
# Errors as the apiserver renders them (a v1 Status).
# =============================================================================================


class ApiError(Exception):
    """An error response of the emulated apiserver: a ``v1 Status`` with an HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _group_resource(res: kmock.resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def _not_found(res: kmock.resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{_group_resource(res)} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def _already_exists(res: kmock.resource, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{_group_resource(res)} "{name}" already exists',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def _conflict(res: kmock.resource, name: str, why: str | None = None) -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_group_resource(res)} "{name}": {why}',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def _invalid(kind: str, group: str, name: str, errors: list[crdschema.FieldError]) -> ApiError:
    qualified = f"{kind}.{group}" if group else kind
    text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: {text}',
        {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors],
        },
    )


def _unprocessable(message: str) -> ApiError:
    # What the apiserver answers for JSON-patch failures (test failed, missing path, ...).
    return ApiError(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": message}]},
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def _resource_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


# =============================================================================================
# Small helpers.
# =============================================================================================


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def human_duration(seconds: float) -> str:
    """``k8s.io/apimachinery/pkg/util/duration.HumanDuration``."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if h < 24 * 365 * 2:
        return f"{d}d"
    y = d // 365
    if h < 24 * 365 * 8:
        return f"{y}y{d % 365}d" if d % 365 else f"{y}y"
    return f"{y}y"


def version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (0, 0, 0)
    stability = {"alpha": 1, "beta": 2, None: 3}[m.group(2)]
    return (stability, int(m.group(1)), int(m.group(3) or 0))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (returns a new value; the inputs are not modified)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of the strategic merge patch, good for what kubectl sends for built-ins.

    Maps merge recursively (``null`` deletes); lists are replaced unless the patch carries a
    ``$setElementOrder/<field>`` directive, in which case list items (maps) are merged by the key
    named in the directive's entries. ``$patch: replace|delete``, ``$retainKeys`` and
    ``$deleteFromPrimitiveList/<field>`` are honoured.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    patch = dict(patch)
    directive = patch.pop("$patch", None)
    if directive == "delete":
        return None
    if directive == "replace":
        return _strip_directives(patch)
    result = dict(target) if isinstance(target, Mapping) and directive != "replace" else {}
    retain = patch.pop("$retainKeys", None)
    orders: dict[str, list[Any]] = {}
    deletes: dict[str, list[Any]] = {}
    for key in [k for k in patch if k.startswith("$")]:
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = patch.pop(key)
        elif key.startswith("$deleteFromPrimitiveList/"):
            deletes[key.split("/", 1)[1]] = patch.pop(key)
        else:
            patch.pop(key)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in orders and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, orders[key])
        elif isinstance(value, Mapping):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = _strip_directives(value)
    for key, values in deletes.items():
        if isinstance(result.get(key), list):
            result[key] = [item for item in result[key] if item not in values]
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return copy.deepcopy(value)


def _merge_list(old: list[Any], patch: list[Any], order: list[Any]) -> list[Any]:
    keys = {k for entry in order if isinstance(entry, Mapping) for k in entry}
    if len(keys) != 1:  # primitive lists or unknown merge keys: merge as a set in the given order
        merged = [item for item in order if item in old or item in patch]
        return merged + [item for item in patch if item not in merged]
    mkey = next(iter(keys))
    by_key = {item.get(mkey): item for item in old if isinstance(item, Mapping)}
    for item in patch:
        if not isinstance(item, Mapping):
            continue
        if item.get("$patch") == "delete":
            by_key.pop(item.get(mkey), None)
            continue
        by_key[item.get(mkey)] = strategic_merge_patch(by_key.get(item.get(mkey)), item)
    ordered = [by_key.pop(entry.get(mkey)) for entry in order if entry.get(mkey) in by_key]
    return ordered + list(by_key.values())


def jsonpath_first(obj: Any, path: str) -> Any:
    """A tiny JSONPath for printer columns: ``.a.b``, ``.a[0]``, ``.a[*]``, ``.a[?(@.k=="v")].b``."""
    token_re = re.compile(
        r"""\.([A-Za-z0-9_$-]+)|\[(\d+)\]|\[\*\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*["']([^"']*)["']\)\]"""
    )
    values: list[Any] = [obj]
    pos = 0
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    while pos < len(path):
        m = token_re.match(path, pos)
        if not m:
            return None
        pos = m.end()
        nxt: list[Any] = []
        for value in values:
            if m.group(1) is not None and isinstance(value, Mapping) and m.group(1) in value:
                nxt.append(value[m.group(1)])
            elif m.group(2) is not None and isinstance(value, list) and int(m.group(2)) < len(value):
                nxt.append(value[int(m.group(2))])
            elif m.group(0) == "[*]" and isinstance(value, list):
                nxt.extend(value)
            elif m.group(3) is not None and isinstance(value, list):
                for item in value:
                    if str(jsonpath_first(item, "." + m.group(3))) == m.group(4):
                        nxt.append(item)
        values = nxt
    return values[0] if values else None


# =============================================================================================
# Selectors.
# =============================================================================================


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Parse a label selector (``a=b,c!=d,e in (f,g),!h,i``) into a predicate over labels."""
    reqs: list[tuple[str, str, frozenset[str]]] = []  # (operator, key, values)
    for part in _split_top_level(text or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append((m.group(2), m.group(1), values))
        elif m := re.fullmatch(r"([^!=\s]+)\s*!=\s*(\S*)", part):
            reqs.append(("notin", m.group(1), frozenset([m.group(2)])))
        elif m := re.fullmatch(r"([^!=\s]+)\s*==?\s*(\S*)", part):
            reqs.append(("in", m.group(1), frozenset([m.group(2)])))
        elif m := re.fullmatch(r"!\s*(\S+)", part):
            reqs.append(("!", m.group(1), frozenset()))
        elif re.fullmatch(r"[^!=\s(),]+", part):
            reqs.append(("exists", part, frozenset()))
        else:
            raise _bad_request(f"unable to parse requirement: {part!r}")

    def matches(labels: Mapping[str, str]) -> bool:
        for op, key, values in reqs:
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and labels.get(key) in values:
                return False
            if op == "!" and key in labels:
                return False
            if op == "exists" and key not in labels:
                return False
        return True

    return matches


def parse_field_selector(text: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """Parse a field selector (``metadata.name=x,status.phase!=Done``) into a predicate."""
    if not text:
        return lambda obj: True
    reqs: list[Callable[[Mapping[str, Any]], bool]] = []
    for part in _split_top_level(text):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise _bad_request(f"invalid field selector: {part!r}")
        path, op, want = m.group(1), m.group(2), m.group(3)

        def req(obj: Mapping[str, Any], path: str = path, op: str = op, want: str = want) -> bool:
            got = jsonpath_first(obj, "." + path)
            got_s = "" if got is None else str(got).lower() if isinstance(got, bool) else str(got)
            return (got_s == want) if op != "!=" else (got_s != want)

        reqs.append(req)
    return lambda obj: all(req(obj) for req in reqs)


# =============================================================================================
# CRD bookkeeping.
# =============================================================================================


@dataclass
class ServedVersion:
    """What the server knows about one served version of a CRD."""

    crd_name: str
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    list_kind: str
    namespaced: bool
    schema: dict[str, Any] | None
    status_subresource: bool
    printer_columns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)


def validate_crd(crd: Mapping[str, Any]) -> list[crdschema.FieldError]:
    """The few checks of the apiserver on CRD objects that matter to tests."""
    errs: list[crdschema.FieldError] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group")
    if not group:
        errs.append(crdschema.FieldError("spec.group", "Required value", "FieldValueRequired"))
    elif "." not in group:
        errs.append(
            crdschema.FieldError("spec.group", f'Invalid value: "{group}": should be a domain with at least one dot')
        )
    for key in ("plural", "kind"):
        if not names.get(key):
            errs.append(crdschema.FieldError(f"spec.names.{key}", "Required value", "FieldValueRequired"))
    if names.get("plural") and names["plural"] != names["plural"].lower():
        errs.append(crdschema.FieldError("spec.names.plural", f'Invalid value: "{names["plural"]}": must be lowercase'))
    name = (crd.get("metadata") or {}).get("name")
    if names.get("plural") and group and name != f"{names['plural']}.{group}":
        errs.append(
            crdschema.FieldError("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errs.append(
            crdschema.FieldError(
                "spec.scope",
                f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"',
                "FieldValueNotSupported",
            )
        )
    versions = spec.get("versions") or []
    if not versions:
        errs.append(
            crdschema.FieldError(
                "spec.versions", "Invalid value: null: must have exactly one version marked as storage version"
            )
        )
    if versions and sum(bool(v.get("storage")) for v in versions) != 1:
        errs.append(
            crdschema.FieldError(
                "spec.versions", "Invalid value: ...: must have exactly one version marked as storage version"
            )
        )
    for i, ver in enumerate(versions):
        sch = (ver.get("schema") or {}).get("openAPIV3Schema")
        if sch is None:
            errs.append(
                crdschema.FieldError(
                    f"spec.versions[{i}].schema.openAPIV3Schema",
                    "Required value: schemas are required",
                    "FieldValueRequired",
                )
            )
        elif sch.get("type") != "object":
            errs.append(
                crdschema.FieldError(
                    f"spec.versions[{i}].schema.openAPIV3Schema.type",
                    'Unsupported value: "": supported values: "object"',
                    "FieldValueNotSupported",
                )
            )
    return errs


def served_versions(crd: Mapping[str, Any]) -> list[ServedVersion]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for ver in spec.get("versions") or []:
        if not ver.get("served", True):
            continue
        out.append(
            ServedVersion(
                crd_name=crd["metadata"]["name"],
                group=spec["group"],
                version=ver["name"],
                plural=names["plural"],
                singular=names.get("singular") or names["kind"].lower(),
                kind=names["kind"],
                list_kind=names.get("listKind") or f"{names['kind']}List",
                namespaced=spec.get("scope") == "Namespaced",
                schema=copy.deepcopy((ver.get("schema") or {}).get("openAPIV3Schema")),
                status_subresource="status" in (ver.get("subresources") or {}),
                printer_columns=copy.deepcopy(ver.get("additionalPrinterColumns") or []),
            )
        )
    return out


# Extra columns of `kubectl get` for a few built-in kinds (the rest print NAME and AGE).
_BUILTIN_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "Namespace": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}],
    "Event": [
        {"name": "Type", "type": "string", "jsonPath": ".type"},
        {"name": "Reason", "type": "string", "jsonPath": ".reason"},
        {"name": "Object", "type": "string", "jsonPath": ".involvedObject.name"},
        {"name": "Message", "type": "string", "jsonPath": ".message"},
    ],
    "CustomResourceDefinition": [{"name": "Created At", "type": "string", "jsonPath": ".metadata.creationTimestamp"}],
}


# =============================================================================================
# The server.
# =============================================================================================


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    object: dict[str, Any]
    old: dict[str, Any] | None


_CLOSE = object()  # put on the buses to end all watch streams at shutdown


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with apiserver semantics for all object requests (see the module doc).

    Discovery, ``/version`` and user-defined kmock reactions stay as kmock serves them; requests
    to resources (``/api[s]/.../<plural>[/<name>[/status]]``) go to ``serve_resource`` unless a
    user reaction (anything but kmock's fallbacks) matches first.
    """

    strict_namespaces: bool = False  # 404 on writes into a namespace that does not exist
    strict_errors: bool = True  # server-side exceptions (500) are re-raised at exit

    _rv: int = attrs.field(default=0, init=False)
    _crds: dict[kmock.resource, ServedVersion] = attrs.field(factory=dict, init=False)
    _log: dict[kmock.resource, list[_Event]] = attrs.field(factory=dict, init=False)
    pruned: list[tuple[str, str | None, str, str]] = attrs.field(factory=list, init=False)
    server_errors: list[BaseException] = attrs.field(factory=list, init=False)
    _pending: list[tuple[kmock.resource, Any]] = attrs.field(factory=list, init=False)
    _waiters: set[asyncio.Future[None]] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get", re.compile(r"/openapi/v3/?")] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version

    async def _serve_server_version(self, request: rendering.Request) -> rendering.Payload:
        return dict(SERVER_VERSION)

    # ----------------------------------------------------------------------------- plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, but with a correct URL parser and Status rendering of ApiErrors."""
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await _parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as e:
                raw_response = e.args[0]
                if e.__cause__ is not None:
                    raise e.__cause__ from None
                raise
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        except Exception as e:
            self.server_errors.append(e)
            if self._errors:
                self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or not request.resource.version or not request.resource.plural:
            return await kmock.KubernetesScaffold._handle(self, request)  # discovery & non-k8s

        # User reactions first (the same ordering & semantics as kmock's RawHandler._handle),
        # but stop before kmock's own fallbacks: we serve the objects instead.
        priorities = [payload.priorities for payload in self._payloads]
        width = max((len(p) for p in priorities), default=0)
        keys = [tuple(-p for p in prio) + (0,) * (width - len(prio)) for prio in priorities]
        for index in sorted(range(len(keys)), key=lambda i: keys[i]):
            payload = self._payloads[index]
            if payload.priorities and payload.priorities[0] == -math.inf:
                break
            if request in payload._source and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except rendering.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        return await self.serve_resource(request)

    def _json(self, body: Any, status: int = 200, warnings: Iterable[str] = ()) -> aiohttp.web.Response:
        response = aiohttp.web.json_response(body, status=status)
        for warning in warnings:
            response.headers.add("Warning", f'299 - "{warning}"')
        return response

    # ----------------------------------------------------------------------------- registry

    def resource_info(self, res: kmock.resource) -> kmock.ResourceInfo:
        if res not in self.resources or res.plural is None:
            raise _resource_not_found()
        return self.resources[res]

    def crd_version(self, res: kmock.resource) -> ServedVersion | None:
        return self._crds.get(res)

    def find_resource(self, api_version: str, kind: str) -> kmock.resource:
        """The resource (plural) serving ``apiVersion``+``kind``, as kubectl's RESTMapper finds it."""
        group, _, version = api_version.rpartition("/")
        for res in self.resources:
            if res.group == group and res.version == version and self.resources[res].kind == kind:
                return res
        raise LookupError(f'no matches for kind "{kind}" in version "{api_version}"')

    def _kind_of(self, res: kmock.resource) -> str:
        kind = self.resources[res].kind if res in self.resources else None
        return kind or str(res.plural).capitalize()

    def _api_version(self, res: kmock.resource) -> str:
        return f"{res.group}/{res.version}" if res.group else str(res.version)

    def _has_status(self, res: kmock.resource) -> bool:
        return res in self.resources and "status" in self.resources[res].subresources

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        name = crd["metadata"]["name"]
        stale = [res for res, sv in self._crds.items() if sv.crd_name == name]
        fresh = served_versions(crd)
        for res in stale:
            if res not in {sv.resource for sv in fresh}:
                self._unregister(res)
        names = (crd.get("spec") or {}).get("names") or {}
        for sv in fresh:
            self._crds[sv.resource] = sv
            self.resources[sv.resource] = kmock.ResourceInfo(
                kind=sv.kind,
                singular=sv.singular,
                namespaced=sv.namespaced,
                verbs=set(ALL_VERBS),
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources={"status"} if sv.status_subresource else set(),
            )

    def _unregister(self, res: kmock.resource) -> None:
        self._crds.pop(res, None)
        if res in self.resources:
            del self.resources[res]

    # ----------------------------------------------------------------------------- reading

    def _live(self, res: kmock.resource | None = None) -> Iterator[tuple[tuple[Any, Any, Any], dict[str, Any]]]:
        for key, obj in list(self._objects.items()):
            if (res is None or key[0] == res) and not obj.deleted:
                yield key, obj.raw

    def _current(self, res: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (res, namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    def get_object(self, res: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A deep copy of the stored object, or None."""
        return self._current(res, namespace, name)

    def list_objects(
        self,
        res: kmock.resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Deep copies of the stored objects of a resource, sorted by namespace and name."""
        by_labels = parse_label_selector(label_selector)
        by_fields = parse_field_selector(field_selector)
        out = []
        for (_, ns, _name), obj in self._live(res):
            if namespace is not None and ns != namespace:
                continue
            if by_labels((obj.get("metadata") or {}).get("labels") or {}) and by_fields(obj):
                out.append(copy.deepcopy(obj))
        out.sort(
            key=lambda o: (
                (o.get("metadata") or {}).get("namespace") or "",
                (o.get("metadata") or {}).get("name") or "",
            )
        )
        return out

    def _decorate(self, res: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        obj.setdefault("apiVersion", self._api_version(res))
        obj.setdefault("kind", self._kind_of(res))
        return obj

    # ----------------------------------------------------------------------------- dispatching

    async def serve_resource(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        assert res is not None
        info = self.resource_info(res)
        method = str(request.method.value if isinstance(request.method, enums.method) else request.method).upper()
        params = request.params
        namespace, name, sub = request.namespace, request.name, request.subresource

        if sub is not None and sub != "status":
            raise _resource_not_found()
        if info.namespaced is False and namespace is not None:
            raise _resource_not_found()
        if info.namespaced and name is not None and namespace is None:
            raise _resource_not_found()
        if sub == "status" and "status" not in info.subresources:
            raise _resource_not_found()

        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch_stream(request, res, namespace, name)
        if method == "GET" and name is None:
            objs = self.list_objects(res, namespace, params.get("labelSelector"), params.get("fieldSelector"))
            objs = [self._decorate(res, o) for o in objs]
            if _wants_table(request):
                return self._json(self._table(res, objs, params))
            return self._json(
                {
                    "apiVersion": self._api_version(res),
                    "kind": self._crds[res].list_kind if res in self._crds else f"{self._kind_of(res)}List",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": objs,
                }
            )
        if method == "GET":
            assert name is not None
            obj = self._current(res, namespace, name)
            if obj is None:
                raise _not_found(res, name)
            obj = self._decorate(res, obj)
            return self._json(self._table(res, [obj], params) if _wants_table(request) else obj)

        dry_run = params.get("dryRun") == "All"
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        data = request.data
        if method in ("POST", "PUT") and request.body and content_type == "application/vnd.kubernetes.protobuf":
            try:
                data = k8sproto.decode(request.body)
            except (ValueError, IndexError) as e:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the emulated apiserver cannot decode protobuf for {e}: send JSON "
                    "(e.g. `kubectl apply -f` / `kubectl create -f` with a manifest)",
                ) from None
        elif method in ("POST", "PUT") and request.body and not _is_json_type(content_type):
            raise ApiError(415, "UnsupportedMediaType", f"the emulated apiserver accepts JSON, not {content_type!r}")
        if method == "POST":
            if name is not None or (info.namespaced and namespace is None):
                raise _method_not_allowed()
            obj, warnings = await self.create_object(res, namespace, data, params, dry_run=dry_run)
            return self._json(obj, 201, warnings)
        if method in ("PATCH", "PUT") and name is not None:
            if method == "PUT":
                obj, warnings = await self.replace_object(res, namespace, name, data, sub, params, dry_run=dry_run)
            elif content_type == "application/apply-patch+yaml":
                obj, warnings, created = await self.apply_patch(
                    res, namespace, name, request.text, sub, params, dry_run=dry_run
                )
                return self._json(obj, 201 if created else 200, warnings)
            else:
                obj, warnings = await self.patch_object(
                    res, namespace, name, request.data, content_type, sub, params, dry_run=dry_run
                )
            return self._json(obj, 200, warnings)
        if method == "DELETE" and name is not None and sub is None:
            options = request.data if isinstance(request.data, Mapping) else {}
            obj = await self.delete_object(res, namespace, name, options, params, dry_run=dry_run)
            return self._json(obj)
        if method == "DELETE" and name is None:
            options = request.data if isinstance(request.data, Mapping) else {}
            async with self._lock:
                objs = self.list_objects(res, namespace, params.get("labelSelector"), params.get("fieldSelector"))
                for obj in objs:
                    meta = obj["metadata"]
                    if not dry_run:
                        self._delete_locked(res, meta.get("namespace"), meta["name"], options, params)
            await self._flush_events()
            return self._json(
                {
                    "apiVersion": self._api_version(res),
                    "kind": f"{self._kind_of(res)}List",
                    "metadata": {},
                    "items": objs,
                }
            )
        raise _method_not_allowed()

    # ----------------------------------------------------------------------------- writes

    async def create_object(
        self,
        res: kmock.resource,
        namespace: str | None,
        body: Any,
        params: Mapping[str, str] | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """Create an object as ``POST`` does. Returns the stored object and the warnings."""
        async with self._lock:
            result = self._create_locked(res, namespace, body, params or {}, dry_run=dry_run)
        await self._flush_events()
        return result

    def _create_locked(
        self, res: kmock.resource, namespace: str | None, body: Any, params: Mapping[str, str], *, dry_run: bool
    ) -> tuple[dict[str, Any], list[str]]:
        info = self.resource_info(res)
        if not isinstance(body, Mapping):
            raise _bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(dict(body))
        self._check_type(res, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if info.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace or meta.get("namespace")
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(100):
                candidate = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
                if self._current(res, meta.get("namespace"), candidate) is None:
                    meta["name"] = candidate
                    break
        name = meta.get("name") or ""
        namespace_missing = meta.get("namespace") and self._current(_NAMESPACES, None, meta["namespace"]) is None
        if self.strict_namespaces and info.namespaced and namespace_missing:
            raise _not_found(_NAMESPACES, meta["namespace"])
        if name and self._current(res, meta.get("namespace"), name) is not None:
            raise _already_exists(res, name)

        # System-owned metadata.
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        if self._has_status(res) and res != _CRD_RESOURCE:
            obj.pop("status", None)
        if res == _NAMESPACES:
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name

        _normalize_builtin(res, obj)
        warnings = self._admit(res, obj, None, params)
        if res == _CRD_RESOURCE:
            self._crd_status(obj)
        if dry_run:
            return self._decorate(res, obj), warnings
        self._commit(res, obj, None, "ADDED")
        if res == _CRD_RESOURCE:
            self._register_crd(obj)
        return self._decorate(res, copy.deepcopy(obj)), warnings

    async def patch_object(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = "application/merge-patch+json",
        subresource: str | None = None,
        params: Mapping[str, str] | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """Patch an object as ``PATCH`` does (merge, JSON or strategic-merge patch)."""
        async with self._lock:
            old = self._current(res, namespace, name)
            if old is None:
                raise _not_found(res, name)
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise _bad_request("the body of a JSON patch must be a list of operations")
                try:
                    new = jsonpatch.apply_patch(copy.deepcopy(old), patch, in_place=False)
                except jsonpatch.JsonPatchTestFailed as e:
                    raise _unprocessable(f"the test operation failed: {e}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError) as e:
                    raise _unprocessable(str(e) or repr(e)) from None
            elif content_type in ("application/merge-patch+json", "application/json"):
                if not isinstance(patch, Mapping):
                    raise _bad_request("the body of a merge patch must be a JSON object")
                self._check_precondition(res, name, old, patch)
                new = merge_patch(old, patch)
            elif content_type == "application/strategic-merge-patch+json":
                if res in self._crds:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    )
                if not isinstance(patch, Mapping):
                    raise _bad_request("the body of a strategic merge patch must be a JSON object")
                self._check_precondition(res, name, old, patch)
                new = strategic_merge_patch(old, patch)
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the media type {content_type!r} is not supported for PATCH"
                )
            result = self._update_locked(res, namespace, name, old, new, subresource, params or {}, dry_run=dry_run)
        await self._flush_events()
        return result

    async def replace_object(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None = None,
        params: Mapping[str, str] | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """Replace an object as ``PUT`` does (optimistic concurrency on metadata.resourceVersion)."""
        if not isinstance(body, Mapping):
            raise _bad_request("the body of the request was in an unknown format")
        async with self._lock:
            old = self._current(res, namespace, name)
            if old is None:
                raise _not_found(res, name)
            new = copy.deepcopy(dict(body))
            meta = new.setdefault("metadata", {})
            if meta.get("name") and meta["name"] != name:
                raise _bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
                )
            rv = meta.get("resourceVersion")
            if rv not in (None, "") and rv != old["metadata"].get("resourceVersion"):
                raise _conflict(res, name)
            result = self._update_locked(res, namespace, name, old, new, subresource, params or {}, dry_run=dry_run)
        await self._flush_events()
        return result

    async def apply_patch(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        text: str,
        subresource: str | None,
        params: Mapping[str, str],
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], list[str], bool]:
        """Server-side apply, approximated: create, or merge-patch the applied configuration."""
        if not params.get("fieldManager"):
            raise _bad_request("PATCH, application/apply-patch+yaml requires fieldManager to be set")
        try:
            body = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise _bad_request(f"error decoding YAML: {e}") from None
        if not isinstance(body, Mapping):
            raise _bad_request("the body of the request was in an unknown format")
        if self._current(res, namespace, name) is None:
            body = dict(body)
            body.setdefault("metadata", {})["name"] = name
            obj, warnings = await self.create_object(res, namespace, body, params, dry_run=dry_run)
            return obj, warnings, True
        obj, warnings = await self.patch_object(
            res, namespace, name, body, "application/merge-patch+json", subresource, params, dry_run=dry_run
        )
        return obj, warnings, False

    def _check_precondition(
        self, res: kmock.resource, name: str, old: Mapping[str, Any], patch: Mapping[str, Any]
    ) -> None:
        rv = (
            (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch.get("metadata"), Mapping) else None
        )
        if rv not in (None, "") and rv != old["metadata"].get("resourceVersion"):
            raise _conflict(res, name)

    def _check_type(self, res: kmock.resource, obj: dict[str, Any]) -> None:
        want_av, want_kind = self._api_version(res), self._kind_of(res)
        if obj.get("apiVersion") not in (None, want_av):
            raise _bad_request(
                f"the API version in the data ({obj['apiVersion']}) does not match the expected API version ({want_av})"
            )
        if obj.get("kind") not in (None, want_kind):
            raise _bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind ({want_kind})")
        obj["apiVersion"], obj["kind"] = want_av, want_kind

    def _update_locked(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        old: dict[str, Any],
        new: Any,
        subresource: str | None,
        params: Mapping[str, str],
        *,
        dry_run: bool,
    ) -> tuple[dict[str, Any], list[str]]:
        if not isinstance(new, dict):
            raise _unprocessable("the patched object is not a JSON object")
        new = copy.deepcopy(new)
        self._check_type(res, new)
        if not isinstance(new.get("metadata"), dict):
            new["metadata"] = {}
        meta, old_meta = new["metadata"], old["metadata"]
        if meta.get("name") not in (None, name):
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if meta.get("namespace") not in (None, namespace):
            raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")

        if subresource == "status":
            # Only status may change through /status (metadata too, but the apiserver ignores it).
            candidate = copy.deepcopy(old)
            if "status" in new:
                candidate["status"] = new["status"]
            else:
                candidate.pop("status", None)
            new = candidate
            meta = new["metadata"]
        else:
            if self._has_status(res) and res != _CRD_RESOURCE:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            # System-owned and immutable metadata.
            for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
                if key in old_meta:
                    meta[key] = old_meta[key]
                else:
                    meta.pop(key, None)
            meta["name"] = name
            if namespace is not None:
                meta["namespace"] = namespace
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise _invalid(
                        self._kind_of(res),
                        str(res.group),
                        name,
                        [
                            crdschema.FieldError(
                                "metadata.finalizers",
                                f"Forbidden: no new finalizers can be added if the object is being deleted, "
                                f"found new finalizers {sorted(added)}",
                                "FieldValueForbidden",
                            )
                        ],
                    )
        meta["resourceVersion"] = old_meta.get("resourceVersion")
        meta.pop("managedFields", None)

        _normalize_builtin(res, new)
        warnings = self._admit(res, new, old, params)
        if res == _CRD_RESOURCE:
            self._crd_status(new)

        if new == old:  # a no-op: no new resourceVersion, no event
            return self._decorate(res, new), warnings
        if _spec_of(new, self._has_status(res)) != _spec_of(old, self._has_status(res)) and "generation" in old_meta:
            meta["generation"] = int(old_meta.get("generation") or 0) + 1
        if dry_run:
            return self._decorate(res, new), warnings

        self._commit(res, new, old, "MODIFIED")
        if res == _CRD_RESOURCE:
            self._register_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._finalize_locked(res, namespace, name, propagation="Background")
        return self._decorate(res, copy.deepcopy(new)), warnings

    async def delete_object(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Delete an object as ``DELETE`` does (finalizers, propagation policies, GC)."""
        async with self._lock:
            if dry_run:
                obj = self._current(res, namespace, name)
                if obj is None:
                    raise _not_found(res, name)
                result = obj
            else:
                result = self._delete_locked(res, namespace, name, options or {}, params or {})
        await self._flush_events()
        return self._decorate(res, result)

    def _delete_locked(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any],
        params: Mapping[str, str],
    ) -> dict[str, Any]:
        old = self._current(res, namespace, name)
        if old is None:
            raise _not_found(res, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
            raise _conflict(
                res,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {old['metadata'].get('uid')}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"].get("resourceVersion"):
            raise _conflict(
                res, name, "the object has been modified; please apply your changes to the latest version and try again"
            )
        propagation = options.get("propagationPolicy") or params.get("propagationPolicy")
        if options.get("orphanDependents") is True:
            propagation = "Orphan"
        propagation = propagation or "Background"

        if propagation == "Foreground":
            # Dependents first (synchronously), then the owner.
            self._collect_dependents_locked(old["metadata"].get("uid"), "Foreground")

        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if "generation" in new["metadata"]:
                new["metadata"]["generation"] = int(new["metadata"]["generation"]) + 1
            self._commit(res, new, old, "MODIFIED")
            return copy.deepcopy(new)
        return self._finalize_locked(res, namespace, name, propagation=propagation)

    def _finalize_locked(
        self, res: kmock.resource, namespace: str | None, name: str, *, propagation: str
    ) -> dict[str, Any]:
        """Remove the object for real, then collect what depended on it."""
        key = (res, namespace, name)
        old = copy.deepcopy(self._objects[key].raw)
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key].delete()
        self._emit(res, _Event(self._rv, "DELETED", self._decorate(res, gone), old))
        if res == _CRD_RESOURCE:
            for sv in served_versions(old):
                for (r, ns, n), _obj in list(self._live(sv.resource)):
                    self._finalize_locked(r, ns, n, propagation="Background")
                for k in [k for k in self._objects if k[0] == sv.resource]:
                    del self._objects[k]
                self._unregister(sv.resource)
        if res == _NAMESPACES:
            for (r, ns, n), _obj in list(self._live()):
                if ns == name and self._current(r, ns, n) is not None:
                    self._delete_locked(r, ns, n, {}, {})
        self._collect_dependents_locked(old["metadata"].get("uid"), propagation)
        return gone

    def _collect_dependents_locked(self, uid: str | None, propagation: str) -> None:
        if not uid:
            return
        live_uids = {obj["metadata"].get("uid") for _, obj in self._live() if obj.get("metadata")}
        for (res, ns, name), obj in list(self._live()):
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            current = self._current(res, ns, name)
            if current is None:
                continue
            remaining = [ref for ref in refs if ref.get("uid") != uid and ref.get("uid") in live_uids]
            if propagation == "Orphan" or remaining:
                new = copy.deepcopy(current)
                kept = [ref for ref in refs if ref.get("uid") != uid]
                if kept:
                    new["metadata"]["ownerReferences"] = kept
                else:
                    new["metadata"].pop("ownerReferences", None)
                self._commit(res, new, current, "MODIFIED")
            else:
                self._delete_locked(res, ns, name, {"propagationPolicy": propagation}, {})

    # ----------------------------------------------------------------------------- admission

    def _admit(
        self, res: kmock.resource, obj: dict[str, Any], old: dict[str, Any] | None, params: Mapping[str, str]
    ) -> list[str]:
        """Validate metadata, then default/prune/validate against the CRD schema. Returns warnings."""
        kind, group = self._kind_of(res), str(res.group)
        meta = obj["metadata"]
        name = meta.get("name") or ""
        errors = _validate_metadata(meta, namespace_like=res == _NAMESPACES)
        if errors:
            raise _invalid(kind, group, name, errors)
        if res == _CRD_RESOURCE:
            errors = validate_crd(obj)
            if errors:
                raise _invalid(kind, group, name, errors)
        sv = self._crds.get(res)
        warnings: list[str] = []
        if sv is None or sv.schema is None:
            return warnings
        crdschema.apply_defaults(obj, sv.schema)
        dropped = crdschema.prune(obj, sv.schema)
        if dropped:
            validation = params.get("fieldValidation", "")
            if validation == "Strict":
                fields = ", ".join(f'unknown field "{path}"' for path in dropped)
                raise _bad_request(
                    f'{kind} in version "{res.version}" cannot be handled as a {kind}: strict decoding error: {fields}'
                )
            if validation == "Warn":
                warnings.extend(f'unknown field "{path}"' for path in dropped)
            for path in dropped:
                self.pruned.append((_group_resource(res), meta.get("namespace"), name, path))
        errors = crdschema.validate(obj, sv.schema)
        if errors:
            raise _invalid(kind, group, name, errors)
        return warnings

    def _crd_status(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = dict(spec.get("names") or {})
        names.setdefault("singular", str(names.get("kind", "")).lower())
        names.setdefault("listKind", f"{names.get('kind')}List")
        now = now_rfc3339()
        crd["status"] = {
            "acceptedNames": names,
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now,
                },
            ],
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
        }
        old_status = ((self._current(_CRD_RESOURCE, None, crd["metadata"]["name"]) or {}).get("status")) or {}
        if old_status.get("conditions"):  # keep the transition times stable for no-op detection
            crd["status"]["conditions"] = old_status["conditions"]

    # ----------------------------------------------------------------------------- commit & watch

    def _commit(self, res: kmock.resource, obj: dict[str, Any], old: dict[str, Any] | None, event: str) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._decorate(res, obj)
        key = (
            res,
            obj["metadata"].get("namespace") if self.resources[res].namespaced else None,
            obj["metadata"]["name"],
        )
        stored = copy.deepcopy(obj)
        if key in self._objects:
            self._objects[key].history.append(stored)
        else:
            self._objects[key] = stored
        self._emit(res, _Event(self._rv, event, copy.deepcopy(obj), old))

    def _emit(self, res: kmock.resource, event: _Event) -> None:
        self._log.setdefault(res, []).append(event)
        self._pending.append((res, event))

    async def _flush_events(self) -> None:
        # Events are queued while the lock is held and put on the buses after it.
        pending, self._pending = self._pending, []
        for res, event in pending:
            await self._buses[res].put(event)
        if pending:
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_for_change(self, timeout: float | None = None) -> bool:
        """Wait until any object changes (or the timeout passes); True if something changed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(waiter)

    async def close_watches(self) -> None:
        """End every open watch stream (before shutting the server down)."""
        for bus in list(self._buses.values()):
            await bus.put(_CLOSE)

    async def _watch_stream(
        self, request: rendering.Request, res: kmock.resource, namespace: str | None, name: str | None
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        by_labels = parse_label_selector(params.get("labelSelector"))
        by_fields = parse_field_selector(params.get("fieldSelector"))

        def matches(obj: Mapping[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj.get("metadata") or {}
            if namespace is not None and meta.get("namespace") != namespace:
                return False
            if name is not None and meta.get("name") != name:
                return False
            return by_labels(meta.get("labels") or {}) and by_fields(obj)

        def translate(event: _Event) -> dict[str, Any] | None:
            now, before = matches(event.object), matches(event.old)
            if event.type == "DELETED":
                return {"type": "DELETED", "object": event.object} if (now or before) else None
            if now and before:
                return {"type": "MODIFIED", "object": event.object}
            if now:
                return {"type": "ADDED", "object": event.object}
            if before:
                return {"type": "DELETED", "object": event.object}
            return None

        since = params.get("resourceVersion")
        send_initial = params.get("sendInitialEvents") == "true"
        async with self._lock:
            bus = self._buses[res]
            marker = await bus.mark()
            initial: list[dict[str, Any]] = []
            replay: list[dict[str, Any]] = []
            if since in (None, "", "0") or send_initial:
                initial = [
                    {"type": "ADDED", "object": self._decorate(res, obj)}
                    for obj in self.list_objects(res, namespace)
                    if matches(obj)
                ]
            else:
                try:
                    since_rv = int(since)
                except ValueError:
                    await bus.unmark(marker)
                    raise _bad_request(f"invalid resource version: {since}") from None
                for event in self._log.get(res, []):
                    if event.rv > since_rv and (item := translate(event)) is not None:
                        replay.append(item)
            current_rv = self._rv

        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        assert request._raw_request is not None
        try:
            await response.prepare(request._raw_request)

            async def write(item: Mapping[str, Any]) -> None:
                await response.write(json.dumps(item).encode() + b"\n")

            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            try:
                async with asyncio.timeout(timeout):
                    for item in initial + replay:
                        await write(item)
                    if send_initial:
                        await write(
                            {
                                "type": "BOOKMARK",
                                "object": {
                                    "apiVersion": self._api_version(res),
                                    "kind": self._kind_of(res),
                                    "metadata": {
                                        "resourceVersion": str(current_rv),
                                        "annotations": {"k8s.io/initial-events-end": "true"},
                                    },
                                },
                            }
                        )
                    async for event in bus.stream(since=marker):
                        if event is _CLOSE:
                            break
                        # Events committed before the snapshot/replay (but put on the bus after it)
                        # are already reflected there: skip them to avoid duplicates.
                        if isinstance(event, _Event) and event.rv > current_rv and (item := translate(event)):
                            await write(item)
            except TimeoutError:
                pass
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                await bus.unmark(marker)
        return response

    # ----------------------------------------------------------------------------- tables

    def _table(self, res: kmock.resource, objs: list[dict[str, Any]], params: Mapping[str, str]) -> dict[str, Any]:
        sv = self._crds.get(res)
        columns: list[dict[str, Any]] = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name must be unique within a namespace.",
                "priority": 0,
            }
        ]
        extra: list[dict[str, Any]]
        if sv is not None and sv.printer_columns:
            extra = sv.printer_columns
        else:
            extra = [
                *_BUILTIN_COLUMNS.get(self._kind_of(res), []),
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ]
        for col in extra:
            columns.append(
                {
                    "name": col["name"],
                    "type": col.get("type", "string"),
                    "format": col.get("format", ""),
                    "description": col.get("description", ""),
                    "priority": col.get("priority", 0),
                }
            )
        include = params.get("includeObject", "Metadata")
        now = datetime.datetime.now(tz=datetime.UTC)
        rows = []
        for obj in objs:
            cells: list[Any] = [obj["metadata"].get("name")]
            for col in extra:
                value = jsonpath_first(obj, col["jsonPath"])
                if value is not None and col.get("type") == "date":
                    try:
                        value = human_duration((now - parse_rfc3339(str(value))).total_seconds())
                    except ValueError:
                        value = "<invalid>"
                elif value is not None and col.get("type", "string") == "string" and not isinstance(value, str):
                    value = json.dumps(value) if isinstance(value, dict | list) else str(value)
                cells.append(value)
            row: dict[str, Any] = {"cells": cells}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "columnDefinitions": columns,
            "rows": rows,
        }

    # ----------------------------------------------------------------------------- discovery

    async def _serve_apis(self, request: rendering.Request) -> rendering.Payload:
        body = await super()._serve_apis(request)
        assert isinstance(body, dict)
        for group in body["groups"]:
            group["versions"].sort(key=lambda v: version_priority(v["version"]), reverse=True)
            group["preferredVersion"] = group["versions"][0]
        body["groups"].sort(key=lambda g: g["name"])
        return body

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        body = await super()._serve_version(request)
        assert isinstance(body, dict)
        body["groupVersion"] = body["groupVersion"].lstrip("/")  # kmock says "/v1" for the core group
        for entry in body["resources"]:
            if "/" in entry["name"]:  # subresources carry no short names/categories, and fewer verbs
                entry["shortNames"] = []
                entry["categories"] = []
                entry["singularName"] = ""
                entry["verbs"] = ["get", "patch", "update"]
            else:
                entry["shortNames"] = sorted(entry["shortNames"])
                entry["categories"] = sorted(entry["categories"])
                entry["verbs"] = sorted(entry["verbs"])
        body["resources"].sort(key=lambda e: e["name"])
        return body

    def _group_versions(self) -> dict[tuple[str, str], list[kmock.resource]]:
        gvs: dict[tuple[str, str], list[kmock.resource]] = {}
        for res in self._get_resources():
            if res.group is not None and res.version and res.plural:
                gvs.setdefault((res.group, res.version), []).append(res)
        return gvs

    async def _serve_openapi_root(self, request: rendering.Request) -> rendering.Payload:
        paths = {}
        for group, version in sorted(self._group_versions()):
            prefix = f"apis/{group}/{version}" if group else f"api/{version}"
            digest = abs(hash(json.dumps(self._openapi_doc(group, version), sort_keys=True)))
            paths[prefix] = {"serverRelativeURL": f"/openapi/v3/{prefix}?hash={digest:X}"}
        return {"paths": paths}

    async def _serve_openapi_group_version(self, request: rendering.Request) -> rendering.Payload:
        parts = request.url.path.strip("/").split("/")[2:]  # drop "openapi", "v3"
        if len(parts) == 2 and parts[0] == "api":
            group, version = "", parts[1]
        elif len(parts) == 3 and parts[0] == "apis":
            group, version = parts[1], parts[2]
        else:
            raise _resource_not_found()
        if (group, version) not in self._group_versions():
            raise _resource_not_found()
        return self._openapi_doc(group, version)

    def _openapi_doc(self, group: str, version: str) -> dict[str, Any]:
        """A minimal OpenAPI v3 document: enough for kubectl to see server-side field validation
        (``fieldValidation`` on PATCH, with the x-kubernetes-group-version-kind extension), and the
        CRD schemas as components (for ``kubectl explain``)."""
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        base = f"/apis/{group}/{version}" if group else f"/api/{version}"
        query = [
            {"name": name, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
            for name in ("dryRun", "fieldManager", "fieldValidation", "force")
        ]
        for res in sorted(self._group_versions().get((group, version), []), key=lambda r: str(r.plural)):
            info = self.resources[res]
            kind = self._kind_of(res)
            gvk = {"group": group, "version": version, "kind": kind}
            ref = f"{group or 'core'}.{version}.{kind}"
            content = {"schema": {"$ref": f"#/components/schemas/{ref}"}}
            item = (
                f"{base}/namespaces/{{namespace}}/{res.plural}/{{name}}"
                if info.namespaced
                else f"{base}/{res.plural}/{{name}}"
            )
            patch_types = [
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ]
            paths[item] = {
                "get": {
                    "x-kubernetes-action": "get",
                    "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"content": {"application/json": content}}},
                },
                "put": {
                    "x-kubernetes-action": "put",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": query,
                    "requestBody": {"content": {"application/json": content}},
                    "responses": {"200": {"content": {"application/json": content}}},
                },
                "patch": {
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": query,
                    "requestBody": {"content": {t: {"schema": {"type": "object"}} for t in patch_types}},
                    "responses": {"200": {"content": {"application/json": content}}},
                },
                "delete": {
                    "x-kubernetes-action": "delete",
                    "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"content": {"application/json": content}}},
                },
            }
            sv = self._crds.get(res)
            schema = (
                copy.deepcopy(sv.schema)
                if sv is not None and sv.schema
                else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            )
            schema["x-kubernetes-group-version-kind"] = [gvk]
            schemas[ref] = schema
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes (emulated)", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    async def _serve_group(self, request: rendering.Request) -> rendering.Payload:
        body = await super()._serve_group(request)
        assert isinstance(body, dict)
        body["versions"].sort(key=lambda v: version_priority(v["version"]), reverse=True)
        body["preferredVersion"] = body["versions"][0]
        return body


_CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_SECRETS = kmock.resource("", "v1", "secrets")


def _normalize_builtin(res: kmock.resource, obj: dict[str, Any]) -> None:
    """What the apiserver's strategies do to a few built-in kinds on write."""
    if res == _SECRETS and obj.get("stringData"):
        data = obj.setdefault("data", {}) or {}
        for key, value in obj.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data
    if res == _SECRETS:
        obj.pop("stringData", None)
        obj.setdefault("type", "Opaque")


def _spec_of(obj: Mapping[str, Any], has_status: bool) -> dict[str, Any]:
    """What counts for metadata.generation: everything but metadata (and status if a subresource)."""
    skip = {"metadata", "status"} if has_status else {"metadata"}
    return {k: v for k, v in obj.items() if k not in skip}


def _is_json_type(content_type: str) -> bool:
    return not content_type or content_type == "application/json" or content_type.endswith("+json")


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in (request.headers.get("Accept") or "")


def _validate_metadata(meta: Mapping[str, Any], *, namespace_like: bool) -> list[crdschema.FieldError]:
    errs: list[crdschema.FieldError] = []
    name = meta.get("name")
    if not name:
        errs.append(
            crdschema.FieldError(
                "metadata.name", "Required value: name or generateName is required", "FieldValueRequired"
            )
        )
    elif namespace_like:
        if len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
            errs.append(
                crdschema.FieldError(
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case alphanumeric '
                    "characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or "
                    "'123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
                )
            )
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        errs.append(
            crdschema.FieldError(
                "metadata.name",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
                "characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
                "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
            )
        )
    for key, value in (meta.get("labels") or {}).items():
        errs.extend(_validate_key("metadata.labels", key))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            errs.append(
                crdschema.FieldError(
                    "metadata.labels",
                    f"Invalid value: {crdschema.go_value(value)}: a valid label must be an empty string or consist of "
                    "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character "
                    "(e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
                    + (" and must be no more than 63 characters" if isinstance(value, str) and len(value) > 63 else ""),
                )
            )
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        errs.extend(_validate_key("metadata.annotations", key))
        if not isinstance(value, str):
            errs.append(crdschema.FieldError(f"metadata.annotations.{key}", "Invalid value: must be a string"))
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        errs.append(
            crdschema.FieldError(
                "metadata.annotations", "Too long: must have at most 262144 bytes", "FieldValueTooLong"
            )
        )
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                errs.append(
                    crdschema.FieldError(
                        f"metadata.ownerReferences[{i}].{key}",
                        'Invalid value: "": '
                        + ("uid must not be empty" if key == "uid" else f"{key} must not be empty"),
                    )
                )
    return errs


def _validate_key(where: str, key: str) -> list[crdschema.FieldError]:
    prefix, _, name = key.rpartition("/")
    ok = bool(name) and len(name) <= 63 and bool(_QUALIFIED_NAME.fullmatch(name))
    if prefix:
        ok = ok and len(prefix) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(prefix))
    if ok:
        return []
    return [
        crdschema.FieldError(
            where,
            f"Invalid value: \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
            "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix "
            "and '/' (e.g. 'example.com/MyName')",
        )
    ]


def parse_k8s_path(path: str) -> parsing.ParsedPath:
    """Parse an apiserver URL path, including ``/api/v1/namespaces[/<name>[/status]]`` (kmock can't)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) == 2 and parts[0] == "apis":
        return parsing.ParsedPath(group=parts[1])
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return parsing.ParsedPath()
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    return parsing.ParsedPath(
        group=group,
        version=version,
        namespace=namespace,
        plural=rest[0] if rest else None,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


async def _parse_request(raw_request: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
    """``kmock.Request._parse`` with ``parse_k8s_path`` instead of kmock's URL parser."""
    body = await raw_request.read()
    text = body.decode("utf-8", errors="replace")  # protobuf bodies are not text
    data: Any
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    k8s = parse_k8s_path(raw_request.path)
    resource = None if k8s.group is None else kmock.resource(group=k8s.group, version=k8s.version, plural=k8s.plural)
    method = enums.method(raw_request.method)
    query = dict(raw_request.query)
    action = parsing.guess_k8s(k8s, method, query)
    return rendering.Request(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=raw_request.method,
        params=query,
        headers=dict(raw_request.headers),
        cookies=dict(raw_request.cookies),
        data=data,
        body=body,
        text=text,
        action=action,
        resource=resource,
        namespace=k8s.namespace,
        name=k8s.name,
        subresource=k8s.subresource,
    )


# =============================================================================================
# Ready-made CRDs.
# =============================================================================================


def minimal_crd(
    group: str,
    kind: str,
    plural: str,
    *,
    versions: Iterable[str] = ("v1",),
    namespaced: bool = True,
    status: bool = True,
    short_names: Iterable[str] = (),
    categories: Iterable[str] = (),
    printer_columns: Iterable[Mapping[str, Any]] = (),
    schema: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A CRD object whose schema accepts anything (unless ``schema`` is given)."""
    open_schema = schema or {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    versions = list(versions)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced" if namespaced else "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                **({"shortNames": list(short_names)} if short_names else {}),
                **({"categories": list(categories)} if categories else {}),
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": index == len(versions) - 1,
                    "schema": {"openAPIV3Schema": copy.deepcopy(dict(open_schema))},
                    **({"subresources": {"status": {}}} if status else {}),
                    **({"additionalPrinterColumns": [dict(c) for c in printer_columns]} if printer_columns else {}),
                }
                for index, version in enumerate(versions)
            ],
        },
    }


def ray_crds() -> list[dict[str, Any]]:
    """KubeRay's RayJob and RayService (``ray.io/v1``, namespaced, status subresource), open schemas."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return [
        minimal_crd(
            "ray.io",
            "RayJob",
            "rayjobs",
            categories=["all"],
            printer_columns=[
                {"name": "Job Status", "type": "string", "jsonPath": ".status.jobStatus"},
                {"name": "Deployment Status", "type": "string", "jsonPath": ".status.jobDeploymentStatus"},
                {"name": "Ray Cluster Name", "type": "string", "jsonPath": ".status.rayClusterName"},
                {"name": "Start Time", "type": "string", "jsonPath": ".status.startTime"},
                {"name": "End Time", "type": "string", "jsonPath": ".status.endTime"},
                age,
            ],
        ),
        minimal_crd(
            "ray.io",
            "RayService",
            "rayservices",
            categories=["all"],
            printer_columns=[
                {"name": "Service Status", "type": "string", "jsonPath": ".status.serviceStatus"},
                {"name": "Num Serve Endpoints", "type": "string", "jsonPath": ".status.numServeEndpoints"},
                age,
            ],
        ),
    ]


def kopf_peering_crds() -> list[dict[str, Any]]:
    """Kopf's peering CRDs (``kopf.dev/v1`` KopfPeering and ClusterKopfPeering)."""
    peering_schema = {
        "type": "object",
        "properties": {
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    return [
        minimal_crd("kopf.dev", "KopfPeering", "kopfpeerings", status=False, schema=peering_schema),
        minimal_crd(
            "kopf.dev",
            "ClusterKopfPeering",
            "clusterkopfpeerings",
            namespaced=False,
            status=False,
            schema=peering_schema,
        ),
    ]


# =============================================================================================
# The cluster: a running server + a kubeconfig + helpers for tests.
# =============================================================================================


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


class EmulatedCluster:
    """An emulated cluster served over HTTP on 127.0.0.1 in the current event loop.

    ``async with EmulatedCluster() as cluster:`` gives ``cluster.url``, ``cluster.kubeconfig_path``
    (context ``emulated``, namespace ``default``), ``cluster.api`` (the kmock handler: reactions,
    ``requests``, ``objects``), and helpers to seed and read objects through the same admission
    path as HTTP requests. Namespaces ``default`` and ``kube-system`` exist; the Ray CRDs are
    registered unless ``ray=False``; Kopf's peering CRDs if ``kopf_peering=True``.
    """

    def __init__(
        self,
        *,
        ray: bool = True,
        kopf_peering: bool = False,
        namespaces: Iterable[str] = ("default", "kube-system"),
        strict_namespaces: bool = False,
        workdir: str | pathlib.Path | None = None,
    ) -> None:
        self.api = ApiServer(strict_namespaces=strict_namespaces)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # kmock's importlib.resources.read_binary
            self.api.resources.load_bundled()
        self._ray = ray
        self._kopf_peering = kopf_peering
        self._namespaces = list(namespaces)
        self._workdir_arg = workdir
        self._stack = contextlib.AsyncExitStack()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.server: kmock.Server | None = None
        self.workdir = pathlib.Path()
        self.kubeconfig_path = pathlib.Path()

    async def __aenter__(self) -> EmulatedCluster:
        try:
            if self._workdir_arg is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="emulated-k8s-")
                self.workdir = pathlib.Path(self._tmp.name)
            else:
                self.workdir = pathlib.Path(self._workdir_arg)
                self.workdir.mkdir(parents=True, exist_ok=True)
            await self._stack.enter_async_context(self.api)
            self.server = await self._stack.enter_async_context(kmock.Server(self.api))
            for ns in self._namespaces:
                await self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for crd in (ray_crds() if self._ray else []) + (kopf_peering_crds() if self._kopf_peering else []):
                await self.apply(crd)
            self.kubeconfig_path = self.workdir / "kubeconfig"
            self.kubeconfig_path.write_text(yaml.safe_dump(self.kubeconfig()))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self.api.close_watches()
            await asyncio.sleep(0)
            await self._stack.aclose()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        errors = [e for e in self.api.server_errors if not isinstance(e, ConnectionError | asyncio.CancelledError)]
        if errors and exc is None and self.api.strict_errors:
            tbs = "".join("".join(traceback.format_exception(e)) for e in errors)
            raise AssertionError(f"The emulated apiserver failed with {len(errors)} internal error(s):\n{tbs}")

    # ----------------------------------------------------------------------------- connecting

    @property
    def url(self) -> str:
        assert self.server is not None, "the cluster is not started"
        return str(self.server.url).rstrip("/")

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "emulated", "user": {"token": "emulated"}}],
            "contexts": [
                {"name": "emulated", "context": {"cluster": "emulated", "user": "emulated", "namespace": namespace}}
            ],
            "current-context": "emulated",
            "preferences": {},
        }

    def connection_info(self, namespace: str = "default") -> Any:
        """``kopf.ConnectionInfo`` for an ``@kopf.on.login`` handler."""
        import kopf

        return kopf.ConnectionInfo(
            server=self.url, insecure=True, scheme="Bearer", token="emulated", default_namespace=namespace
        )

    def kubernetes_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (use it from threads / sync code only)."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig_path), client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)

    # ----------------------------------------------------------------------------- reading

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Deep copies of the live objects (all namespaces if ``namespace`` is None)."""
        return self.api.list_objects(kmock.resource(group, version, plural), namespace, label_selector)

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A deep copy of one live object, or None."""
        return self.api.get_object(kmock.resource(group, version, plural), namespace, name)

    def history(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> list[dict[str, Any] | None]:
        """All stored versions of an object (None marks a deletion)."""
        key = (kmock.resource(group, version, plural), namespace, name)
        if key not in self.api.objects:
            return []
        return [None if v is None else copy.deepcopy(v.raw) for v in self.api.objects[key].history]

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, poll: float = 1.0) -> T:
        """Re-check ``predicate`` after every change of any object (and every ``poll`` seconds)
        until it returns something truthy; return that. Cheap under looptime (no busy polling)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s: {predicate}")
            await self.api.wait_for_change(min(poll, remaining))

    @property
    def pruned(self) -> list[tuple[str, str | None, str, str]]:
        """(group-resource, namespace, name, field path) of every field the schemas pruned."""
        return list(self.api.pruned)

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Core ``v1`` Events (kopf posts these)."""
        return self.objects("", "v1", "events", namespace)

    # ----------------------------------------------------------------------------- writing

    def _resolve(self, obj: Mapping[str, Any]) -> tuple[kmock.resource, str | None]:
        res = self.api.find_resource(obj["apiVersion"], obj["kind"])
        namespace = None
        if self.api.resources[res].namespaced:
            namespace = (obj.get("metadata") or {}).get("namespace") or "default"
        return res, namespace

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create through the apiserver's admission (namespace defaults to ``default``)."""
        res, namespace = self._resolve(obj)
        created, _ = await self.api.create_object(res, namespace, obj)
        return created

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch if it exists (what ``kubectl apply`` amounts to)."""
        res, namespace = self._resolve(obj)
        name = obj["metadata"]["name"]
        if self.api.get_object(res, namespace, name) is None:
            return await self.create(obj)
        patch = {k: v for k, v in obj.items() if k != "status"}
        patched, _ = await self.api.patch_object(res, namespace, name, patch)
        return patched

    async def apply_yaml(self, text_or_path: str | pathlib.Path) -> list[dict[str, Any]]:
        """Apply every document of a YAML text or file."""
        text = pathlib.Path(text_or_path).read_text() if isinstance(text_or_path, pathlib.Path) else text_or_path
        return [await self.apply(doc) for doc in yaml.safe_load_all(text) if doc]

    async def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = "default",
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        """Patch like a client would (merge patch by default; a list means JSON patch)."""
        res = self.api.find_resource(api_version, kind)
        ns = namespace if self.api.resources[res].namespaced else None
        if isinstance(patch, list):
            content_type = "application/json-patch+json"
        patched, _ = await self.api.patch_object(res, ns, name, patch, content_type, subresource)
        return patched

    async def patch_status(
        self, api_version: str, kind: str, name: str, status: Mapping[str, Any], *, namespace: str | None = "default"
    ) -> dict[str, Any]:
        """Merge-patch ``status`` through the status subresource (what a controller, e.g. KubeRay, does)."""
        return await self.patch(
            api_version, kind, name, {"status": dict(status)}, namespace=namespace, subresource="status"
        )

    async def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        *,
        namespace: str | None = "default",
        propagation: str | None = None,
    ) -> dict[str, Any]:
        res = self.api.find_resource(api_version, kind)
        ns = namespace if self.api.resources[res].namespaced else None
        options = {"propagationPolicy": propagation} if propagation else {}
        return await self.api.delete_object(res, ns, name, options)


class ThreadedCluster:
    """``EmulatedCluster`` running in its own thread and event loop, for synchronous tests.

    ``with ThreadedCluster() as cluster:`` exposes the same attributes; reading helpers run in
    the server's loop; the async writing helpers are available synchronously via ``call``::

        cluster.call(cluster.cluster.create, {...})
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.cluster: EmulatedCluster | None = None

    def __enter__(self) -> ThreadedCluster:
        self._thread = threading.Thread(target=self._run, name="emulated-k8s", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if self.cluster is None:
            raise RuntimeError("the emulated cluster did not start in 30 s")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        if self._error is not None and exc[1] is None:
            raise self._error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with EmulatedCluster(**self._kwargs) as cluster:
                    self.cluster = cluster
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:
                self._error = e
            finally:
                self._ready.set()

        asyncio.run(main())

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]] | Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the server's loop (awaiting it if async); return the result."""
        assert self._loop is not None

        async def runner() -> T:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return await result  # type: ignore[no-any-return]
            return result  # type: ignore[return-value]

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result(30)

    @property
    def url(self) -> str:
        assert self.cluster is not None
        return self.cluster.url

    @property
    def kubeconfig_path(self) -> pathlib.Path:
        assert self.cluster is not None
        return self.cluster.kubeconfig_path

    @property
    def api(self) -> ApiServer:
        assert self.cluster is not None
        return self.cluster.api

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None, **kw: Any
    ) -> list[dict[str, Any]]:
        assert self.cluster is not None
        return self.call(self.cluster.objects, group, version, plural, namespace, **kw)

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert self.cluster is not None
        return self.call(self.cluster.get, group, version, plural, namespace, name)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        assert self.cluster is not None
        return self.call(self.cluster.create, obj)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        assert self.cluster is not None
        return self.call(self.cluster.apply, obj)

    def patch_status(
        self, api_version: str, kind: str, name: str, status: Mapping[str, Any], **kw: Any
    ) -> dict[str, Any]:
        assert self.cluster is not None
        return self.call(self.cluster.patch_status, api_version, kind, name, status, **kw)


async def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Prefer ``EmulatedCluster.wait_for`` for conditions on the cluster: it wakes up on changes.
    Under looptime, every poll is a loop-time step, so keep ``interval`` coarse."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)
