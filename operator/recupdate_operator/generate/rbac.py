"""Every Kubernetes permission the operator uses, for the Helm chart's and manifests' RBAC rules.

Each API call in the operator's code carries a ``# rbac: <group> <resource> <verb>`` comment ("" is the
core group); ``marked_in_source()`` collects them and a test checks that they and ``RULES`` agree, so a new
call cannot ship without its permission. kopf's own needs (watching, Events, peering, scanning) are listed
here too, with the kopf feature that needs them.

Scopes, as the chart's files/rbac-rules.yaml groups them (``rules_by_scope()``):
  namespaced         in every watched namespace (a Role each; a ClusterRole with --all-namespaces);
  cluster            cluster-scoped resources (always a ClusterRole);
  peeringNamespaced  kopf peering in a namespace (--peering without --all-namespaces);
  peeringCluster     kopf peering cluster-wide (--peering with --all-namespaces).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..api import GROUP, PLURAL

SCOPES = ("namespaced", "cluster", "peeringNamespaced", "peeringCluster")


@dataclass(frozen=True)
class Rule:
    group: str
    resource: str
    verbs: tuple[str, ...]
    scope: str
    why: str
    kopf: bool = False  # used by kopf itself, not by a call in our code


RULES: tuple[Rule, ...] = (
    Rule(GROUP, PLURAL, ("get", "list", "watch"), "namespaced", "watch policies; read one when the watch lags"),
    Rule(GROUP, f"{PLURAL}/status", ("patch",), "namespaced", "write the policy status"),
    Rule(
        GROUP,
        PLURAL,
        ("patch",),
        "namespaced",
        "kopf adds and removes its finalizer on policies (with --peering only; see handlers.py)",
        kopf=True,
    ),
    Rule("ray.io", "rayjobs", ("get", "list", "watch", "create", "delete"), "namespaced", "one RayJob per run"),
    Rule(
        "ray.io",
        "rayservices",
        ("get", "list", "watch", "create", "patch", "delete"),
        "namespaced",
        "the RayService serving the active release",
    ),
    Rule("", "secrets", ("get",), "namespaced", "the store DSN of spec.store.secretRef"),
    Rule("", "events", ("create",), "namespaced", "an Event for every decision (kopf posts them)"),
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "cluster",
        "kopf notices CRDs installed later (e.g. KubeRay); optional: kopf warns without it",
        kopf=True,
    ),
    Rule(
        "",
        "namespaces",
        ("list", "watch"),
        "cluster",
        "kopf resolves --namespace patterns; optional: kopf warns and uses exact names without it",
        kopf=True,
    ),
    Rule("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch"), "peeringNamespaced", "kopf peering", kopf=True),
    Rule(
        "kopf.dev",
        "clusterkopfpeerings",
        ("get", "list", "watch", "patch"),
        "peeringCluster",
        "kopf peering (cluster-wide)",
        kopf=True,
    ),
)

#: Every (apiGroup, resource, verb) the operator uses.
PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset((r.group, r.resource, v) for r in RULES for v in r.verbs)
#: Those used by calls in our own code (each marked with an ``# rbac:`` comment).
OWN_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    (r.group, r.resource, v) for r in RULES if not r.kopf for v in r.verbs
)

_MARK = re.compile(r"#\s*rbac:\s*(\"\"|[A-Za-z0-9.-]+)\s+([a-z0-9/]+)\s+([a-z]+)\b")


def rules_by_scope() -> dict[str, list[dict[str, Any]]]:
    """Kubernetes PolicyRules per scope (the chart's files/rbac-rules.yaml); verbs of one resource merged."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SCOPES}
    for r in RULES:
        same = next((x for x in out[r.scope] if x["apiGroups"] == [r.group] and x["resources"] == [r.resource]), None)
        if same is None:
            out[r.scope].append({"apiGroups": [r.group], "resources": [r.resource], "verbs": list(r.verbs)})
        else:
            same["verbs"] += [v for v in r.verbs if v not in same["verbs"]]
    return out


def marked_in_source(root: Path | None = None) -> set[tuple[str, str, str]]:
    """The (group, resource, verb) of every ``# rbac:`` comment in the operator package."""
    root = root or Path(__file__).resolve().parents[1]  # the package, not generate/
    found: set[tuple[str, str, str]] = set()
    for path in sorted(root.rglob("*.py")):
        if path.name == "rbac.py":
            continue
        for m in _MARK.finditer(path.read_text()):
            group = "" if m.group(1) == '""' else m.group(1)
            found.add((group, m.group(2), m.group(3)))
    return found


def main() -> None:
    """Print files/rbac-rules.yaml for the chart."""

    print(yaml.safe_dump(rules_by_scope(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
