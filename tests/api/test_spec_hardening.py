"""Hardening (issue 15): every policy the CRD admits can be planned; local mode validates as the CRD does.

The oracle for "what Kubernetes admits" is the CRD itself (crd.build_crd()): tests/k8s/schema.py prunes,
defaults and validates against its openAPIV3Schema the way kube-apiserver does, the emulator's metadata
check applies the API server's name rules, and the CEL rules (x-kubernetes-validations) are evaluated with
cel-python. Specs are generated from that schema, so a field added to api.py is generated too.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fixtures.net import free_port
from k8s import emulator
from k8s import schema as kschema
from recupdate_operator import api, schedule
from recupdate_operator import local_driver as local
from recupdate_operator.api import ConditionType, RunKind
from recupdate_operator.backends.base import PolicyRef
from recupdate_operator.backends.local import LocalBackend
from recupdate_operator.generate import crd
from recupdate_operator.planner import (
    LaunchRun,
    ObservedJob,
    Policy,
    RegistryView,
    ReleaseView,
    RunView,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA: dict[str, Any] = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC_SCHEMA: dict[str, Any] = SCHEMA["properties"]["spec"]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MAX_D = 3650  # days: api.MAX_DURATION_SECONDS, ten years


# ---------------------------------------------------------------------------------------------------------
# The oracle: what the API server admits, from the CRD


def _substring(s: Any, start: Any, end: Any = None) -> Any:  # the Kubernetes CEL strings library
    return celtypes.StringType(s[int(start) :] if end is None else s[int(start) : int(end)])


_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


@functools.cache
def _cel_holds(rule: str, value: str) -> bool:
    """One rule on one JSON value (cached: cel-python takes milliseconds per evaluation)."""
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _CEL.program(_CEL.compile(rule), functions={"substring": _substring})
    try:
        result = _PROGRAMS[rule].evaluate({"self": celpy.json_to_cel(json.loads(value))})
    except Exception:  # an evaluation error rejects the object, as in the API server
        return False
    return isinstance(result, celtypes.BoolType) and bool(result)


def _cel_errors(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """Every x-kubernetes-validations rule of `node` and below, evaluated on `value` (create: no oldSelf)."""
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules run on updates only
        if not _cel_holds(rule["rule"], json.dumps(value, sort_keys=True)):
            errors.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for key, child in (node.get("properties") or {}).items():
            if value.get(key) is not None:
                errors += _cel_errors(value[key], child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        keys = node.get("x-kubernetes-list-map-keys")
        if node.get("x-kubernetes-list-type") == "map" and keys:  # schema.py leaves list-map keys unchecked
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: Duplicate value")
        for i, item in enumerate(value):
            errors += _cel_errors(item, node["items"], f"{path}[{i}]")
    return errors


def api_server_errors(obj: Any) -> list[str]:
    """Why `kubectl apply` (strict field validation) of `obj` as a new object fails; [] if it is admitted."""
    if not isinstance(obj, dict):
        return ["not an object"]
    obj = copy.deepcopy(obj)
    if obj.get("apiVersion") != api.API_VERSION or obj.get("kind") != api.KIND:
        return ["no matches for kind"]
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: must be an object"]
    for key in ("name", "namespace"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return [f"metadata.{key}: must be a string"]
    errors = [str(e) for e in emulator._validate_metadata({"name": meta.get("name")}, namespace_like=False)]
    if meta.get("namespace"):
        errors += [str(e) for e in emulator._validate_metadata({"name": meta["namespace"]}, namespace_like=True)]
    obj.pop("status", None)  # the status subresource: ignored on create
    errors += [f"{p}: unknown field" for p in kschema.prune(obj, SCHEMA)]
    kschema.apply_defaults(obj, SCHEMA)
    errors += [str(e) for e in kschema.validate(obj, SCHEMA)]
    if not errors:
        errors += _cel_errors(obj["spec"], SPEC_SCHEMA, "spec")
    return errors


def admitted_spec(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The spec as the API server stores it (pruned nulls, defaults), or None when it rejects it."""
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "p"}, "spec": copy.deepcopy(spec)}
    if api_server_errors(obj):
        return None
    kschema.apply_defaults(obj, SCHEMA)
    stored: dict[str, Any] = obj["spec"]
    return stored


# ---------------------------------------------------------------------------------------------------------
# Specs generated from the CRD's schema


def _durations() -> st.SearchStrategy[str]:
    units = st.sampled_from("smhdw")
    small = st.builds(lambda n, u: f"{n}{u}", st.integers(0, 5000), units)
    edges = st.sampled_from(["3650d", "521w", "522w", "315360000s", "315360001s", "5256000m", "999999999w", "0s"])
    return st.one_of(small, edges)


_CRON_FIELDS = [
    ["0", "*", "*/15", "5,35", "0-30/7", "59", "60", "R", "H"],  # minute
    ["0", "*", "3", "*/6", "23", "24"],  # hour
    ["*", "1", "15", "29", "30", "31", "L", "1W", "?", "32"],  # day of month
    ["*", "1", "2", "4", "2,4,6,9,11", "jan", "feb", "13"],  # month
    ["*", "0", "1", "7", "mon-fri", "1#5", "5L", "8"],  # day of week
]


def _crons() -> st.SearchStrategy[str]:
    fields = st.tuples(*(st.sampled_from(f) for f in _CRON_FIELDS)).map(" ".join)
    macros = st.sampled_from(["@yearly", "@monthly", "@weekly", "@daily", "@hourly", "@annually", "@midnight"])
    return st.one_of(fields, macros)


_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Pacific/Chatham", "Asia/Kathmandu",
          "America/Sao_Paulo", "Factory", "America", "Mars/Olympus", "Etc/GMT+12", "../etc/passwd"]  # fmt: skip
# Realistic values mixed into the generic ones, where random text would almost never hit the interesting cases.
_HINTS: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "spec.fineTune.schedule": _crons,
    "spec.fineTune.timeZone": lambda: st.sampled_from(_ZONES),
}


def from_schema(node: dict[str, Any], path: str = "spec") -> st.SearchStrategy[Any]:
    """Values of an openAPIV3Schema node: objects, enums, bounds, patterns, lengths, nullability."""
    kind = node.get("type")
    base: st.SearchStrategy[Any]
    if "enum" in node:
        base = st.sampled_from(node["enum"])
    elif kind == "object":
        props = node.get("properties")
        if props:
            required = set(node.get("required", []))
            base = st.fixed_dictionaries(
                {k: from_schema(v, f"{path}.{k}") for k, v in props.items() if k in required},
                optional={k: from_schema(v, f"{path}.{k}") for k, v in props.items() if k not in required},
            )
        elif isinstance(node.get("additionalProperties"), dict):
            base = st.dictionaries(
                st.text(min_size=1, max_size=10),
                from_schema(node["additionalProperties"], f"{path}[]"),
                min_size=node.get("minProperties", 0),
                max_size=3,
            )
        else:
            base = st.just({})
    elif kind == "array":
        keys = node.get("x-kubernetes-list-map-keys") or []
        base = st.lists(
            from_schema(node["items"], f"{path}[]"),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 3), 3),
            unique_by=(lambda d: tuple(d.get(k) for k in keys)) if keys else None,
        )
    elif kind == "string":
        lo, hi = node.get("minLength", 0), node.get("maxLength")
        if node.get("pattern") == api.DURATION_PATTERN:
            text: st.SearchStrategy[str] = st.one_of(_durations(), st.from_regex(node["pattern"], fullmatch=True))
        elif node.get("pattern"):
            text = st.from_regex(node["pattern"], fullmatch=True)
        else:
            text = st.text(min_size=lo, max_size=min(hi or 20, 20))
        base = text.filter(lambda s: lo <= len(s) <= (hi or len(s)))
    elif kind == "integer":
        lo = node.get("minimum", -(2**63)) + (1 if node.get("exclusiveMinimum") else 0)
        hi = node.get("maximum", 2**63 - 1) - (1 if node.get("exclusiveMaximum") else 0)
        base = st.one_of(st.integers(lo, min(hi, lo + 1000)), st.integers(lo, hi))
    elif kind == "number":
        base = st.floats(
            node.get("minimum"),
            node.get("maximum"),
            exclude_min=bool(node.get("exclusiveMinimum")),
            exclude_max=bool(node.get("exclusiveMaximum")),
            allow_nan=False,
            allow_infinity=False,
        )
    elif kind == "boolean":
        base = st.booleans()
    else:
        raise AssertionError(f"{path}: untyped schema node")
    if path in _HINTS:
        base = st.one_of(_HINTS[path](), base)
    if node.get("nullable"):
        base = st.one_of(st.none(), base)
    return base


def _with_schedule(spec: dict[str, Any], ft: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "fineTune": {**(spec.get("fineTune") or {}), **ft}}


# Half the specs with a schedule and a time zone set: hypothesis favours leaving optional keys out.
SPECS = st.one_of(
    from_schema(SPEC_SCHEMA),
    st.builds(
        _with_schedule,
        from_schema(SPEC_SCHEMA),
        st.fixed_dictionaries({"schedule": _crons(), "timeZone": st.sampled_from(_ZONES)}),
    ),
)
DNS_NAMES = st.from_regex(emulator._DNS1123_SUBDOMAIN.pattern, fullmatch=True).filter(lambda s: len(s) <= 253)
INSTANTS = st.one_of(
    st.sampled_from(
        [
            NOW,
            datetime(1970, 1, 1, 0, 0, 30, tzinfo=UTC),
            datetime(2096, 2, 29, 0, 0, tzinfo=UTC),  # the last leap day before 2100, which is none
            datetime(2099, 3, 1, tzinfo=UTC),
            datetime(2025, 3, 30, 0, 59, 59, tzinfo=UTC),  # Europe's spring-forward gap
            datetime(2025, 10, 26, 1, 0, tzinfo=UTC),  # and its repeated hour
        ]
    ),
    st.datetimes(datetime(1971, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC)),
)


def _model_verdict(spec: dict[str, Any]) -> str | None:
    try:
        api.validate_spec(spec)
    except (ValidationError, ValueError) as exc:
        return str(exc)
    return None


def _spec_valid(p: Any) -> str:
    cond = next(c for c in p.status.conditions if c.type == ConditionType.SPEC_VALID)
    return str(cond.status.value)


def _reconcile_three_times(name: str, spec: dict[str, Any], now: datetime, created: datetime | None) -> list[Any]:
    """Like the operator: plan, run what it launched to success with a passing candidate, plan again, twice."""
    policy = Policy(name, "default", spec, 1, {}, created)
    status: Any = None
    jobs: list[ObservedJob] = []
    runs: list[RunView] = []
    releases: list[ReleaseView] = []
    plans = []
    for step in range(3):
        t = now + timedelta(days=step)
        p = plan(policy, status, jobs, RegistryView(tuple(runs), tuple(releases)), t)
        plans.append(p)
        status = p.status_patch()
        for a in p.actions:
            if isinstance(a, LaunchRun):
                jobs.append(ObservedJob(a.job_name, a.kind, a.run_id, 1, "Complete", "SUCCEEDED", t, t))
                rel = f"rel-{a.run_id}"
                runs.append(RunView(a.run_id, a.kind, "succeeded", release_id=rel))
                releases.append(ReleaseView(rel, "candidate", {"passed": True}, {}, t, None, t, a.run_id))
    return plans


# ---------------------------------------------------------------------------------------------------------
# Property: the planner reports, never raises, for every spec the CRD admits


def test_planner_never_raises_for_any_spec_the_crd_admits() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])  # fmt: skip
    @given(spec=SPECS, name=DNS_NAMES, now=INSTANTS, age=st.none() | st.integers(0, 10**8))
    def check(spec: dict[str, Any], name: str, now: datetime, age: int | None) -> None:
        seen["generated"] += 1
        stored = admitted_spec(spec)
        if stored is None:
            seen["rejected by the CRD"] += 1
            return
        created = now - timedelta(seconds=age) if age is not None else None
        plans = _reconcile_three_times(name, stored, now, created)  # raises: the test fails
        verdict = _model_verdict(stored)
        seen["admitted, valid" if verdict is None else "admitted, invalid (SpecValid=False)"] += 1
        for p in plans:
            assert _spec_valid(p) == ("True" if verdict is None else "False"), (verdict, p.status.conditions)
            if verdict is not None:  # nothing but the Warning event
                assert all(type(a).__name__ == "Event" for a in p.actions), p.actions

    check()
    print(f"\nplanner property: {dict(seen)}")
    assert seen["admitted, valid"] >= 25 and seen["admitted, invalid (SpecValid=False)"] >= 5, seen


# ---------------------------------------------------------------------------------------------------------
# Property: local mode accepts exactly what Kubernetes + the operator accept

_WRONG = ["yes", "true", "1", 1, 0, -1, 1.5, 1.0, True, None, [], {}, "", "x" * 300, 2**62, "6h ", "0d", "999999999w"]


def _leaf_paths(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path] if path else []
    for key, child in (node.get("properties") or {}).items():
        out += _leaf_paths(child, (*path, key))
    return out


SPEC_PATHS = _leaf_paths(SPEC_SCHEMA)
NAMES = st.one_of(
    DNS_NAMES,
    st.text(max_size=12),
    st.sampled_from(
        [
            "../escaped",
            "a/b",
            "..",
            ".",
            "-a",
            "a-",
            "A",
            "a..b",
            "a_b",
            "a" * 253,
            "a" * 254,
            12345,
            None,
            "",
            True,
            "x.y.z",
        ]
    ),
)


@st.composite
def policy_objects(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(SPECS)
    for path in draw(st.lists(st.sampled_from(SPEC_PATHS), max_size=3)):
        node: Any = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = draw(st.sampled_from(_WRONG))
    if draw(st.booleans()):
        spec[draw(st.sampled_from(["unknownField", "fine_tune", "Suspend"]))] = draw(st.sampled_from(_WRONG))
    whole: Any = draw(st.sampled_from([spec] * 8 + [None, "foo", [], 1]))
    meta: Any = draw(
        st.one_of(
            st.fixed_dictionaries({"name": NAMES}, optional={"namespace": NAMES}),
            st.sampled_from(["foo", None, [], 7]),
        )
    )
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta, "spec": whole}


# What only the operator checks (the CRD cannot say it in a schema or in CEL): it reports SpecValid=False.
MODEL_ONLY = re.compile(r"^spec\.fineTune\.(schedule|timeZone): ")


def test_local_mode_accepts_exactly_what_the_crd_and_the_operator_accept(tmp_path: Path) -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(obj=policy_objects())
    def check(obj: dict[str, Any]) -> None:
        k8s = api_server_errors(obj)
        path = tmp_path / "policy.yaml"  # through local mode's own entry point: a YAML file, load_policy
        path.write_text(yaml.safe_dump(obj))
        try:
            local.load_policy(path)
            local_error = None
        except ValueError as exc:  # api.PolicyError
            local_error = str(exc).removeprefix(f"{path}: ")
        if k8s:
            seen["rejected by the CRD"] += 1
            assert local_error is not None, f"local mode accepts what the API server rejects: {k8s}"
            return
        if local_error is None:
            seen["accepted by both"] += 1
            return
        # Admitted by the API server: only the operator's own checks may reject it, and the planner says so.
        seen["admitted, rejected by the operator's checks"] += 1
        detail = local_error.removeprefix("invalid spec: ")
        assert all(MODEL_ONLY.match(part) for part in detail.split("; ")), (local_error, obj)
        stored = admitted_spec(obj["spec"] or {})
        assert stored is not None
        p = plan(Policy("p", "default", stored), None, [], RegistryView(), NOW)
        assert _spec_valid(p) == "False"

    check()
    print(f"\nlocal-vs-CRD property: {dict(seen)}")
    assert seen["accepted by both"] >= 10 and seen["rejected by the CRD"] >= 100, seen


# ---------------------------------------------------------------------------------------------------------
# Regressions: durations and cron expressions the planner could not schedule


def test_a_duration_beyond_ten_years_is_rejected_by_the_crd_the_model_and_parse_duration() -> None:
    spec = {"retrieval": {"refreshInterval": "999999999w", "maxStaleness": "999999999w"}}
    assert admitted_spec(spec) is None  # the CRD's CEL rule
    with pytest.raises(ValidationError, match="longer than the maximum"):
        api.PolicySpec.model_validate(spec)
    with pytest.raises(ValueError, match="longer than the maximum"):
        api.parse_duration("999999999w")  # a ValueError, not OverflowError
    assert api.parse_duration(f"{MAX_D}d") == api.MAX_DURATION == timedelta(seconds=api.MAX_DURATION_SECONDS)
    assert admitted_spec({"fineTune": {"window": f"{MAX_D}d"}}) is not None
    assert admitted_spec({"fineTune": {"window": f"{MAX_D * 86400 + 1}s"}}) is None
    assert admitted_spec({"retrieval": {"window": "0d"}}) is None  # zero: now also the CRD's rule
    assert admitted_spec({"fineTune": {"startingDeadlineSeconds": 2**62}}) is None  # timedelta would overflow


def test_the_planner_reports_an_overlong_duration_instead_of_raising() -> None:
    p = plan(Policy("p", "default", {"retrieval": {"refreshInterval": "999999999w", "maxStaleness": "999999999w"}}),
             None, [], RegistryView(), NOW)  # fmt: skip
    cond = next(c for c in p.status.conditions if c.type == ConditionType.SPEC_VALID)
    assert (cond.status.value, cond.reason) == ("False", "InvalidSpec")
    assert "refreshInterval" in cond.message and "maximum" in cond.message


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "* * 31 2 *"])
def test_a_cron_that_never_fires_is_invalid_and_the_planner_reports_it(cron: str) -> None:
    spec = {"fineTune": {"schedule": cron}}
    assert admitted_spec(spec) is not None  # a schema cannot tell; the operator must
    p = plan(Policy("p", "default", spec), None, [], RegistryView(), NOW)
    cond = next(c for c in p.status.conditions if c.type == ConditionType.SPEC_VALID)
    assert (cond.status.value, cond.reason) == ("False", "InvalidSpec") and "never fires" in cond.message
    assert [a.reason for a in p.actions] == ["InvalidSpec"]  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="never fires"):
        api.PolicySpec.model_validate(spec)


def test_the_planner_reports_a_schedule_error_even_for_a_spec_that_skipped_validation() -> None:
    """A PolicySpec built in code (no validators run) that cannot be scheduled: SpecValid=False, no raise."""
    base = api.PolicySpec()
    spec = base.model_copy(update={"fine_tune": base.fine_tune.model_copy(update={"schedule": "0 0 30 2 *"})})
    p = plan(Policy("p", "default", spec), None, [], RegistryView(), NOW)
    cond = next(c for c in p.status.conditions if c.type == ConditionType.SPEC_VALID)
    assert cond.status.value == "False" and "fineTune.schedule" in cond.message
    assert p.wake_at is None


def test_rare_but_real_crons_are_scheduled_across_their_longest_gaps() -> None:
    # Feb 29 skips 2100 (8 years); the fifth Monday of February comes 28 or 40 years apart.
    at = datetime(2099, 3, 1, tzinfo=UTC)
    assert schedule.prev_cron_fire("0 0 29 2 *", at) == datetime(2096, 2, 29, tzinfo=UTC)
    assert schedule.next_cron_fire("0 0 29 2 *", at) == datetime(2104, 2, 29, tzinfo=UTC)
    assert schedule.next_cron_fire("0 0 * 2 1#5", datetime(2073, 1, 1, tzinfo=UTC)).year == 2112
    for cron in ("0 0 29 2 *", "0 0 * 2 1#5"):
        p = plan(Policy("p", "default", {"fineTune": {"schedule": cron}}), None, [], RegistryView(), at)
        assert _spec_valid(p) == "True" and p.status.next_fine_tune_at is not None


def test_random_cron_fields_are_rejected_by_the_crd_and_the_model() -> None:
    # croniter's R draws a new minute on every evaluation: run ids, and so launches, would change each time.
    for cron in ("R * * * *", "0 R * * *", "0,R 3 * * *", "R(0-5) 3 * * *"):
        assert admitted_spec({"fineTune": {"schedule": cron}}) is None, cron
        with pytest.raises(ValidationError, match="random"):
            api.PolicySpec.model_validate({"fineTune": {"schedule": cron}})
    assert admitted_spec({"fineTune": {"schedule": "0 3 * mar,apr thu"}}) is not None  # names are not fields


@pytest.mark.parametrize("zone", ["America", "Europe", "../zoneinfo/UTC", "/etc/localtime"])
def test_a_time_zone_that_is_a_directory_or_a_path_is_invalid_not_a_crash(zone: str) -> None:
    p = plan(Policy("p", "d", {"fineTune": {"timeZone": zone}}), None, [], RegistryView(), NOW)
    assert _spec_valid(p) == "False"
    with pytest.raises(ValidationError, match="unknown time zone"):
        api.PolicySpec.model_validate({"fineTune": {"timeZone": zone}})


def test_duplicate_env_names_are_rejected_like_the_crd_list_map() -> None:
    spec = {"runtime": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}}
    with pytest.raises(ValidationError, match="duplicate name"):
        api.PolicySpec.model_validate(spec)


# ---------------------------------------------------------------------------------------------------------
# Regressions: `recupdate local -f` on bad input: one line on stderr, exit 2, nothing written or started

GOOD = """\
apiVersion: recupdate.io/v1alpha1
kind: RecommenderUpdatePolicy
metadata: {name: lm}
spec: {}
"""
BAD_FILES = {
    "escaping name": GOOD.replace("{name: lm}", "{name: ../escaped}"),
    "slash in name": GOOD.replace("{name: lm}", "{name: a/b}"),
    "uppercase name": GOOD.replace("{name: lm}", "{name: Movies}"),
    "numeric name": GOOD.replace("{name: lm}", "{name: 12345}"),
    "metadata a string": GOOD.replace("metadata: {name: lm}", "metadata: foo"),
    "no name": GOOD.replace("{name: lm}", "{}"),
    "bad namespace": GOOD.replace("{name: lm}", "{name: lm, namespace: ../x}"),
    "suspend 'yes'": GOOD.replace("spec: {}", "spec: {suspend: 'yes'}"),
    "integer as string": GOOD.replace("spec: {}", "spec: {fineTune: {backoffLimit: '3'}}"),
    "float for integer": GOOD.replace("spec: {}", "spec: {fineTune: {backoffLimit: 1.5}}"),
    "snake_case field": GOOD.replace("spec: {}", "spec: {fine_tune: {}}"),
    "overlong duration": GOOD.replace("spec: {}", "spec: {retrieval: {refreshInterval: 999999999w}}"),
    "never-firing cron": GOOD.replace("spec: {}", 'spec: {fineTune: {schedule: "0 0 30 2 *"}}'),
    "NaN": GOOD.replace("spec: {}", "spec: {gates: {minRecall: .nan}}"),
    "syntax error": GOOD + "spec: [1\n",
    "tab indentation": GOOD.replace("spec: {}", "spec:\n\tsuspend: true"),
    "duplicate key": GOOD + "spec: {suspend: true}\n",
    "two documents": GOOD + "---\n" + GOOD,
    "a list": "- " + GOOD.replace("\n", "\n  "),
    "a scalar": "just text\n",
    "empty file": "",
    "wrong kind": GOOD.replace("kind: RecommenderUpdatePolicy", "kind: Deployment"),
    "unknown root field": GOOD + "extra: 1\n",
}


def _recupdate_local(tmp_path: Path, policy: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    cmd = [sys.executable, "-m", "recupdate_operator.cli", "local", "-f", str(path), "--workdir",
           str(tmp_path / "w" / "work"), "--simulate", "1d", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_policy_rejects_bad_input_with_one_clear_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BAD_FILES[case])
    with pytest.raises(ValueError) as err:  # api.PolicyError
        local.load_policy(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message


def test_load_policy_reads_a_good_file_and_keeps_dates_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.replace("{name: lm}", "{name: lm.v2, namespace: recs, labels: {since: 2024-01-01}}"))
    name, namespace, spec, doc = local.load_policy(path)
    assert (name, namespace, spec) == ("lm.v2", "recs", api.PolicySpec())
    assert doc["metadata"]["labels"]["since"] == "2024-01-01"  # as kubectl sends it: a string


@pytest.mark.parametrize("case", ["escaping name", "numeric name", "metadata a string", "suspend 'yes'",
                                  "tab indentation", "two documents", "syntax error"])  # fmt: skip
def test_recupdate_local_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    result = _recupdate_local(tmp_path, BAD_FILES[case])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recupdate local: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob("*.status.json"))  # nothing above or in it


def test_recupdate_local_with_an_unreachable_store_exits_2_with_one_line(tmp_path: Path) -> None:
    with socketless_port() as port:
        dsn = f"postgresql://nobody:secret@127.0.0.1:{port}/none?connect_timeout=3"
        result = _recupdate_local(tmp_path, GOOD, env={"RECUPDATE_STORE_DSN": dsn})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if "Warning" not in line and line.strip()]
    assert lines[-1].startswith("recupdate local: cannot open the store (RECUPDATE_STORE_DSN)"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "secret" not in result.stderr


class socketless_port:
    """A local TCP port nothing listens on (bound, never listening, for the duration)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_bad_flag_fails_before_anything_starts(tmp_path: Path) -> None:
    result = _recupdate_local(tmp_path, GOOD, "--tick", "999999999w")
    assert result.returncode == 2 and "--tick" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------
# Regressions: Ctrl-C stops the jobs `recupdate local` started


# A job that starts a grandchild in its own process group, like a data loader worker; the grandchild ignores
# SIGTERM, and so does the job itself when `stubborn` (a stuck training loop).
def _job_script(child_pid_file: Path, stubborn: bool) -> list[str]:
    code = textwrap.dedent(
        f"""
        import signal, subprocess, sys, time
        if {stubborn}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        time.sleep(300)
        """
    )
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (dead, waiting for its parent to reap it)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_backend_shutdown_stops_each_job_with_its_whole_process_group(tmp_path: Path) -> None:
    def command(launch: LaunchRun, config: Path) -> list[str]:
        return _job_script(tmp_path / f"{launch.run_id}.child", stubborn=True)

    backend = LocalBackend("postgresql:///x", tmp_path, command=command, serve=False)
    backend._stored_runs = lambda policy: []  # type: ignore[method-assign]  # no store: not what this tests
    ref = PolicyRef("p", "default", "uid", api.PolicySpec())
    for run_id in ("p-ft-202501010000", "p-rf-202501010000"):
        kind = RunKind.FINETUNE if "-ft-" in run_id else RunKind.REFRESH
        backend.launch_run(ref, LaunchRun(kind, run_id, run_id, {}, 1, NOW))
    pids = {name: (job.proc.pid, int(_wait_for(tmp_path / f"{name}.child"))) for name, job in backend.jobs.items()}
    started = time.monotonic()
    assert sorted(backend.shutdown(timeout=1)) == sorted(pids)
    assert time.monotonic() - started < 10  # one shared timeout, then SIGKILL
    # SIGKILL is delivered asynchronously: give the group's processes a moment to be gone.
    deadline = time.monotonic() + 5
    while any(_alive(p) for pair in pids.values() for p in pair) and time.monotonic() < deadline:
        time.sleep(0.05)
    for job_pid, child_pid in pids.values():
        assert not _alive(job_pid) and not _alive(child_pid)
    assert not backend.running() and backend.shutdown() == []


def test_deleting_a_replaced_job_stops_its_children_too(tmp_path: Path) -> None:
    def command(launch: LaunchRun, config: Path) -> list[str]:
        return _job_script(tmp_path / "child", stubborn=False)

    backend = LocalBackend("postgresql:///x", tmp_path, command=command, serve=False)
    backend._stored_runs = lambda policy: []  # type: ignore[method-assign]
    ref = PolicyRef("p", "default", "uid", api.PolicySpec())
    backend.launch_run(ref, LaunchRun(RunKind.FINETUNE, "p-ft-1", "p-ft-1", {}, 1, NOW))
    job_pid, child_pid = backend.jobs["p-ft-1"].proc.pid, int(_wait_for(tmp_path / "child"))
    started = time.monotonic()
    backend.delete_job(ref, "p-ft-1")  # the job exits on SIGTERM; its child ignores it and is killed after
    assert not _alive(job_pid)
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the job's child outlived the deleted job"
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_on_recupdate_local_leaves_no_job_running(tmp_path: Path) -> None:
    """The real thing: `recupdate local` launches its initial fine-tune; SIGINT; the job is gone after."""
    policy = tmp_path / "policy.yaml"
    # Many epochs: the initial fine-tune must still run when the signal comes (a tiny model trains in seconds).
    policy.write_text(GOOD.replace("spec: {}", "spec: {fineTune: {hyperparameters: {epochs: 1000}}}"))
    # Not under pytest's tmp dir: pytest keeps it 0700, and PostgreSQL runs as the `pgserver` user (as in
    # tests/fixtures/store.py).
    work = Path(tempfile.mkdtemp(prefix="recupdate-test-ctrl-c-")) / "w"
    cmd = [sys.executable, "-m", "recupdate_operator.cli", "local", "-f", str(policy), "--workdir", str(work),
           "--simulate", "30d", "--interactions", "3000", "--executor", "inline", "--model-size", "tiny",
           "--cpus", "1", "--no-status-line", "--port", str(free_port())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    job_pid = None
    try:
        deadline = time.monotonic() + 240
        while job_pid is None and time.monotonic() < deadline and proc.poll() is None:
            job_pid = _job_process(work)
            time.sleep(0.5)
        if job_pid is None:
            out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "still running")
            raise AssertionError(f"no fine-tune job started (exit {proc.returncode}): {out[-2000:]} {err[-3000:]}")
        time.sleep(5)  # past its start-up: training
        assert _alive(job_pid), "the fine-tune job ended before the signal"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 10
        while _alive(job_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(job_pid), "the fine-tune job outlived recupdate local"
        assert "stopped 1 running job(s)" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if job_pid is not None and _alive(job_pid):  # an orphan (the bug): do not leave it running
            os.killpg(job_pid, signal.SIGKILL)
        import pgserver

        if (work / "pg").exists():
            pgserver.get_server(str((work / "pg").absolute()), cleanup_mode="stop").cleanup()
        shutil.rmtree(work.parent, ignore_errors=True)


def _job_process(work: Path) -> int | None:
    """The pid of a running `python -m recupdate_workloads.jobs.finetune` whose config is in `work`."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"recupdate_workloads.jobs.finetune" in argv and any(str(work).encode() in a for a in argv):
            return int(proc_dir.name)
    return None


def test_readme_says_the_store_outlives_ctrl_c_and_how_to_stop_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "keeps running on purpose" in readme
    assert "pgserver.get_server('.recupdate/local/pg', cleanup_mode='stop').cleanup()" in readme


@pytest.mark.parametrize("name", ["demo-policy.yaml", "gpu-policy.yaml", "local-demo-policy.yaml"])
def test_every_example_policy_loads_in_local_mode_and_passes_the_crd(name: str) -> None:
    path = ROOT / "manifests" / "examples" / name
    _, _, spec, doc = local.load_policy(path)
    assert api_server_errors(doc) == []
    assert spec == api.PolicySpec.model_validate(doc["spec"])


def test_the_invalid_example_is_rejected_in_local_mode_too() -> None:
    with pytest.raises(ValueError, match=r"spec\.fineTune\.(schedule|window)"):
        local.load_policy(ROOT / "manifests" / "examples" / "invalid-policy.yaml")


@pytest.mark.parametrize("name", ["lm", "a.b-c", "a" * 253, "x." * 126 + "y"])
def test_any_valid_name_gives_a_status_file_inside_the_workdir(tmp_path: Path, name: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.replace("{name: lm}", f"{{name: {name}}}"))
    parser = argparse.ArgumentParser()
    local.configure(parser)
    run = local.LocalRun(parser.parse_args(["-f", str(path), "--workdir", str(tmp_path / "w")]))
    assert run.status_file.parent == (tmp_path / "w").absolute()
    assert len(run.status_file.name) <= 255 and run.status_file.name.endswith(".status.json")
    run.status_file.write_text("{}")  # the file system takes the name
