"""Issue 15, defect 11, on the operator: kopf against the emulated API with the real store. A policy whose store
schema another policy owns gets SpecValid=False naming the owner, and never launches a RayJob; the owner
keeps working; a re-created policy adopts its own schema. (Naming, store, job and property tests:
tests/test_hardening_owner.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kopf
import psycopg
import pytest
from psycopg import sql

from fixtures.operator_world import NS, World
from k8s.kopf_runner import fast_settings, run_kopf
from recupdate_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from recupdate_operator.controller import Controller, ControllerConfig, register
from recupdate_workloads.store.db import connect, migrate  # tests only: what the job does first

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(120)]
MakeWorld = Callable[..., Awaitable[World]]
DAY = 86400.0
_n = itertools.count()


@contextlib.asynccontextmanager
async def _operator(w: World, namespaces: tuple[str, ...], **config: Any) -> AsyncIterator[Controller]:
    """World.operator, watching several namespaces."""
    api_client = w.cluster.kubernetes_client()
    controller = Controller(
        api_client=api_client, clock=w.now, config=ControllerConfig(resync_seconds=3600.0, **config)
    )
    settings = fast_settings()
    settings.watching.inactivity_timeout = 365 * 86400.0  # see World.operator
    try:
        async with run_kopf(
            w.cluster, registry=register(kopf.OperatorRegistry(), controller), settings=settings, namespaces=namespaces
        ):
            yield controller
    finally:
        await asyncio.to_thread(api_client.close)


def _spec(**store: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "fineTune": {"schedule": "0 3 * * 1"},
        "retrieval": {"refreshInterval": "1d", "maxStaleness": "2d"},
    }
    if store:
        spec["store"] = store
    return spec


async def _create(w: World, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return await w.cluster.create(
        {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


def _policy(w: World, namespace: str, name: str) -> dict[str, Any]:
    return w.cluster.get(GROUP, VERSION, PLURAL, namespace, name) or {}


def _condition(w: World, namespace: str, name: str, ctype: str) -> dict[str, Any]:
    conditions = (_policy(w, namespace, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == ctype), {})


def _jobs(w: World, namespace: str | None = None) -> list[dict[str, Any]]:
    return w.cluster.objects("ray.io", "v1", "rayjobs", namespace)


def _config(job: dict[str, Any]) -> dict[str, Any]:
    args = shlex.split(job["spec"]["entrypoint"])
    return dict(json.loads(args[args.index("--config") + 1]))


def _owner(dsn: str, schema: str) -> tuple[str, str, str] | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT namespace, name, uid FROM {}").format(sql.Identifier(schema, "policy_owner"))
        ).fetchone()
    return (row[0], row[1], row[2]) if row else None


def _drop(dsn: str, *schemas: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


async def _refused(w: World, namespace: str, name: str, owner: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = _condition(w, namespace, name, "SpecValid")
        return c if c.get("status") == "False" and c.get("reason") == "SchemaInUse" else None

    cond: dict[str, Any] = await w.wait(check)
    assert f"belongs to policy {owner}" in cond["message"] and "spec.store.schema" in cond["message"]
    return cond


async def test_the_same_name_in_another_namespace_is_refused(make_world: MakeWorld) -> None:
    # Bullet 1: default/<n> and team-a/<n> both map to schema <n> (the default: no spec.store.schema).
    w = await make_world(secret=False)
    name = f"own-{os.getpid()}-{next(_n)}"
    schema = name.replace("-", "_")
    await w.cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    try:
        async with _operator(w, (NS, "team-a"), default_dsn=w.dsn):
            first = await _create(w, NS, name, _spec())
            (job,) = await w.wait(lambda: _jobs(w, NS) or None)
            assert _owner(w.dsn, schema) == (NS, name, first["metadata"]["uid"])  # claimed before the launch
            config = _config(job)
            assert (config["storeSchema"], config["namespace"], config["policy"]) == (schema, NS, name)
            assert config["policyUid"] == first["metadata"]["uid"]

            await _create(w, "team-a", name, _spec())
            cond = await _refused(w, "team-a", name, f"{NS}/{name} (uid {first['metadata']['uid']})")
            assert repr(schema) in cond["message"]
            events = await w.wait(lambda: [e for e in w.cluster.events("team-a") if e.get("reason") == "SchemaInUse"])
            assert [e["type"] for e in events] == ["Warning"]

            # The owner keeps working: its job registers a release, which is promoted and served.
            with connect(w.dsn) as conn:
                migrate(conn, schema)  # what the job does first
            owner_world = World(w.cluster, w.dsn, schema, w.now())
            try:
                await owner_world.succeed(job["metadata"]["name"])
                await w.wait_condition(name, "Ready", "True", "Serving")
            finally:
                owner_world.close()
            await asyncio.sleep(2 * DAY)  # resyncs and a refresh for the owner; nothing at all for the other
            assert _jobs(w, "team-a") == []
            assert w.cluster.objects("ray.io", "v1", "rayservices", "team-a") == []
            assert not (_policy(w, "team-a", name).get("status") or {}).get("activeRelease")
            assert _owner(w.dsn, schema) == (NS, name, first["metadata"]["uid"])
            assert len([e for e in w.cluster.events("team-a") if e.get("reason") == "SchemaInUse"]) == 1
    finally:
        _drop(w.dsn, schema)


async def test_a_second_policy_on_an_explicit_schema_never_publishes_over_the_first(make_world: MakeWorld) -> None:
    # Bullet 4: nothing recorded the owner, so one policy's refresh could publish over another's.
    w = await make_world()
    async with w.operator():
        await w.create_policy("recs")
        (job,) = await w.wait_jobs(1)
        await w.succeed(job["metadata"]["name"])
        await w.wait_condition("recs", "Ready", "True", "Serving")

        await w.create_policy("intruder")  # the same spec, so the same spec.store.schema
        await _refused(w, NS, "intruder", "default/recs")
        await asyncio.sleep(DAY + 60)  # the owner's daily refresh is due
        names = w.job_names()
        assert all(n.startswith("recs-") for n in names) and any("-rf-" in n for n in names), names
        assert not w.status("intruder").get("activeRelease") and not w.status("intruder").get("activeRuns")
        assert all(r.startswith("recs-") for r in w.runs())
        svc = w.rayservice()
        assert svc is not None and svc["metadata"]["ownerReferences"][0]["name"] == "recs"


async def test_a_recreated_policy_adopts_its_schema_and_others_stay_refused(make_world: MakeWorld) -> None:
    w = await make_world()
    async with w.operator():
        old = await w.create_policy("recs")
        await w.wait_jobs(1)
        assert _owner(w.dsn, w.schema) == (NS, "recs", old["metadata"]["uid"])
        await w.cluster.delete(API_VERSION, KIND, "recs", namespace=NS)
        await w.wait(lambda: not w.policy("recs") and not w.jobs())  # the RayJob goes with its owner

        # The schema's data outlives the policy, and so does its owner: another policy is still refused.
        await w.create_policy("other")
        await _refused(w, NS, "other", f"default/recs (uid {old['metadata']['uid']})")

        await asyncio.sleep(120)
        new = await w.create_policy("recs")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        await w.wait_condition("recs", "SpecValid", "True")
        await w.wait_events("SchemaAdopted")
        (job,) = await w.wait(lambda: [j for j in w.jobs() if j["metadata"]["name"].startswith("recs-")] or None)
        assert _config(job)["policyUid"] == new["metadata"]["uid"]
        assert _owner(w.dsn, w.schema) == (NS, "recs", new["metadata"]["uid"])
        assert all(j["metadata"]["name"].startswith("recs-") for j in w.jobs())


async def test_names_that_collided_get_schemas_of_their_own(make_world: MakeWorld) -> None:
    # Bullets 2 and 3: own-<n> and own.<n>, and two names alike in their first 63 characters, each pair mapped
    # to one schema. Now each policy gets a schema of its own, and owns it. (own.<n> is in another namespace:
    # in one namespace its RayJob names would be own-<n>'s, which the operator refuses to touch.)
    w = await make_world(secret=False)
    n = f"{os.getpid()}-{next(_n)}"
    prefix = (f"own-{n}-" + "x" * 63)[:63]
    policies = [(NS, f"own-{n}"), ("team-a", f"own.{n}"), (NS, prefix + "-movies"), (NS, prefix + "-books")]
    schemas: list[str] = []
    await w.cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    try:
        async with _operator(w, (NS, "team-a"), default_dsn=w.dsn):
            for namespace, name in policies:
                await _create(w, namespace, name, _spec())
            jobs = await w.wait(lambda: (j := _jobs(w)) and len(j) == len(policies) and j)
            by_policy = {(_config(j)["namespace"], _config(j)["policy"]): _config(j)["storeSchema"] for j in jobs}
            schemas = list(by_policy.values())
            assert sorted(by_policy) == sorted(policies)
            assert len(set(schemas)) == len(policies), by_policy
            for (namespace, name), schema in by_policy.items():
                assert _owner(w.dsn, schema)[:2] == (namespace, name)  # type: ignore[index]
                await w.wait(lambda ns=namespace, n=name: _condition(w, ns, n, "SpecValid").get("status") == "True")
    finally:
        _drop(w.dsn, *schemas)
