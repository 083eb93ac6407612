"""api.py: defaults, camelCase aliases, validation of durations, cron, time zones and cross-field rules."""

from datetime import timedelta
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from recupdate_operator import api


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("6h", timedelta(hours=6)),
        ("90d", timedelta(days=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert api.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "6", "h", "6x", "-1d", "1.5h", "6h ", "1 d"])
def test_parse_duration_rejects(text: str) -> None:
    if text == "6h ":  # surrounding blanks are tolerated by the parser, not by the schema pattern
        assert api.parse_duration(text) == timedelta(hours=6)
        return
    with pytest.raises(ValueError):
        api.parse_duration(text)


def test_defaults_round_trip_in_camel_case() -> None:
    spec = api.PolicySpec()
    wire = spec.model_dump(mode="json", by_alias=True)
    assert wire["fineTune"]["concurrencyPolicy"] == "Forbid"
    assert wire["fineTune"]["hyperparameters"]["learningRate"] == 2e-4
    assert wire["retrieval"]["refreshInterval"] == "6h"
    assert wire["gates"] == {
        "minExactMatch": 0.9,
        "minRecall": 0.015,
        "maxRegression": 0.002,
        "promotion": "Automatic",
        "analysis": None,
    }
    assert wire["store"]["schema"] == ""
    assert wire["data"]["contextLength"] == 2
    assert api.PolicySpec.model_validate(wire) == spec
    # Python names work too (populate_by_name).
    assert api.StoreSpec.model_validate({"db_schema": "x"}).db_schema == "x"
    assert api.StoreSpec(schema="x").db_schema == "x"


@pytest.mark.parametrize(
    "raw",
    [
        {"fineTune": {"schedule": "61 * * * *"}},
        {"fineTune": {"schedule": "* * * * * *"}},  # six fields (seconds) are not CronJob syntax
        {"fineTune": {"timeZone": "Mars/Olympus"}},
        {"fineTune": {"concurrencyPolicy": "Sometimes"}},
        {"fineTune": {"window": "365 days"}},
        {"fineTune": {"resources": {"memoryPerWorker": "lots"}}},
        {"retrieval": {"window": "0d"}},
        {"retrieval": {"refreshInterval": "30s", "maxStaleness": "1h"}},
        {"retrieval": {"refreshInterval": "6h", "maxStaleness": "5h"}},
        {"retrieval": {"scoring": "random"}},
        {"retrieval": {"blend": 1.5}},
        {"retrieval": {"blend": -0.1}},
        {"gates": {"minExactMatch": 1.5}},
        {"gates": {"promotion": "Sometimes"}},
        {"store": {"schema": "Bad-Name"}},
        {"store": {"secretRef": {"key": "dsn"}}},
        {"runtime": {"clusterSelector": {}}},
        {"unknownField": True},
        {"model": {"lora": {"rank": 8}}},
    ],
)
def test_invalid_specs(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        api.PolicySpec.model_validate(raw)


def test_valid_spec() -> None:
    spec = api.PolicySpec.model_validate(
        {
            "fineTune": {"schedule": "@monthly", "timeZone": "Europe/Berlin", "startingDeadlineSeconds": 600},
            "retrieval": {"refreshInterval": "1h", "maxStaleness": "1h", "scoring": "trend"},
            "store": {"secretRef": {"name": "pg"}, "schema": "movies"},
            "runtime": {"clusterSelector": {"ray.io/cluster": "shared"}, "env": [{"name": "A", "value": "1"}]},
        }
    )
    assert spec.store.secret_ref is not None and spec.store.secret_ref.key == "dsn"
    assert spec.fine_tune.concurrency_policy == api.ConcurrencyPolicy.FORBID


@pytest.mark.parametrize(
    ("name", "expected"),
    # Names that '-' -> '_' alone does not make an identifier get a leading '_' and a hash (collisions).
    [("movies", "movies"), ("my-policy", "my_policy"), ("9lives", "_9lives_bc867356"), ("A.b", "_a_b_4ff54a77")],
)
def test_schema_name(name: str, expected: str) -> None:
    assert api.schema_name(name) == expected
    assert api.schema_name(name, api.PolicySpec.model_validate({"store": {"schema": "fixed"}})) == "fixed"


def test_status_tolerates_unknown_fields() -> None:
    status = api.PolicyStatus.model_validate({"activeRelease": "r1", "somethingNew": 1})
    assert status.active_release == "r1"


def test_every_field_has_a_description() -> None:
    models: list[type[BaseModel]] = [api.PolicySpec, api.PolicyStatus]
    seen: set[type[BaseModel]] = set()
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            models.extend(_model_args(info.annotation))
    assert len(seen) > 15


def _model_args(annotation: Any) -> list[type[BaseModel]]:
    found = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            found.append(a)
        stack.extend(get_args(a))
    return found
