"""A canary in the same replica (docs/analysis.md): a stable hash of user_id sends trafficPercent of users to the
candidate's table; both tables live in one RecommenderService; each response says which release served it.
In-process over the demo store in the embedded PostgreSQL, as tests/serving/test_app.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from recupdate_workloads.contract.analysis import in_canary
from recupdate_workloads.contract.serve import UserConfig
from recupdate_workloads.serving.app import make_api
from recupdate_workloads.serving.demo_store import MISSING_PAIRS, DemoStore, build_demo_store
from recupdate_workloads.serving.release import Loaded, load_release
from recupdate_workloads.serving.service import RecommenderService
from recupdate_workloads.store.db import Store, connect, migrate

HITS = [(a, b) for a in range(8) for b in range(8) if a != b and (a, b) not in MISSING_PAIRS]
USERS = [f"user-{i}" for i in range(200)]


@pytest.fixture(scope="module")
def demo(pg_dsn: str) -> Iterator[DemoStore]:
    schema = f"serving_canary_{os.getpid()}"
    conn = connect(pg_dsn)
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    migrate(conn, schema)
    store = Store(dsn=pg_dsn, schema=schema, conn=conn)
    yield build_demo_store(store)
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    store.close()


def with_canary(demo: DemoStore, percent: float, primary: str = "rel-a", canary: str = "rel-b") -> dict[str, Any]:
    c = demo.releases[canary]
    return {
        **demo.releases[primary],
        "canary": {
            "release_id": canary,
            "adapter_uri": c["adapter_uri"],
            "table_version": c["table_version"],
            "percent": percent,
        },
    }


@pytest.fixture
async def client(demo: DemoStore, pg_dsn: str) -> AsyncIterator[tuple[httpx.AsyncClient, RecommenderService, list]]:
    env = {"RECUPDATE_STORE_DSN": pg_dsn}
    loads: list[str] = []

    def loader(cfg: UserConfig) -> Loaded:
        loads.append(cfg.release_id)
        return load_release(cfg, env)

    svc = RecommenderService(loader=loader, retry_delays_s=())
    assert await svc.reconfigure(demo.releases["rel-a"]), svc.last_error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        yield c, svc, loads
    svc.shutdown()


async def _rec(c: httpx.AsyncClient, user: str | None, pair: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    body: dict[str, Any] = {"recent_clusters": list(pair), "n": 2}
    if user is not None:
        body["user_id"] = user
    r = await c.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_hash_of_the_user_picks_the_release(client: tuple, demo: DemoStore) -> None:
    c, svc, loads = client
    assert await svc.reconfigure(with_canary(demo, 30)), svc.last_error
    assert loads == ["rel-a", "rel-b"]  # the served release kept, the candidate loaded beside it
    info = (await c.get("/release")).json()
    assert info["release_id"] == "rel-a" and info["canary"]["release_id"] == "rel-b"
    assert info["canary"]["percent"] == 30
    served = {u: (await _rec(c, u))["release"] for u in USERS}
    assert served == {u: "rel-b" if in_canary(u, 30) else "rel-a" for u in USERS}
    assert 0.2 < list(served.values()).count("rel-b") / len(USERS) < 0.4
    # stable: the same user, the same release, whatever the context
    for u in USERS[:20]:
        assert {(await _rec(c, u, pair))["release"] for pair in HITS[:5]} == {served[u]}
    # without a user id: the served release
    assert (await _rec(c, None))["release"] == "rel-a"
    # each answer comes from its release's table
    for u in USERS[:40]:
        out = await _rec(c, u)
        assert {e["id"] for e in out["clusters"]} <= demo.sets[out["release"]]

    # the same canary again: nothing is loaded; the canary removed: everyone gets the served release
    assert await svc.reconfigure(with_canary(demo, 30))
    assert loads == ["rel-a", "rel-b"]
    assert await svc.reconfigure(demo.releases["rel-a"])
    assert {(await _rec(c, u))["release"] for u in USERS} == {"rel-a"}
    assert (await c.get("/release")).json()["canary"] is None


async def test_a_candidate_that_does_not_load_leaves_serving_as_it_was(client: tuple, demo: DemoStore) -> None:
    c, svc, _ = client
    broken = with_canary(demo, 50)
    broken["canary"]["table_version"] = 999
    assert not await svc.reconfigure(broken)
    info = (await c.get("/release")).json()
    assert info["canary"] is None and "999" in info["last_reconfigure_error"]
    assert {(await _rec(c, u))["release"] for u in USERS[:50]} == {"rel-a"}


async def test_during_canary_rollouts_no_request_fails_and_none_mixes_releases(client: tuple, demo: DemoStore) -> None:
    """Requests of many users while the canary starts, stops and the candidate gets promoted, in a loop."""
    c, svc, _ = client
    seen: dict[str, int] = {"rel-a": 0, "rel-b": 0}
    stop = asyncio.Event()
    errors: list[str] = []

    async def worker(i: int) -> None:
        k = i
        while not stop.is_set():
            a, b = HITS[k % len(HITS)]
            user = USERS[k % len(USERS)]
            k += 7
            await asyncio.sleep(0)
            r = await c.post("/recommend", json={"recent_clusters": [a, b], "n": 2, "user_id": user})
            if r.status_code != 200:
                errors.append(r.text)
                continue
            out = r.json()
            seen[out["release"]] += 1
            if not {e["id"] for e in out["clusters"]} <= demo.sets[out["release"]]:
                errors.append(json.dumps(out))

    tasks = [asyncio.create_task(worker(i)) for i in range(8)]
    steps = [
        with_canary(demo, 50),
        demo.releases["rel-b"],
        with_canary(demo, 20, "rel-b", "rel-a"),
        demo.releases["rel-a"],
    ]
    for i in range(8):
        assert await svc.reconfigure(steps[i % len(steps)]), svc.last_error
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*tasks)
    assert not errors
    assert seen["rel-a"] > 0 and seen["rel-b"] > 0
