"""The HTTP intake, POST /v1/interactions (issue 11, item 5): the real app (make_api) over a service whose release
names a real schema in the embedded PostgreSQL, written through store/ingest.py. Accepted batches, per-row
reasons, 422 and 413, idempotence by event id, and events visible to the next refresh."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from recupdate_workloads.contract.env import DSN_ENV
from recupdate_workloads.contract.serve import UserConfig
from recupdate_workloads.data.types import Catalogue, Cluster
from recupdate_workloads.serving import intake as intake_mod
from recupdate_workloads.serving.app import BodyLimit, make_api
from recupdate_workloads.serving.intake import (
    INTAKE_ENABLED_ENV,
    INTAKE_MAX_BODY_BYTES,
    INTAKE_MAX_BODY_BYTES_ENV,
    INTAKE_PATH,
    INTAKE_SCHEMA_ENV,
    MAX_EVENTS,
    Intake,
    check_rows,
    intake_max_body_bytes,
)
from recupdate_workloads.serving.release import Loaded
from recupdate_workloads.serving.service import RecommenderService
from recupdate_workloads.store import catalogue as cat
from recupdate_workloads.store import ingest
from recupdate_workloads.store.db import Store, connect
from recupdate_workloads.store.owner import Owner, claim_owner

JSON_CT = {"content-type": "application/json"}
T0 = 1_900_000_000  # 2030-03-17
ITEMS = [f"sku-{i}" for i in range(40)]
GENRES = ["action", "comedy", "drama", "horror"]


def _bundle(cfg: UserConfig) -> Loaded:
    """A release held in memory: serving needs nothing of the store here, the intake only its schema's name."""
    return Loaded(
        config=cfg,
        catalogue=Catalogue([Cluster(i, g) for i, g in enumerate(GENRES)]),
        table_index={},
        table_ids=np.zeros((0, 3), dtype=np.int64),
        table_scores=np.zeros((0, 3)),
        table_source=np.zeros(0, dtype=np.int8),
        popular=tuple((i, 1.0) for i in range(len(GENRES))),
    )


def _service(dsn: str, **environ: str) -> RecommenderService:
    return RecommenderService(loader=_bundle, retry_delays_s=(), environ={DSN_ENV: dsn, **environ})


@pytest.fixture
def owned(store: Store) -> Store:
    """A policy's schema: migrated (the fixture), owned, with a catalogue of 40 items in 4 clusters."""
    claim_owner(store.conn, store.schema, Owner("ns", "policy", "uid-1"))
    ingest.write_catalogue(
        store,
        items={"item": ITEMS, "cluster": [GENRES[i % 4] for i in range(len(ITEMS))]},
        clusters={"cluster": GENRES},
        embed=False,
    )
    return store


@pytest.fixture
async def client(owned: Store) -> AsyncIterator[tuple[httpx.AsyncClient, RecommenderService]]:
    svc = _service(owned.dsn)
    uc = {"release_id": "r1", "table_version": 0, "store_schema": owned.schema}
    assert await svc.reconfigure(uc), svc.last_error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        yield c, svc
    svc.shutdown()


def _events(n: int, start: int = 0, *, ids: bool = True, user: str = "alice") -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        e: dict[str, Any] = {"user": f"{user}-{i % 7}", "item": ITEMS[i % len(ITEMS)], "ts": T0 + 60 * i}
        if i % 3:
            e["weight"] = 4.5
        if ids:
            e["event_id"] = f"{user}-ev-{i}"
        out.append(e)
    return out


def _stored(store: Store) -> list[tuple[str, str, int, float, str | None]]:
    """The interactions table by external ids: (user, item, ts, weight, event_id), in ts order."""
    with store.tx() as c:
        rows = c.execute(
            "SELECT u.external, i.external, t.ts, t.weight, t.event_id FROM interactions t"
            " JOIN user_ids u USING (user_id) JOIN items i USING (item_id) ORDER BY t.ts, t.event_id"
        ).fetchall()
    return [(r[0], r[1], int(r[2]), float(r[3]), r[4]) for r in rows]


async def _post(c: httpx.AsyncClient, events: Any, status: int = 200) -> dict[str, Any]:
    r = await c.post(INTAKE_PATH, json={"events": events})
    assert r.status_code == status, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------------------
# Accepted batches


async def test_a_batch_is_written_by_external_ids(client: tuple, owned: Store) -> None:
    c, _ = client
    events = _events(25)
    events[0]["ts"] = "2030-03-17T17:46:40Z"  # = T0, as RFC 3339
    events[1]["ts"] = float(T0 + 60) + 0.75  # fractions floored
    events[2]["user"], events[2]["item"] = "  alice-2 ", 17  # stripped; an integer id is its decimal text
    ingest.write_catalogue(owned, items={"item": ["17"], "cluster": ["drama"]}, embed=False)
    out = await _post(c, events)
    assert out == {
        "read": 25,
        "accepted": 25,
        "duplicates": 0,
        "rejected": 0,
        "reasons": {},
        "rejected_rows": [],
        "detail": [],
        "store_schema": owned.schema,
    }
    rows = _stored(owned)
    assert len(rows) == 25
    assert rows[0] == ("alice-0", "sku-0", T0, 1.0, "alice-ev-0")
    assert rows[1] == ("alice-1", "sku-1", T0 + 60, 4.5, "alice-ev-1")
    assert rows[2] == ("alice-2", "17", T0 + 120, 4.5, "alice-ev-2")
    # seven users got internal ids; a second batch reuses them
    await _post(c, _events(7, 100))
    with owned.tx() as conn:
        assert conn.execute("SELECT count(*) FROM user_ids").fetchone() == (7,)


async def test_bad_rows_are_reported_and_the_good_ones_written(client: tuple, owned: Store) -> None:
    c, _ = client
    bad: list[tuple[Any, str, str | None]] = [
        ("not an object", "not_an_object", None),
        ({"user": "u", "item": "sku-1", "ts": T0, "rating": 5}, "unknown_field", None),
        ({"item": "sku-1", "ts": T0}, "missing_field", "user"),
        ({"user": "u", "item": "sku-1", "ts": ""}, "missing_field", "ts"),
        ({"user": "   ", "item": "sku-1", "ts": T0}, "missing_field", "user"),
        ({"user": ["u"], "item": "sku-1", "ts": T0}, "bad_user", "user"),
        ({"user": "u", "item": 1.5, "ts": T0}, "bad_item", "item"),
        ({"user": "u" * 257, "item": "sku-1", "ts": T0}, "id_too_long", "user"),
        ({"user": "u\x00v", "item": "sku-1", "ts": T0}, "bad_user", "user"),
        ({"user": "u", "item": "sku-1", "ts": "yesterday"}, "bad_timestamp", "ts"),
        ({"user": "u", "item": "sku-1", "ts": True}, "bad_timestamp", "ts"),
        ({"user": "u", "item": "sku-1", "ts": T0 * 1000}, "timestamp_out_of_range", "ts"),
        ({"user": "u", "item": "sku-1", "ts": -1}, "timestamp_out_of_range", "ts"),
        ({"user": "u", "item": "sku-1", "ts": T0, "weight": "5"}, "bad_weight", "weight"),
        ({"user": "u", "item": "sku-1", "ts": T0, "weight": -0.5}, "negative_weight", "weight"),
        ({"user": "u", "item": "sku-1", "ts": T0, "weight": 1e7}, "weight_out_of_range", "weight"),
        ({"user": "u", "item": "sku-1", "ts": T0, "event_id": {"a": 1}}, "bad_event_id", "event_id"),
        ({"user": "u", "item": "no-such-sku", "ts": T0}, "unknown_item", "item"),
    ]
    good = _events(10)
    events: list[Any] = []
    where: dict[int, tuple[str, str | None]] = {}
    for k, (row, reason, field) in enumerate(bad):
        events.append(good[k % 10] if k < 10 else _events(1, 50 + k)[0])
        where[len(events)] = (reason, field)
        events.append(row)
    out = await _post(c, events)
    assert out["read"] == len(events) == out["accepted"] + out["duplicates"] + out["rejected"]
    assert out["rejected"] == len(bad) and out["accepted"] == len(bad)
    assert out["rejected_rows"] == sorted(where)
    expected: dict[str, int] = {}
    for reason, _ in where.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert out["reasons"] == expected
    assert len(out["detail"]) == 10  # bounded (MAX_ECHOED_ERRORS); the indexes above list them all
    for d in out["detail"]:
        reason, field = where[d["loc"][2]]
        assert d["type"] == reason and d["loc"][:2] == ["body", "events"] and d["msg"]
        assert d["loc"][3:] == ([field] if field else [])
    assert "milliseconds" in json.dumps(await _post(c, [good[0], bad[11][0]]))
    assert len(_stored(owned)) == len(bad)  # good[0] was stored by the first batch already
    assert (await _post(c, [good[0]]))["duplicates"] == 1


async def test_a_batch_without_a_writable_row_is_a_422_and_writes_nothing(client: tuple, owned: Store) -> None:
    c, _ = client
    r = await c.post(INTAKE_PATH, json={"events": [{"user": "u", "item": "nope", "ts": T0}, {"user": "u"}]})
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["message"].startswith("no event of the batch could be written (2 rejected): ")
    assert out["rejected_rows"] == [0, 1] and out["reasons"] == {"unknown_item": 1, "missing_field": 1}
    assert [d["type"] for d in out["detail"]] == ["unknown_item", "missing_field"]
    assert _stored(owned) == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"events": [', "invalid JSON"),
        (b'{"events": ["\\ud800"]}', "surrogate"),
        (b"[]", "Input should be a valid dictionary"),
        (b'{"events": {}}', "events: Input should be a valid list"),
        (b'{"events": []}', "at least 1 item"),
        (b'{"events": [], "more": 1}', "more: Extra inputs are not permitted"),
        (json.dumps({"events": [{}] * (MAX_EVENTS + 1)}).encode(), f"at most {MAX_EVENTS} items"),
    ],
)
async def test_what_is_not_a_batch_is_a_422(client: tuple, owned: Store, body: bytes, says: str) -> None:
    c, _ = client
    r = await c.post(INTAKE_PATH, content=body, headers=JSON_CT)
    assert r.status_code == 422, r.text
    assert says in r.json()["message"], r.json()["message"]
    assert len(r.content) <= 16 * 1024
    assert _stored(owned) == []


async def test_a_body_not_sent_as_json_says_so(client: tuple) -> None:
    c, _ = client
    r = await c.post(INTAKE_PATH, content=json.dumps({"events": _events(1)}))  # no Content-Type
    assert r.status_code == 422 and "send Content-Type: application/json" in r.json()["message"]


# ---------------------------------------------------------------------------------------------------------
# Size limit


async def test_the_intake_has_a_limit_of_its_own(client: tuple, owned: Store) -> None:
    c, _ = client
    # 3,000 events (~285 KB) pass: more than /recommend's limit (256 KiB) allows
    events = _events(3000)
    body = json.dumps({"events": events}).encode()
    assert 256 * 1024 < len(body) < INTAKE_MAX_BODY_BYTES
    r = await c.post(INTAKE_PATH, content=body, headers=JSON_CT)
    assert r.status_code == 200 and r.json()["accepted"] == 3000, r.text[:300]
    assert (await c.post("/recommend", content=body, headers=JSON_CT)).status_code == 413
    # one byte over the intake's limit: 413 unread, declared or streamed
    r = await c.post(INTAKE_PATH, content=body.ljust(INTAKE_MAX_BODY_BYTES + 1), headers=JSON_CT)
    assert r.status_code == 413 and str(INTAKE_MAX_BODY_BYTES) in r.json()["message"]
    sent = {"chunks": 0}

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(200):
            sent["chunks"] += 1
            yield b" " * 65536

    r = await c.post(INTAKE_PATH, content=stream(), headers=JSON_CT)
    assert r.status_code == 413 and sent["chunks"] <= INTAKE_MAX_BODY_BYTES // 65536 + 1
    assert len(_stored(owned)) == 3000


async def test_intake_limit_setting(owned: Store) -> None:
    assert intake_max_body_bytes({}) == INTAKE_MAX_BODY_BYTES
    assert intake_max_body_bytes({INTAKE_MAX_BODY_BYTES_ENV: "5000"}) == 5000
    with pytest.raises(ValueError, match=INTAKE_MAX_BODY_BYTES_ENV):
        intake_max_body_bytes({INTAKE_MAX_BODY_BYTES_ENV: "0"})
    svc = _service(owned.dsn)
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": owned.schema})
    body = json.dumps({"events": _events(3)}).encode()
    app = make_api(svc, intake_body_limit=len(body) - 1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post(INTAKE_PATH, content=body, headers=JSON_CT)).status_code == 413
        assert (await c.post(INTAKE_PATH, content=body[:-1], headers=JSON_CT)).status_code == 422
    svc.shutdown()


async def test_per_path_limits_look_below_the_route_prefix() -> None:
    # Ray Serve hands an application its route prefix as root_path, and the full path
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = BodyLimit(app, max_bytes=10, per_path={INTAKE_PATH: 100})
    transport = httpx.ASGITransport(app=limited, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/api" + INTAKE_PATH, content=b"x" * 50)).status_code == 204
        assert (await c.post("/api" + INTAKE_PATH, content=b"x" * 101)).status_code == 413
        assert (await c.post("/api/recommend", content=b"x" * 50)).status_code == 413


async def test_an_item_added_during_the_write_is_still_reported_right(
    client: tuple, owned: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write skips two unknown items, then the catalogue gains one (another session commits) before the
    # intake asks which items were unknown: the counts disagree, and the batch is written again.
    c, _ = client
    real = ingest.item_ids
    calls = {"n": 0}

    def racing(conn: Any, names: Any) -> dict[str, int]:
        calls["n"] += 1  # 1: write_interactions' own lookup; 2: the intake's; 3, 4: the same, written again
        if calls["n"] == 2:
            other = Store(dsn=owned.dsn, schema=owned.schema, conn=connect(owned.dsn))
            ingest.write_catalogue(other, items={"item": ["late-sku"], "cluster": ["comedy"]}, embed=False)
            other.close()
        return real(conn, names)

    monkeypatch.setattr(ingest, "item_ids", racing)
    events = [
        *_events(3),
        {"user": "u", "item": "late-sku", "ts": T0, "event_id": "late"},
        {"user": "u", "item": "never-sku", "ts": T0, "event_id": "never"},
    ]
    out = await _post(c, events)
    assert calls["n"] == 4
    assert (out["accepted"], out["rejected_rows"], out["reasons"]) == (4, [4], {"unknown_item": 1})
    assert sorted(r[4] for r in _stored(owned)) == ["alice-ev-0", "alice-ev-1", "alice-ev-2", "late"]


async def test_a_batch_of_known_items_costs_no_lookup(
    client: tuple, owned: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _ = client
    calls: list[int] = []
    real = ingest.item_ids
    monkeypatch.setattr(ingest, "item_ids", lambda conn, names: calls.append(1) or real(conn, names))
    assert (await _post(c, _events(20)))["accepted"] == 20
    assert calls == [1]  # write_interactions' own lookup only


# ---------------------------------------------------------------------------------------------------------
# Idempotence


async def test_event_ids_make_a_retry_write_nothing(client: tuple, owned: Store) -> None:
    c, _ = client
    events = _events(30)
    first = await _post(c, events)
    assert (first["accepted"], first["duplicates"]) == (30, 0)
    again = await _post(c, events)  # a retry after a lost answer
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 30, 0)
    # overlapping: half old, half new; an id repeated inside one batch counts once
    mixed = await _post(c, events[15:] + _events(10, 30) + [_events(1, 30)[0]])
    assert (mixed["accepted"], mixed["duplicates"]) == (10, 16)
    assert len(_stored(owned)) == 40
    # without event ids every row is a new event, even when it repeats one
    plain = _events(5, 200, ids=False)
    assert (await _post(c, plain))["accepted"] == 5
    assert (await _post(c, plain))["accepted"] == 5
    assert len(_stored(owned)) == 50


async def test_concurrent_retries_of_one_batch_store_it_once(client: tuple, owned: Store) -> None:
    c, _ = client
    events = _events(200)
    outs = await asyncio.gather(*(_post(c, events) for _ in range(4)))
    assert sum(o["accepted"] for o in outs) == 200
    assert sum(o["duplicates"] for o in outs) == 600
    assert len(_stored(owned)) == 200


# ---------------------------------------------------------------------------------------------------------
# Visible to the next refresh


async def test_posted_events_are_what_the_next_refresh_counts(client: tuple, owned: Store) -> None:
    from recupdate_workloads.jobs.run import load_triples

    c, _ = client
    # two users walk action -> comedy -> drama -> horror (items i % 4 are in cluster i % 4)
    events = []
    for u in ("ann", "bob"):
        for k in range(8):
            events.append({"user": u, "item": ITEMS[k], "ts": T0 + 3600 * k, "weight": 5, "event_id": f"{u}{k}"})
    assert (await _post(c, events))["accepted"] == 16
    catalogue, item_cluster = cat.load_catalogue(owned)
    window = (T0, T0 + 8 * 3600)
    chunks = list(cat.iter_interactions(owned, *window, item_cluster, catalogue))
    assert sum(len(ch) for ch in chunks) == 16
    _, triples = load_triples(owned, *window, threshold=4.0)
    got = sorted(zip(triples.c1.tolist(), triples.c2.tolist(), triples.c_next.tolist(), strict=True))
    assert got == sorted([(0, 1, 2), (1, 2, 3), (2, 3, 0), (3, 0, 1), (0, 1, 2), (1, 2, 3)] * 2)


# ---------------------------------------------------------------------------------------------------------
# Where it writes, and when it cannot


async def test_no_release_yet_or_no_dsn_is_a_503(owned: Store) -> None:
    svc = _service(owned.dsn)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        r = await c.post(INTAKE_PATH, json={"events": _events(1)})
        assert r.status_code == 503 and "no release configured yet" in r.json()["message"]
        assert r.headers["retry-after"]
    svc.shutdown()
    svc = RecommenderService(loader=_bundle, retry_delays_s=(), environ={})
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": owned.schema})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        r = await c.post(INTAKE_PATH, json={"events": _events(1)})
        assert r.status_code == 503 and f"${DSN_ENV} is not set" in r.json()["message"]
    svc.shutdown()


async def test_the_target_release_schema_is_used_while_its_load_fails(owned: Store) -> None:
    def failing(cfg: UserConfig) -> Loaded:
        raise LookupError("no table")

    svc = RecommenderService(loader=failing, retry_delays_s=(), environ={DSN_ENV: owned.dsn})
    assert not await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": owned.schema})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        assert (await _post(c, _events(3)))["store_schema"] == owned.schema
    svc.shutdown()
    assert len(_stored(owned)) == 3


async def test_only_an_existing_owned_schema_is_written(owned: Store, store: Store, pg_dsn: str) -> None:
    # a schema that does not exist is never created
    svc = _service(pg_dsn)
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": "nowhere_at_all"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        r = await c.post(INTAKE_PATH, json={"events": _events(1)})
        assert r.status_code == 503 and "does not exist" in r.json()["message"], r.text
    svc.shutdown()
    with owned.tx() as conn:
        assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'nowhere_at_all'").fetchone() is None
    # a migrated schema no policy owns: refused
    with owned.tx() as conn:
        conn.execute("DELETE FROM policy_owner")
    svc = _service(pg_dsn)
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": owned.schema})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        r = await c.post(INTAKE_PATH, json={"events": _events(1)})
        assert r.status_code == 503 and "not owned by any policy" in r.json()["message"], r.text
        claim_owner(owned.conn, owned.schema, Owner("ns", "policy"))
        assert (await _post(c, _events(1)))["accepted"] == 1  # a refusal is not remembered
    svc.shutdown()


async def test_a_configured_schema_wins_and_the_route_can_be_off(owned: Store, pg_dsn: str) -> None:
    svc = _service(pg_dsn, **{INTAKE_SCHEMA_ENV: owned.schema})
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": "some_other_schema"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        assert (await _post(c, _events(2)))["store_schema"] == owned.schema
    svc.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INTAKE_ENABLED_ENV, "off")
        svc = _service(pg_dsn)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
            assert (await c.post(INTAKE_PATH, json={"events": _events(1)})).status_code == 404
        svc.shutdown()


async def test_writes_never_hold_up_the_event_loop(owned: Store) -> None:
    # a write slowed down on the store's side (a lock held by another session) must not delay /healthz
    svc = _service(owned.dsn)
    await svc.reconfigure({"release_id": "r1", "table_version": 0, "store_schema": owned.schema})
    locker = owned.conn
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        with owned.tx():
            locker.execute("LOCK TABLE interactions IN EXCLUSIVE MODE")
            post = asyncio.create_task(_post(c, _events(50)))
            await asyncio.sleep(0.3)
            assert not post.done()
            t0 = time.perf_counter()
            for _ in range(20):
                assert (await c.get("/healthz")).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        assert (await post)["accepted"] == 50
    svc.shutdown()


def test_row_checks_agree_with_the_store_checks() -> None:
    # every row the intake accepts, the store's own check (data.loaders.check_rows) accepts too
    from recupdate_workloads.data.loaders import check_rows as store_check

    rows, errors = check_rows(
        [
            {"user": "a", "item": "b", "ts": "2030-01-01T00:00:00", "weight": 0},
            {"user": 2**63 - 1, "item": -5, "ts": 7_258_118_399.9, "weight": 1e6, "event_id": 7},
            {"user": "é😀", "item": " x ", "ts": 0, "event_id": "  "},
            {"user": "u" * 256, "item": "i", "ts": "2199-12-31T23:59:59+00:00", "event_id": "e" * 256},
        ]
    )
    assert not errors and len(rows) == 4
    assert rows.ts == [1_893_456_000, 7_258_118_399, 0, 7_258_118_399] and rows.event_id == [None, "7", None, "e" * 256]
    import pyarrow as pa

    cols = {
        "user": pa.array(rows.user),
        "item": pa.array(rows.item),
        "ts": pa.array(rows.ts, pa.int64()),
        "weight": pa.array(rows.weight),
        "event_id": pa.array(rows.event_id, pa.string()),
    }
    assert store_check(cols, "<test>").ok.all()


def test_intake_constructs_nothing_before_its_first_batch() -> None:
    it = Intake(lambda: None, environ={})
    assert it._conns is None and it._pool is None
    it.close()
    assert intake_mod.INTAKE_PATH == "/v1/interactions"
