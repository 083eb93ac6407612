"""POST /recommend/batch, in-process (no Ray): every result equals the single request's answer, the same
validation names the bad item, the limits answer 413; and the serving outcomes move as contexts are answered."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from fixtures.serving import StubModel, service_over
from recupdate_workloads.serving.app import make_api
from recupdate_workloads.serving.demo_store import MISSING_PAIRS
from recupdate_workloads.serving.release import PairIndex
from recupdate_workloads.serving.schema import MAX_BATCH, MAX_BATCH_ENV, max_batch


def _contexts(seed: int = 0, count: int = 60) -> list[dict[str, Any]]:
    """Hits, misses, short contexts, names, repeats and varied n."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [
        {"recent_clusters": list(MISSING_PAIRS[0]), "n": 4},
        {"recent_clusters": list(MISSING_PAIRS[1]), "n": 3},
        {"recent_clusters": [2], "n": 5},
        {"recent_clusters": []},
        {"recent_clusters": ["Action|Adventure", "adventure animation"], "n": 2, "user_id": "u1"},
    ]
    while len(out) < count:
        recent = [rng.randrange(8) for _ in range(rng.randrange(1, 6))]
        out.append({"recent_clusters": recent, "n": rng.randrange(1, 9)})
    rng.shuffle(out)
    return out


#: Misses wait for their evidence however busy the machine: a lookup past its limit would answer from popularity,
#: and the same context asked again later from the evidence it cached meanwhile.
PATIENT = {"evidence_timeout_ms": 30_000, "online_timeout_ms": 30_000}


@pytest.fixture
async def patient(demo: tuple, pg_dsn: str) -> Any:
    svc = service_over(pg_dsn)
    assert await svc.reconfigure({**demo[1].releases["rel-a"], **PATIENT})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        yield c, svc
    svc.shutdown()


async def test_batch_results_equal_single_requests(patient: tuple[httpx.AsyncClient, Any]) -> None:
    c, _ = patient
    contexts = _contexts()
    r = await c.post("/recommend/batch", json={"requests": contexts})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["release"] == "rel-a" and len(out["results"]) == len(contexts)
    for ctx, got in zip(contexts, out["results"], strict=True):
        single = await c.post("/recommend", json=ctx)
        assert single.status_code == 200
        assert got == single.json(), ctx
    # byte for byte too: each result is the single body
    one = await c.post("/recommend/batch", json={"requests": [contexts[0]]})
    assert (
        one.content
        == b'{"results":[' + (await c.post("/recommend", json=contexts[0])).content + b'],"release":"rel-a"}'
    )
    sources = {e["source"] for res in out["results"] for e in res["clusters"]}
    assert {"model", "popular"} <= sources  # table hits, and popularity fill-ups and short contexts


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"requests": [{"recent_clusters": [0, 1]}, {"recent_clusters": [0, 1], "n": 0}]}, "requests.1.n"),
        (
            {"requests": [{"recent_clusters": [0, 1]}] * 3 + [{"recent_clusters": [0, "nope"]}]},
            "requests.3.recent_clusters.1",
        ),
        ({"requests": [{"recent_clusters": [0, 1], "extra": 1}]}, "requests.0.extra"),
        ({"requests": [{"recent_clusters": list(range(8)) * 13}]}, "requests.0.recent_clusters"),
        ({"requests": [{"recent_clusters": [0, 99]}]}, "requests.0.recent_clusters.1"),
        ({"requests": []}, "requests"),
        ({"requests": {"recent_clusters": [0, 1]}}, "requests"),
        ({"recent_clusters": [0, 1]}, "requests"),
        ({"requests": [{"recent_clusters": [0, 1]}], "more": 1}, "more"),
    ],
)
async def test_bad_items_are_named(client: tuple[httpx.AsyncClient, Any], body: Any, where: str) -> None:
    c, _ = client
    r = await c.post("/recommend/batch", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(where), r.json()["message"]


async def test_every_bad_item_is_listed(client: tuple[httpx.AsyncClient, Any]) -> None:
    c, _ = client
    items = [
        {"recent_clusters": [0, 1]},
        {"recent_clusters": [77, 0]},
        {"recent_clusters": [1]},
        {"recent_clusters": [0, 88]},
    ]
    r = await c.post("/recommend/batch", json={"requests": items})
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["detail"]]
    assert locs == [["body", "requests", 1, "recent_clusters", 0], ["body", "requests", 3, "recent_clusters", 1]]


async def test_limits(client: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = client
    assert max_batch({}) == MAX_BATCH
    ok = {"requests": [{"recent_clusters": [0, 1], "n": 1}] * MAX_BATCH}
    assert (await c.post("/recommend/batch", json=ok)).status_code == 200
    over = {"requests": [{"recent_clusters": [0, 1]}] * (MAX_BATCH + 1)}
    r = await c.post("/recommend/batch", json=over)
    assert r.status_code == 413, r.text
    assert r.json()["message"] == f"body: the batch has {MAX_BATCH + 1} requests; at most {MAX_BATCH} per batch"
    # the limit is configurable, read per request
    monkeypatch.setenv(MAX_BATCH_ENV, "3")
    r = await c.post("/recommend/batch", json={"requests": [{"recent_clusters": [0, 1]}] * 4})
    assert r.status_code == 413 and "at most 3" in r.json()["message"]
    assert (await c.post("/recommend/batch", json={"requests": [{"recent_clusters": [0, 1]}] * 3})).status_code == 200
    monkeypatch.setenv(MAX_BATCH_ENV, "many")
    with pytest.raises(ValueError, match=MAX_BATCH_ENV):
        max_batch()


async def test_batch_body_limit(client: tuple[httpx.AsyncClient, Any], demo: tuple, pg_dsn: str) -> None:
    svc = service_over(pg_dsn)
    assert await svc.reconfigure(demo[1].releases["rel-a"])
    app = make_api(svc, body_limit=1000, batch_body_limit=5000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = json.dumps({"requests": [{"recent_clusters": [0, 1, 2, 3, 4, 5, 6, 7] * 6}] * 8}).encode()
        assert 1000 < len(body) < 5000
        headers = {"content-type": "application/json"}
        assert (await c.post("/recommend/batch", content=body, headers=headers)).status_code == 200
        assert (await c.post("/recommend", content=body, headers=headers)).status_code == 413  # its own limit
        big = b" " * 5001
        r = await c.post("/recommend/batch", content=big, headers=headers)
        assert r.status_code == 413 and "larger than 5000 bytes" in r.json()["message"]
    svc.shutdown()


async def test_outcomes_move(demo: tuple, pg_dsn: str) -> None:
    """The outcome totals (the same calls feed the Ray Serve metrics) count each context by how it was
    answered: table hit, online generation, evidence fallback, popularity."""
    svc = service_over(pg_dsn, StubModel())
    assert await svc.reconfigure({**demo[1].releases["rel-a"], **PATIENT})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:

        async def served() -> dict[str, dict[str, int]]:
            return (await c.get("/release")).json()["served"]

        zero = await served()
        assert zero == {e: {"table_hit": 0, "online": 0, "evidence": 0, "popular": 0} for e in ("recommend", "batch")}
        await c.post("/recommend", json={"recent_clusters": [0, 1]})
        await c.post("/recommend", json={"recent_clusters": list(MISSING_PAIRS[0])})  # a miss, ranked online
        await c.post("/recommend", json={"recent_clusters": [3]})
        assert (await served())["recommend"] == {"table_hit": 1, "online": 1, "evidence": 0, "popular": 1}
        items = [{"recent_clusters": [0, 1]}, {"recent_clusters": [1, 2]}, {"recent_clusters": list(MISSING_PAIRS[1])}]
        assert (await c.post("/recommend/batch", json={"requests": items})).status_code == 200
        assert (await served())["batch"] == {"table_hit": 2, "online": 1, "evidence": 0, "popular": 0}
    svc.shutdown()
    # without a model the misses fall back to evidence (the pair's own), or popularity
    svc = service_over(pg_dsn)
    assert await svc.reconfigure({**demo[1].releases["rel-a"], **PATIENT})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        items = [{"recent_clusters": list(MISSING_PAIRS[0])}, {"recent_clusters": [4, 4]}]
        assert (await c.post("/recommend/batch", json={"requests": items})).status_code == 200
        assert (await c.get("/release")).json()["served"]["batch"] == {
            "table_hit": 0,
            "online": 0,
            "evidence": 1,
            "popular": 1,
        }
    svc.shutdown()


def test_pair_index() -> None:
    import numpy as np

    idx = PairIndex(np.array([0, 0, 3, 7], np.int32), np.array([1, 5, 2, 0], np.int32))
    assert [idx.get(k) for k in [(0, 1), (0, 5), (3, 2), (7, 0)]] == [0, 1, 2, 3]
    assert idx.get((0, 2)) is None and idx.get((9, 9)) is None and idx.get((-1, 0)) is None
    assert len(idx) == 4 and list(idx) == [(0, 1), (0, 5), (3, 2), (7, 0)] and idx[(3, 2)] == 2
    with pytest.raises(ValueError, match="sorted"):
        PairIndex(np.array([3, 0]), np.array([0, 1]))
