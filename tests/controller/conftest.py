"""Fixtures of the operator acceptance tests (kopf + emulated API + embedded PostgreSQL).

Under looptime, the fast-forwarded clock runs only inside the test function, not in fixtures; so the world
(its clock, the CRD, the Secret) is set up by `await make_world()` at the start of each test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

import k8s.emulator
from fixtures.operator_world import World, crd, fmt
from k8s.emulator import EmulatedCluster
from recupdate_workloads.store.db import connect, migrate  # tests only: the operator never imports workloads

#: Tuesday 00:30 UTC: the weekly fine-tune (Mondays 03:00) and the daily refresh (00:00) are far from it.
BASE = datetime(2030, 1, 8, 0, 30, tzinfo=UTC)
_counter = itertools.count()


@pytest.fixture
async def make_world(
    k8s_cluster: EmulatedCluster, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[World]]]:
    schema = f"opk_{os.getpid()}_{next(_counter)}"
    conn = connect(pg_dsn)
    migrate(conn, schema)
    worlds: list[World] = []

    async def make(base: datetime = BASE, secret: bool = True) -> World:
        world = World(k8s_cluster, pg_dsn, schema, base)
        monkeypatch.setattr(k8s.emulator, "now_rfc3339", lambda: fmt(world.now()))
        await k8s_cluster.apply(crd())
        if secret:
            await world.create_secret()
        worlds.append(world)
        return world

    yield make
    for w in worlds:
        w.close()
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    conn.close()
