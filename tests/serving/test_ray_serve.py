"""The Serve application through a local Ray Serve and its HTTP proxy: one Serve instance for the module, a small
store with a tiny bootstrapped model and LoRA adapter, rollouts through the declarative deploy path."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.net import free_port
from recupdate_workloads.serving.demo_store import MISSING_PAIRS, DemoStore, build_demo_store
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store, connect, migrate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HITS = [(a, b) for a in range(8) for b in range(8) if a != b and (a, b) not in MISSING_PAIRS]
SLOW_OK = {"online_timeout_ms": 10_000}  # the real model must win its race on a busy 2-core machine


class Served:
    def __init__(self, url: str, demo: DemoStore, store: Store, grpc_port: int) -> None:
        self.url = url
        self.grpc_port = grpc_port
        self.demo = demo
        self.store = store

    def uc(self, release: str, **extra: Any) -> dict[str, Any]:
        return {**self.demo.releases[release], **SLOW_OK, **extra}


@pytest.fixture(scope="module")
def served(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import ray

    from recupdate_workloads.serving import deployment as sv

    schema = f"serving_ray_{os.getpid()}"
    conn = connect(pg_dsn)
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    migrate(conn, schema)
    store = Store(dsn=pg_dsn, schema=schema, conn=conn)
    demo = build_demo_store(store, model_dir=tmp_path_factory.mktemp("model"))
    ray_dir = tempfile.mkdtemp(prefix="rsv-", dir="/tmp")  # short: Ray's socket paths are length-limited
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the exporter within 1 s
    started = sv.ensure_local_ray(num_cpus=2, temp_dir=ray_dir)
    port = free_port()
    app = sv.serve_application(
        {**demo.releases["rel-a"], **SLOW_OK}, 1, num_cpus=0.5, env_vars={"RECUPDATE_STORE_DSN": pg_dsn}
    )
    grpc_port = free_port()
    sv.deploy(sv.deploy_config([app], port=port, grpc_port=grpc_port), timeout_s=180)
    try:
        yield Served(f"http://127.0.0.1:{port}", demo, store, grpc_port)
    finally:
        sv.shutdown()
        if started:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        store.close()


def _post(c: httpx.Client, recent: list, n: int = 3) -> dict:
    r = c.post("/recommend", json={"recent_clusters": recent, "n": n})
    assert r.status_code == 200, r.text
    return r.json()


def test_api_on_a_small_store(served: Served) -> None:
    from recupdate_workloads.serving import deployment as sv

    sv.roll(served.uc("rel-a"))
    with httpx.Client(base_url=served.url, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok", "release": "rel-a"}
        info = c.get("/release").json()
        assert info["release_id"] == "rel-a" and info["online_generation"] is True
        assert info["adapter_uri"] == served.demo.adapter_uri and info["base_model"] == served.demo.base_model
        # a table hit
        r = _post(c, [3, 3, 0, 1], n=2)
        assert r["release"] == "rel-a" and [e["source"] for e in r["clusters"]] == ["model", "model"]
        assert {e["id"] for e in r["clusters"]} <= served.demo.sets["rel-a"] - {0, 1}
        # a miss, ranked online by the adapter with the pair's fresh evidence
        own = MISSING_PAIRS[0]
        r = _post(c, list(own), n=4)
        assert [e["source"] for e in r["clusters"]] == ["model"] * 4, r
        assert not set(own) & {e["id"] for e in r["clusters"]}
        scores = [e["score"] for e in r["clusters"]]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)  # log-probabilities
        # fewer than two distinct clusters
        r = _post(c, ["Crime|Documentary"], n=3)
        assert [e["source"] for e in r["clusters"]] == ["popular"] * 3 and 4 not in [e["id"] for e in r["clusters"]]


def test_miss_past_its_time_limit_is_answered_from_evidence(served: Served) -> None:
    from recupdate_workloads.serving import deployment as sv

    sv.roll(served.uc("rel-a", online_timeout_ms=0.01))  # tuning only: same data, a 10 µs limit
    with httpx.Client(base_url=served.url, timeout=30) as c:
        borrowed = MISSING_PAIRS[1]  # no evidence of its own: borrowed from neighbour pairs
        r = _post(c, list(borrowed), n=3)
        assert r["release"] == "rel-a"
        assert r["clusters"][0]["source"] == "evidence", r
        assert {e["source"] for e in r["clusters"]} <= {"evidence", "popular"}
        assert not set(borrowed) & {e["id"] for e in r["clusters"]}
    sv.roll(served.uc("rel-a"))


def test_the_intake_through_the_proxy(served: Served) -> None:
    """POST /v1/interactions on the Serve replica: its own body limit, written to the release's schema with the
    replica's DSN (runtime_env.env_vars), a retry written once."""
    from recupdate_workloads.serving.intake import INTAKE_MAX_BODY_BYTES
    from recupdate_workloads.store.owner import Owner, claim_owner

    claim_owner(served.store.conn, served.store.schema, Owner("ns", "serve-test"))
    with served.store.tx() as conn:
        items = [r[0] for r in conn.execute("SELECT external FROM items ORDER BY item_id LIMIT 5").fetchall()]
    events = [
        {"user": f"proxy-{i}", "item": items[i % len(items)], "ts": 1_900_000_000 + i, "event_id": f"px-{i}"}
        for i in range(4000)
    ]
    body = json.dumps({"events": events}).encode()
    assert len(body) > 256 * 1024  # over /recommend's limit, within the intake's
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        out = c.post("/v1/interactions", content=body, headers=headers).json()
        assert (out["accepted"], out["store_schema"]) == (4000, served.store.schema), out
        assert c.post("/v1/interactions", content=body, headers=headers).json()["duplicates"] == 4000
        big = b" " * (INTAKE_MAX_BODY_BYTES + 1)
        assert c.post("/v1/interactions", content=big, headers=headers).status_code == 413
        bad = c.post("/v1/interactions", json={"events": [{"user": "u", "item": "no-such-item", "ts": 0}]})
        assert bad.status_code == 422 and bad.json()["reasons"] == {"unknown_item": 1}
    with served.store.tx() as conn:
        assert conn.execute("SELECT count(*) FROM interactions WHERE event_id LIKE 'px-%'").fetchone() == (4000,)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"recent_clusters": [0, 1], "n": 0}, "n"),
        ({"recent_clusters": [0, 1], "n": "three"}, "n"),
        ({"recent_clusters": [0, "no such cluster"]}, "recent_clusters.1"),
        ({"recent_clusters": list(range(8)) * 13}, "recent_clusters"),
        ({"recent_clusters": [0, 1], "extra": True}, "extra"),
        (b"not json at all", "body"),
    ],
)
def test_invalid_requests_get_422_through_the_proxy(served: Served, body: Any, where: str) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as c:
        if isinstance(body, bytes):
            r = c.post("/recommend", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(where)


@pytest.mark.parametrize("background", [True, False], ids=["background-swap", "awaited-swap"])
async def test_rollouts_under_load_drop_no_request_and_never_mix(served: Served, background: bool) -> None:
    """Both swap modes: the default for one replica (load in the background, the replica keeps serving) and
    the awaited one (Serve holds requests back from the replica while it reconfigures)."""
    from recupdate_workloads.serving import deployment as sv

    sets = served.demo.sets
    await asyncio.to_thread(sv.roll, served.uc("rel-a", background_swap=background))
    stop = asyncio.Event()
    ok: dict[str, int] = {"rel-a": 0, "rel-b": 0}
    failures: list[str] = []

    async def worker(c: httpx.AsyncClient, i: int) -> None:
        k = i
        while not stop.is_set():
            a, b = HITS[k % len(HITS)]
            k += 5
            try:
                r = await c.post("/recommend", json={"recent_clusters": [a, b], "n": 2})
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text}")
                continue
            out = r.json()
            rel = out["release"]
            ok[rel] += 1
            ids = {e["id"] for e in out["clusters"]}
            if len(ids) != 2 or not ids <= sets[rel]:
                failures.append(f"mixed or wrong answer: {out}")

    roll_s = []
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as c:
        tasks = [asyncio.create_task(worker(c, i)) for i in range(6)]
        await asyncio.sleep(0.5)
        target = "rel-a"
        for _ in range(6):
            target = "rel-b" if target == "rel-a" else "rel-a"
            t0 = time.perf_counter()
            await asyncio.to_thread(sv.roll, served.uc(target, background_swap=background))
            roll_s.append(time.perf_counter() - t0)
            # once roll() returns, the (single) replica serves the new release
            r = await c.post("/recommend", json={"recent_clusters": [0, 1], "n": 2})
            assert r.json()["release"] == target
            await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
    assert not failures, failures[:5]
    assert ok["rel-a"] > 20 and ok["rel-b"] > 20, ok
    assert max(roll_s) < 30, roll_s
    await asyncio.to_thread(sv.roll, served.uc("rel-a", background_swap=True))


def test_broken_release_keeps_the_old_one_serving(served: Served) -> None:
    from recupdate_workloads.serving import deployment as sv

    sv.roll(served.uc("rel-b"))
    reg.register_release(
        served.store,
        reg.Release(
            release_id="rel-broken",
            base_model=served.demo.base_model or "none",
            adapter_uri=served.demo.adapter_uri,
            snapshot_id=served.demo.snapshot_id,
            table_version=999,
            prompt_hash=None,
        ),
    )
    broken = {**served.uc("rel-b"), "release_id": "rel-broken", "table_version": 999}
    sv.roll(broken)
    deployed = sv.deployed_user_config() or {}
    assert {k: deployed.get(k) for k in broken} == broken  # Serve applied it; the replica refused to switch
    with httpx.Client(base_url=served.url, timeout=30) as c:
        info = c.get("/release").json()
        assert info["release_id"] == "rel-b" and info["table_version"] == served.demo.table_versions["rel-b"]
        assert info["last_reconfigure_failed"] is True and info["last_reconfigure_target"] == "rel-broken"
        assert "table version 999 is not published" in info["last_reconfigure_error"]
        assert c.get("/healthz").status_code == 200
        r = _post(c, [0, 5], n=2)
        assert r["release"] == "rel-b" and {e["id"] for e in r["clusters"]} <= served.demo.sets["rel-b"]
        sv.roll(served.uc("rel-a"))
        info = c.get("/release").json()
        assert info["release_id"] == "rel-a" and info["last_reconfigure_failed"] is False
    assert Path(served.demo.adapter_uri or "").exists()


def test_batch_through_the_proxy(served: Served) -> None:
    from recupdate_workloads.serving import deployment as sv

    sv.roll(served.uc("rel-a"))
    items = [{"recent_clusters": [a, b], "n": 3} for a, b in HITS[:20]] + [{"recent_clusters": [2]}]
    with httpx.Client(base_url=served.url, timeout=30) as c:
        r = c.post("/recommend/batch", json={"requests": items})
        assert r.status_code == 200, r.text
        assert r.json()["results"] == [_post(c, it["recent_clusters"], it.get("n", 10)) for it in items]
        over = c.post("/recommend/batch", json={"requests": items * 20})
        assert over.status_code == 413 and "at most 256" in over.json()["message"]


def test_grpc_through_the_proxy(served: Served) -> None:
    """Serve's gRPC proxy routes recupdate.v1.Recommender to the replica: the HTTP API's answers, its errors as
    gRPC status codes."""
    import grpc

    from recupdate_workloads.serving import deployment as sv
    from recupdate_workloads.serving import grpc_api as g

    sv.roll(served.uc("rel-a"))
    contexts = [[a, b] for a, b in HITS[:10]] + [[2]]
    with (
        grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as ch,
        httpx.Client(base_url=served.url, timeout=30) as c,
    ):
        stub = g.RecommenderStub(ch, application=sv.APP_NAME)
        for recent in contexts:
            got = stub.Recommend(g.request_message(recent, 3), metadata=stub.metadata, timeout=30)
            assert g.response_dict(got) == _post(c, recent, 3)
        batch = g.RecommendBatchRequestMessage(requests=[g.request_message(r, 3) for r in contexts])
        out = stub.RecommendBatch(batch, metadata=stub.metadata, timeout=30)
        assert [g.response_dict(r) for r in out.results] == [_post(c, r, 3) for r in contexts]
        with pytest.raises(grpc.RpcError) as exc:
            stub.Recommend(g.request_message([0, 1], n=101), metadata=stub.metadata, timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "n: Input should be less than or equal to 100" in exc.value.details()


def _scrape(name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, from this node's Prometheus exporter."""
    import urllib.request

    import ray

    port = ray._private.worker._global_node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_serving_metrics_reach_prometheus(served: Served) -> None:
    """The serving metrics go through Ray's exporter, tagged with the deployment, and move with requests."""
    from recupdate_workloads.serving import deployment as sv

    sv.roll(served.uc("rel-a"))
    hits = "ray_recupdate_serve_outcomes_total"
    tags = {"deployment": "Recommender", "endpoint": "recommend", "outcome": "table_hit"}
    before = _scrape(hits, **tags)
    lat_before = _scrape("ray_recupdate_serve_latency_ms_count", endpoint="recommend")
    batch_before = _scrape(hits, endpoint="batch", outcome="table_hit")
    with httpx.Client(base_url=served.url, timeout=30) as c:
        for a, b in HITS[:7]:
            _post(c, [a, b])
        assert c.post("/recommend/batch", json={"requests": [{"recent_clusters": [0, 1]}] * 5}).status_code == 200
        assert c.post("/recommend", json={"recent_clusters": [0, 1], "n": 0}).status_code == 422
    deadline = time.monotonic() + 60
    while True:
        moved = {
            "hits": _scrape(hits, **tags) - before,
            "batch": _scrape(hits, endpoint="batch", outcome="table_hit") - batch_before,
            "latency": _scrape("ray_recupdate_serve_latency_ms_count", endpoint="recommend") - lat_before,
            "422": _scrape("ray_recupdate_serve_requests_total", endpoint="recommend", code="422"),
            "version": _scrape("ray_recupdate_serve_table_version", deployment="Recommender"),
        }
        # at least: the exporter lags, so `before` may miss earlier tests' requests that arrive later
        if moved["hits"] >= 7 and moved["batch"] >= 5 and moved["latency"] >= 8 and moved["422"] >= 1:
            break
        assert time.monotonic() < deadline, moved
        time.sleep(0.5)
    assert moved["version"] == served.demo.table_versions["rel-a"]
    sv.roll(served.uc("rel-b"))
    deadline = time.monotonic() + 60
    while _scrape("ray_recupdate_serve_table_version", deployment="Recommender") != served.demo.table_versions["rel-b"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    sv.roll(served.uc("rel-a"))
