"""Secrets never leak (issue 15), the operator end to end: a store DSN whose password libpq quotes back in its
error never reaches the policy's conditions, its Events, the operator's log or its metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import pytest
import yaml

from fixtures.operator_world import World
from recupdate_operator import metrics

MakeWorld = Callable[..., Awaitable[World]]


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("postgresql://admin:S3cret PW@127.0.0.1:1/db", "S3cret PW"),  # libpq: unexpected spaces found in "S3cret PW"
        ("host=127.0.0.1 port=1 user=admin password=Op3rator Pw dbname=db", "Op3rator Pw"),  # missing "=" after "Pw"
    ],
)
async def test_default_dsn_password_never_shows(
    make_world: MakeWorld, caplog: pytest.LogCaptureFixture, dsn: str, password: str
) -> None:
    caplog.set_level(logging.DEBUG)
    w = await make_world(secret=False)
    async with w.operator(default_dsn=dsn):  # the operator's own RECUPDATE_STORE_DSN
        await w.create_policy("recs", {**w.spec(), "store": {"schema": w.schema}})  # no secretRef: the default
        degraded = await w.wait_condition("recs", "Degraded", "True", "RegistryUnavailable")
        await w.wait_events("RegistryUnavailable")
    conditions = {c["type"]: c for c in w.policy("recs")["status"]["conditions"]}
    assert {"Ready", "Fresh", "Degraded"} <= set(conditions)
    assert "cannot connect to the store" in degraded["message"]  # the error itself is reported...
    shown = json.dumps([w.policy("recs"), w.events()]) + yaml.safe_dump(w.events()) + caplog.text
    shown += str(metrics.REGISTRY.collect())
    assert password not in shown
    for piece in password.split():  # ...without any of the password: "S3cret" anywhere, "PW" as libpq quotes it
        assert piece not in shown if len(piece) >= 4 else f'"{piece}"' not in shown, piece
