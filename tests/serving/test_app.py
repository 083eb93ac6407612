"""The recommender's HTTP API and release swaps, in-process (no Ray): the same FastAPI app a Serve replica runs,
over a small store in the embedded PostgreSQL. The model is a stub here (tests/test_serving_ray.py runs a real
tiny model through Ray Serve)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from fixtures.serving import StubModel, service_over
from recupdate_workloads.contract.serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    IMPORT_PATH,
    UserConfig,
    deploy_config,
    serve_application,
    user_config,
    user_config_of,
    with_user_config,
)
from recupdate_workloads.serving.app import make_api
from recupdate_workloads.serving.demo_store import MISSING_PAIRS
from recupdate_workloads.serving.release import Loaded, last_two_distinct, load_release
from recupdate_workloads.serving.service import RecommenderService

HITS = [(a, b) for a in range(8) for b in range(8) if a != b and (a, b) not in MISSING_PAIRS]


async def _rec(c: httpx.AsyncClient, recent: list, n: int = 3) -> dict:
    r = await c.post("/recommend", json={"recent_clusters": recent, "n": n})
    assert r.status_code == 200, r.text
    return r.json()


def test_context_is_the_last_two_distinct_clusters() -> None:
    assert last_two_distinct([1, 1, 2, 2, 2]) == [1, 2]
    assert last_two_distinct([3, 1, 3]) == [1, 3]
    assert last_two_distinct([4, 5, 6, 6]) == [5, 6]
    assert last_two_distinct([5, 5]) == [5]
    assert last_two_distinct([]) == []


async def test_table_hit_names_and_popular(client: tuple[httpx.AsyncClient, Any], demo: tuple) -> None:
    c, _ = client
    sa = demo[1].sets["rel-a"]
    r = await _rec(c, [0, 1], n=2)
    assert r["release"] == "rel-a"
    assert [e["source"] for e in r["clusters"]] == ["model", "model"]
    assert {e["id"] for e in r["clusters"]} <= sa - {0, 1}
    assert all(e["name"] for e in r["clusters"])
    # repeats collapse, names resolve (exact, normalised and answer form), older history is ignored
    assert await _rec(c, [5, 0, 0, 1, 1], n=2) == r
    assert await _rec(c, ["Action|Adventure", "adventure animation"], n=2) == r
    assert await _rec(c, [7, "action_adventure", 1], n=2) == r
    # a short table row is filled up from popularity, never repeating a cluster nor the context
    full = await _rec(c, [0, 1], n=8)
    ids = [e["id"] for e in full["clusters"]]
    assert len(ids) == 6 and len(set(ids)) == 6 and not {0, 1} & set(ids)
    assert [e["source"] for e in full["clusters"]][2:] == ["popular"] * 4
    # fewer than two distinct clusters: popular, without the known one
    for recent in ([2], [2, 2, 2], []):
        p = await _rec(c, recent, n=5)
        assert [e["source"] for e in p["clusters"]] == ["popular"] * 5
        assert 2 not in [e["id"] for e in p["clusters"]] or recent == []
        scores = [e["score"] for e in p["clusters"]]
        assert scores == sorted(scores, reverse=True)


async def test_health_and_release(client: tuple[httpx.AsyncClient, Any], demo: tuple) -> None:
    c, _ = client
    assert (await c.get("/healthz")).json() == {"status": "ok", "release": "rel-a"}
    info = (await c.get("/release")).json()
    assert info["release_id"] == "rel-a" and info["table_version"] == demo[1].table_versions["rel-a"]
    assert info["last_reconfigure_failed"] is False and info["last_reconfigure_error"] is None
    assert info["pairs"] == 56 - len(MISSING_PAIRS) and info["clusters"] == 8 and info["loaded_at"]
    empty = RecommenderService(retry_delays_s=())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(empty)), base_url="http://t") as e:
        assert (await e.get("/healthz")).status_code == 503
        r = await e.post("/recommend", json={"recent_clusters": [0, 1]})
        assert r.status_code == 503 and "no release" in r.json()["detail"]


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("not json", b"{recent_clusters: [1, 2]", "body: invalid JSON at character 1"),
    ("array body", [0, 1], "body: Input should be a valid dictionary"),
    ("missing field", {}, "recent_clusters: Field required"),
    ("extra field", {"recent_clusters": [0, 1], "k": 3}, "k: Extra inputs are not permitted"),
    ("n zero", {"recent_clusters": [0, 1], "n": 0}, "n: Input should be greater than or equal to 1"),
    ("n too big", {"recent_clusters": [0, 1], "n": 101}, "n: Input should be less than or equal to 100"),
    ("n as string", {"recent_clusters": [0, 1], "n": "5"}, "n: Input should be a valid integer"),
    ("n fractional", {"recent_clusters": [0, 1], "n": 2.5}, "n: Input should be a valid integer"),
    ("n bool", {"recent_clusters": [0, 1], "n": True}, "n: Input should be a valid integer"),
    ("n infinite", b'{"recent_clusters": [0, 1], "n": 1e400}', "n: Input should be a valid integer"),
    ("n huge", b'{"recent_clusters": [0, 1], "n": 123456789012345678901234567890}', "n: Input should be less"),
    ("id huge", {"recent_clusters": [0, 2**70]}, "recent_clusters.1: cluster ids are integers from 0"),
    ("empty body", b"", "body: Field required"),
    ("not utf-8", b"\xff\xfe", "body: invalid JSON"),
    ("clusters not a list", {"recent_clusters": "0,1"}, "recent_clusters: Input should be a valid list"),
    ("cluster float", {"recent_clusters": [0, 1.5]}, "recent_clusters.1: expected a cluster id (integer) or a"),
    ("cluster null", {"recent_clusters": [None, 1]}, "recent_clusters.0: expected a cluster id"),
    ("cluster object", {"recent_clusters": [{"id": 1}]}, "recent_clusters.0: expected a cluster id"),
    ("cluster bool", {"recent_clusters": [True, 1]}, "recent_clusters.0: expected a cluster id"),
    ("negative id", {"recent_clusters": [-1, 1]}, "recent_clusters.0: cluster ids are integers from 0"),
    ("empty name", {"recent_clusters": ["", 1]}, "recent_clusters.0: cluster names have 1 to 200 characters"),
    ("long name", {"recent_clusters": ["x" * 201, 1]}, "recent_clusters.0: cluster names have 1 to 200"),
    ("oversize list", {"recent_clusters": [0, 1] * 51}, "recent_clusters: List should have at most 100 items"),
    ("user_id not a string", {"user_id": 7, "recent_clusters": [0, 1]}, "user_id: Input should be a valid string"),
    ("unknown id", {"recent_clusters": [0, 999]}, "recent_clusters.1: unknown cluster 999"),
    ("unknown name", {"recent_clusters": ["nope", 1, "zilch"]}, "unknown cluster 'zilch'"),
]


async def test_wrong_content_type_gets_a_hint(client: tuple) -> None:
    c, _ = client
    r = await c.post("/recommend", content=b'{"recent_clusters": [0, 1]}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["message"].startswith("send Content-Type: application/json")


@pytest.mark.parametrize(("body", "expect"), [(b, e) for _, b, e in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES])
async def test_invalid_requests_get_422_with_a_message(client: tuple, body: Any, expect: str) -> None:
    c, _ = client
    if isinstance(body, bytes):
        r = await c.post("/recommend", content=body, headers={"content-type": "application/json"})
    else:
        r = await c.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert expect in out["message"], out
    assert isinstance(out["detail"], list) and out["detail"]
    assert len(r.content) < 2000  # inputs are echoed back shortened


async def test_miss_is_answered_by_the_model_with_fresh_evidence(demo: tuple, pg_dsn: str) -> None:
    model = StubModel()
    svc = service_over(pg_dsn, model)
    assert await svc.reconfigure(demo[1].releases["rel-a"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        own, borrowed = MISSING_PAIRS
        r = await _rec(c, list(own), n=3)
        assert [e["source"] for e in r["clusters"]] == ["model"] * 3
        assert [e["id"] for e in r["clusters"]] == [x for x in range(8) if x not in own][:3]
        c1, c2, ev = model.calls[-1]
        assert (c1, c2) == own and ev is not None and not ev.borrowed and ev.successors
        await _rec(c, list(borrowed), n=3)
        c1, c2, ev = model.calls[-1]
        assert (c1, c2) == borrowed and ev is not None and ev.borrowed  # the snapshot has none of its own
        assert all(s.cluster not in borrowed for s in ev.successors)
        # a second ask is served from the bundle's cache
        calls = len(model.calls)
        await _rec(c, list(own), n=3)
        assert len(model.calls) == calls
    svc.shutdown()


async def test_miss_past_its_time_limit_is_answered_from_evidence(demo: tuple, pg_dsn: str) -> None:
    model = StubModel(delay_s=0.5)
    svc = service_over(pg_dsn, model)
    assert await svc.reconfigure({**demo[1].releases["rel-a"], "online_timeout_ms": 50})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        own = MISSING_PAIRS[0]
        t0 = time.perf_counter()
        r = await _rec(c, list(own), n=3)
        assert time.perf_counter() - t0 < 0.4
        srcs = [e["source"] for e in r["clusters"]]
        assert srcs[0] == "evidence" and set(srcs) <= {"evidence", "popular"}
        ev = svc.loaded.evidence_cache[own]
        expect = [s.cluster for s in ev.successors if s.cluster not in own]
        assert [e["id"] for e in r["clusters"] if e["source"] == "evidence"] == expect[:3]
        # the ranking finishes in its thread and answers the next request for the pair
        await asyncio.sleep(0.6)
        r2 = await _rec(c, list(own), n=3)
        assert [e["source"] for e in r2["clusters"]] == ["model"] * 3
    svc.shutdown()


async def test_miss_without_model_nor_evidence_is_popular(demo: tuple, pg_dsn: str) -> None:
    svc = service_over(pg_dsn)  # no model
    assert await svc.reconfigure({**demo[1].releases["rel-b"], "evidence_timeout_ms": 0})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        r = await _rec(c, list(MISSING_PAIRS[0]), n=4)
        assert [e["source"] for e in r["clusters"]] == ["popular"] * 4
        assert not set(MISSING_PAIRS[0]) & {e["id"] for e in r["clusters"]}
        assert r["release"] == "rel-b"
        # with evidence lookups allowed again (a tuning-only change keeps the loaded data)
        loaded_at = (await c.get("/release")).json()["loaded_at"]
        assert await svc.reconfigure(demo[1].releases["rel-b"])
        assert (await c.get("/release")).json()["loaded_at"] == loaded_at
        r = await _rec(c, list(MISSING_PAIRS[0]), n=2)
        assert [e["source"] for e in r["clusters"]] == ["evidence"] * 2
    svc.shutdown()


async def test_failed_reconfigure_keeps_the_old_release(client: tuple, demo: tuple) -> None:
    c, svc = client
    good = demo[1].releases["rel-a"]
    before = await _rec(c, [0, 1])
    broken = [
        ({**good, "release_id": "rel-x", "table_version": 999}, "table version 999 is not published"),
        ({**good, "release_id": "rel-y", "store_schema": "no_such_schema"}, "schema no_such_schema does not exist"),
        ({**good, "release_id": "rel-z", "dsn_env": "RECUPDATE_NO_SUCH_DSN"}, "RECUPDATE_NO_SUCH_DSN is not set"),
        ({**good, "release_id": "rel-w", "adapter_uri": "/nonexistent/adapter"}, "no adapter or model"),
        ({**good, "surprise": 1}, "Extra inputs are not permitted"),
        ({"release_id": "rel-v"}, "Field required"),
    ]
    for cfg, why in broken:
        assert not await svc.reconfigure(cfg)
        info = (await c.get("/release")).json()
        assert info["release_id"] == "rel-a" and info["last_reconfigure_failed"] is True
        assert why in info["last_reconfigure_error"], info
        assert await _rec(c, [0, 1]) == before
        assert (await c.get("/healthz")).status_code == 200
    assert await svc.reconfigure(demo[1].releases["rel-b"])
    info = (await c.get("/release")).json()
    assert info["release_id"] == "rel-b" and info["last_reconfigure_failed"] is False


async def test_swaps_under_concurrent_requests_never_mix_releases(client: tuple, demo: tuple) -> None:
    c, svc = client
    sets = demo[1].sets
    seen: dict[str, int] = {"rel-a": 0, "rel-b": 0}
    stop = asyncio.Event()
    errors: list[str] = []

    async def worker(i: int) -> None:
        k = i
        while not stop.is_set():
            a, b = HITS[k % len(HITS)]
            k += 7
            await asyncio.sleep(0)  # ASGITransport never suspends on a table hit: let the swaps run
            r = await c.post("/recommend", json={"recent_clusters": [a, b], "n": 2})
            if r.status_code != 200:
                errors.append(r.text)
                continue
            out = r.json()
            seen[out["release"]] += 1
            if not {e["id"] for e in out["clusters"]} <= sets[out["release"]]:
                errors.append(json.dumps(out))

    tasks = [asyncio.create_task(worker(i)) for i in range(8)]
    for i in range(10):
        assert await svc.reconfigure(demo[1].releases["rel-b" if i % 2 == 0 else "rel-a"])
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*tasks)
    assert not errors
    assert seen["rel-a"] > 0 and seen["rel-b"] > 0


def _slowservice_over(dsn: str, delay_s: float) -> RecommenderService:
    env = {"RECUPDATE_STORE_DSN": dsn}

    def loader(cfg: UserConfig) -> Loaded:
        time.sleep(delay_s)
        return load_release(cfg, env)

    return RecommenderService(loader=loader, retry_delays_s=())


async def test_background_swap_serves_the_old_release_until_the_new_one_is_loaded(demo: tuple, pg_dsn: str) -> None:
    svc = _slowservice_over(pg_dsn, 0.5)
    rel = demo[1].releases
    assert await svc.reconfigure({**rel["rel-a"], "background_swap": True})  # nothing loaded yet: awaited
    assert svc.loaded is not None and svc.loaded.release_id == "rel-a"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        t0 = time.perf_counter()
        assert await svc.reconfigure({**rel["rel-b"], "background_swap": True})
        assert time.perf_counter() - t0 < 0.2
        info = (await c.get("/release")).json()
        assert info["release_id"] == "rel-a" and info["loading"] == "rel-b"
        assert (await _rec(c, [0, 5]))["release"] == "rel-a"
        for _ in range(100):
            await asyncio.sleep(0.05)
            if svc.loading is None:
                break
        info = (await c.get("/release")).json()
        assert info["release_id"] == "rel-b" and info["loading"] is None and not info["last_reconfigure_failed"]
        assert (await _rec(c, [0, 5]))["release"] == "rel-b"

        # a newer reconfigure supersedes a load in flight: the superseded release is never served
        labels: list[str] = []
        assert await svc.reconfigure({**rel["rel-a"], "background_swap": True})
        assert await svc.reconfigure({**rel["rel-b"], "online_timeout_ms": 5, "background_swap": True})
        for _ in range(100):
            labels.append((await _rec(c, [0, 5]))["release"])
            await asyncio.sleep(0.02)
            if svc.loading is None:
                break
        assert set(labels) == {"rel-b"} and svc.loaded.config.online_timeout_ms == 5
        # a failed background load keeps the old release and says so
        assert await svc.reconfigure({**rel["rel-a"], "table_version": 999, "background_swap": True})
        for _ in range(100):
            await asyncio.sleep(0.05)
            if svc.loading is None:
                break
        info = (await c.get("/release")).json()
        assert info["release_id"] == "rel-b" and info["last_reconfigure_failed"] and info["loading"] is None
    svc.shutdown()


def test_serve_application_shape_and_rolls() -> None:
    from ray.serve.schema import ServeDeploySchema

    uc = user_config("rel-1", "/models/a", 3, "policy_x")
    entry = serve_application(uc, 2, env_vars={"RECUPDATE_STORE_DSN": "postgresql://x"}, num_cpus=0.5)
    assert entry["name"] == APP_NAME and entry["import_path"] == IMPORT_PATH
    assert entry["runtime_env"] == {"env_vars": {"RECUPDATE_STORE_DSN": "postgresql://x"}}
    (dep,) = entry["deployments"]
    assert dep["name"] == DEPLOYMENT_NAME and dep["num_replicas"] == 2
    assert dep["user_config"] == {**uc, "background_swap": False}  # several replicas: Serve updates one at a time
    assert serve_application(uc, 1)["deployments"][0]["user_config"]["background_swap"] is True
    uc = dep["user_config"]
    assert dep["ray_actor_options"] == {"num_cpus": 0.5}
    cfg = deploy_config([entry], port=8123)
    ServeDeploySchema.model_validate(cfg)  # what deploy() hands the controller
    UserConfig.model_validate(uc)  # what the replica accepts
    new_uc = user_config("rel-2", None, 4, "policy_x", online_timeout_ms=100)
    rolled = with_user_config(cfg, new_uc)
    assert user_config_of(rolled) == {**new_uc, "background_swap": False}  # kept from the deployment
    assert user_config_of(cfg) == uc
    strip = json.loads(json.dumps(rolled))
    strip["applications"][0]["deployments"][0]["user_config"] = uc
    assert strip == cfg  # nothing but user_config changed: an in-place reconfigure
    assert user_config_of(with_user_config(cfg, {**new_uc, "background_swap": True}))["background_swap"]
    quiet = deploy_config([serve_application(uc, 1, access_log=False)])
    assert quiet["applications"][0]["logging_config"] == {"enable_access_log": False}
    ServeDeploySchema.model_validate(quiet)
    with pytest.raises(ValueError):
        serve_application({"release_id": "x"}, 1)
    with pytest.raises(ValueError):
        user_config("r", None, 1, "s", typo=1)


def test_application_builder() -> None:
    from ray.serve import Application

    from recupdate_workloads.serving import deployment as serving

    assert isinstance(serving.app, Application)
    assert isinstance(serving.build_app({"max_pending_model_calls": 2, "ignored": 1}), Application)


def test_serving_config_imports_nothing_heavy() -> None:
    code = (
        "import sys, recupdate_workloads.contract.serve as m; m.serve_application(m.user_config('r', None, 1, 's'));"
        "heavy = [x for x in ('ray', 'torch', 'numpy', 'fastapi', 'transformers', 'psycopg') if x in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
