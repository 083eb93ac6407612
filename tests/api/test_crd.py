"""crd.py: the committed CRD is the generated one, structural, documented and valid."""

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from recupdate_operator import api
from recupdate_operator.generate import crd

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "manifests" / "crd" / crd.FILENAME


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{path}[{i}]")
    return out


def test_committed_crd_is_up_to_date() -> None:
    assert COMMITTED.exists(), "run `recupdate crd` to generate the CRD"
    assert COMMITTED.read_text() == crd.render(), "manifests/crd is stale: run `recupdate crd`"


def test_rendering_is_deterministic() -> None:
    assert crd.render() == crd.render()
    assert yaml.safe_load(crd.render()) == crd.build_crd()


def test_no_ref_anyof_allof_or_titles() -> None:
    for path, node in _walk(_schema()):
        if isinstance(node, dict):
            for key in ("$ref", "$defs", "anyOf", "allOf", "oneOf", "title"):
                assert key not in node, f"{key} at {path}"
            assert not ("properties" in node and "additionalProperties" in node), path


def _properties(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, child in node.get("properties", {}).items():
        out.append((f"{path}.{name}", child))
        out += _properties(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _properties(node["items"], f"{path}[]")
    return out


def test_every_property_is_typed_and_described() -> None:
    props = _properties(_schema())
    assert len(props) > 80
    for path, node in props:
        assert node.get("description"), f"{path} has no description"
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path


def test_constraints_survive() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    gates = spec["gates"]["properties"]
    assert gates["minExactMatch"] == {**gates["minExactMatch"], "default": 0.9, "minimum": 0.0, "maximum": 1.0}
    assert gates["promotion"]["enum"] == ["Automatic", "Manual"]
    ft = spec["fineTune"]["properties"]
    assert ft["schedule"]["pattern"] == api.CRON_PATTERN
    assert ft["window"]["pattern"] == api.DURATION_PATTERN
    assert ft["concurrencyPolicy"]["enum"] == ["Forbid", "Replace", "Allow"]
    assert ft["startingDeadlineSeconds"]["nullable"] is True
    assert "default" not in ft["startingDeadlineSeconds"]
    # pydantic's numeric exclusive bounds become OpenAPI v3 booleans
    cpus = ft["resources"]["properties"]["cpusPerWorker"]
    assert cpus["exclusiveMinimum"] is True and cpus["minimum"] == 0.0
    # nested objects default to {} so the API server fills their defaults in, as pydantic does
    assert spec["fineTune"]["default"] == {}
    assert spec["store"]["properties"]["secretRef"].get("nullable") is True
    assert "default" not in spec["store"]["properties"]["secretRef"]
    assert spec["store"]["properties"]["schema"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"


def test_defaults_agree_with_pydantic() -> None:
    """Defaulting by the API server and by pydantic give the same spec."""

    def apply_defaults(node: dict[str, Any], value: Any) -> Any:
        if not isinstance(value, dict) or "properties" not in node:
            return value
        out = dict(value)
        for name, child in node["properties"].items():
            if name not in out and "default" in child:
                out[name] = child["default"]
            if name in out:
                out[name] = apply_defaults(child, out[name])
        return out

    spec_schema = _schema()["properties"]["spec"]
    defaulted = apply_defaults(spec_schema, {})
    assert defaulted == api.PolicySpec().model_dump(mode="json", by_alias=True, exclude_none=True)


def test_names_columns_and_subresources() -> None:
    d = crd.build_crd()
    assert d["metadata"]["name"] == "recommenderupdatepolicies.recupdate.io"
    names = d["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (api.KIND, api.PLURAL, ["rup"])
    assert d["spec"]["scope"] == "Namespaced"
    version = d["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Fresh"]["jsonPath"] == '.status.conditions[?(@.type=="Fresh")].status'
    assert columns["Active"]["jsonPath"] == ".status.activeRelease"
    assert columns["Last Fine-Tune"]["type"] == "date"
    assert columns["Last Refresh"]["jsonPath"] == ".status.lastRefresh.finishedAt"
    assert columns["Age"]["jsonPath"] == ".metadata.creationTimestamp"
    assert columns["Drift"] == {
        "name": "Drift",
        "type": "number",
        "jsonPath": ".status.lastDrift.excess",
        "priority": 1,
    }
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crd.build_crd(), "1.33", strict=True)


CEL_CASES = [
    ({"refreshInterval": "6h", "maxStaleness": "24h"}, [True, True]),
    ({"refreshInterval": "6h", "maxStaleness": "5h"}, [True, False]),
    ({"refreshInterval": "30s", "maxStaleness": "1h"}, [False, True]),
    ({"refreshInterval": "90m", "maxStaleness": "1h"}, [True, False]),
    ({"refreshInterval": "1d", "maxStaleness": "1w"}, [True, True]),
]


@pytest.mark.parametrize(("retrieval", "expected"), CEL_CASES)
def test_cel_rules_agree_with_pydantic(retrieval: dict[str, str], expected: list[bool]) -> None:
    valid = all(expected)
    try:
        api.RetrievalSpec.model_validate(retrieval)
        assert valid
    except ValueError:
        assert not valid
    celpy = pytest.importorskip("celpy")  # optional: cel-python evaluates the rules themselves
    from celpy import celtypes

    def substring(s: Any, start: Any, end: Any = None) -> Any:  # a Kubernetes strings-library function
        return celtypes.StringType(s[int(start) :] if end is None else s[int(start) : int(end)])

    env = celpy.Environment()
    rules = _schema()["properties"]["spec"]["properties"]["retrieval"]["x-kubernetes-validations"]
    results = []
    for rule in rules:
        program = env.program(env.compile(rule["rule"]), functions={"substring": substring})
        results.append(bool(program.evaluate(celpy.json_to_cel({"self": retrieval}))))
    assert results == expected


ON_DRIFT_CASES = [
    ({"minInterval": "1d", "maxInterval": "30d"}, True),
    ({"minInterval": "7d", "maxInterval": "1w"}, True),
    ({"minInterval": "2w", "maxInterval": "13d"}, False),
    ({"minInterval": "90m", "maxInterval": "1h"}, False),
    ({"minInterval": "1d"}, True),
]


@pytest.mark.parametrize(("on_drift", "valid"), ON_DRIFT_CASES)
def test_on_drift_cel_rule_agrees_with_pydantic(on_drift: dict[str, str], valid: bool) -> None:
    try:
        api.OnDriftSpec.model_validate(on_drift)
        assert valid
    except ValueError:
        assert not valid
    celpy = pytest.importorskip("celpy")
    from celpy import celtypes

    def substring(s: Any, start: Any, end: Any = None) -> Any:
        return celtypes.StringType(s[int(start) :] if end is None else s[int(start) : int(end)])

    node = _schema()["properties"]["spec"]["properties"]["fineTune"]["properties"]["onDrift"]
    (rule,) = node["x-kubernetes-validations"]
    env = celpy.Environment()
    program = env.program(env.compile(rule["rule"]), functions={"substring": substring})
    assert bool(program.evaluate(celpy.json_to_cel({"self": on_drift}))) == valid


def test_cli_write_and_check(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    crd.configure(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--check"])
    assert crd.run(args) == 1  # nothing there yet
    assert crd.run(parser.parse_args(["--out", str(tmp_path)])) == 0
    assert (tmp_path / crd.FILENAME).read_text() == crd.render()
    assert crd.run(args) == 0
    (tmp_path / crd.FILENAME).write_text("stale")
    assert crd.run(args) == 1
