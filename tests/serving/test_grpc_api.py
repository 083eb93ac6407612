"""The gRPC API (serving.grpc_api) in-process, without Ray: the replica's handling of the request bytes Serve's
gRPC proxy passes through, against the HTTP API over the same service (tests/serving/test_ray_serve.py runs it
through the real proxy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.serving import service_over
from recupdate_workloads.serving import grpc_api as g
from recupdate_workloads.serving.demo_store import MISSING_PAIRS
from recupdate_workloads.serving.schema import RecommendRequest
from recupdate_workloads.serving.service import RecommenderService

HITS = [(a, b) for a in range(8) for b in range(8) if a != b and (a, b) not in MISSING_PAIRS]


async def _grpc(svc: RecommenderService, msg: Any, *, batch: bool = False, limit: int = 1 << 20) -> Any:
    data = msg if isinstance(msg, bytes) else msg.SerializeToString()
    return await g.handle_recommend(svc, data, batch=batch, limit=limit)


async def _refused(svc: RecommenderService, msg: Any, **kw: Any) -> g.GrpcError:
    with pytest.raises(g.GrpcError) as exc:
        await _grpc(svc, msg, **kw)
    return exc.value


def test_the_proto_file_is_the_descriptor() -> None:
    shipped = Path(g.__file__).with_name("recommender.proto").read_text()
    assert shipped == g.proto_text(), "regenerate recommender.proto from grpc_api.proto_text()"
    fd = g.file_descriptor()
    assert [m.name for m in fd.service[0].method] == ["Recommend", "RecommendBatch"]
    # a request survives the wire with ids and names in order; empty user id and n mean the defaults
    msg = g.RecommendRequestMessage.FromString(g.request_message([3, "Drama", 0], n=0).SerializeToString())
    req = RecommendRequest.model_validate(g._request_dict(msg))
    assert (req.user_id, req.recent_clusters, req.n) == (None, [3, "Drama", 0], 10)
    full = g.RecommendRequestMessage.FromString(g.request_message([1, 2], n=4, user_id="u7").SerializeToString())
    assert g._request_dict(full) == {"user_id": "u7", "recent_clusters": [1, 2], "n": 4}


async def test_answers_equal_the_http_api(client: tuple[httpx.AsyncClient, Any]) -> None:
    c, svc = client
    contexts: list[tuple[list[Any], int]] = [([a, b], 3) for a, b in HITS[:12]]
    contexts += [([2], 4), ([], 2), (["Action|Adventure", "adventure animation"], 2), ([5, 0, 0, 1, 1], 8)]
    for recent, n in contexts:
        http = (await c.post("/recommend", json={"recent_clusters": recent, "n": n})).json()
        assert g.response_dict(await _grpc(svc, g.request_message(recent, n))) == http, recent
    batch = g.RecommendBatchRequestMessage(requests=[g.request_message(r, n) for r, n in contexts])
    out = await _grpc(svc, batch, batch=True)
    http = (
        await c.post("/recommend/batch", json={"requests": [{"recent_clusters": r, "n": n} for r, n in contexts]})
    ).json()
    assert [g.response_dict(r) for r in out.results] == http["results"] and out.release == http["release"]


async def test_bad_requests_get_the_http_messages_as_status(client: tuple[httpx.AsyncClient, Any]) -> None:
    c, svc = client
    cases: list[tuple[Any, str, str]] = [
        (g.request_message([0, 1], n=101), "INVALID_ARGUMENT", "n: Input should be less than or equal to 100"),
        (g.request_message([0, "no such cluster"]), "INVALID_ARGUMENT", "recent_clusters.1"),
        (g.request_message(list(range(101))), "INVALID_ARGUMENT", "recent_clusters: List should have at most 100"),
        (g.RecommendRequestMessage(recent_clusters=[g.ClusterRef()]), "INVALID_ARGUMENT", "cluster id (integer)"),
        (b"\xff\xff\xff", "INVALID_ARGUMENT", "not a recupdate.v1.RecommendRequest message"),
    ]
    for msg, code, text in cases:
        err = await _refused(svc, msg)
        assert err.code == code and text in err.message, (err.code, err.message)
    # the same words as the HTTP API's 422 for the same request
    http = await c.post("/recommend", json={"recent_clusters": [0, 1], "n": 101})
    assert (await _refused(svc, g.request_message([0, 1], n=101))).message == http.json()["message"]
    # limits: a message over its size limit is refused unparsed, a batch over max_batch() as HTTP's 413
    big = g.request_message([0, 1], user_id="u" * 200)
    err = await _refused(svc, big, limit=100)
    assert err.code == "RESOURCE_EXHAUSTED" and "at most 100" in err.message
    over = g.RecommendBatchRequestMessage(requests=[g.request_message([0, 1])] * 257)
    err = await _refused(svc, over, batch=True)
    assert err.code == "RESOURCE_EXHAUSTED" and "at most 256 per batch" in err.message
    empty = await _refused(svc, g.RecommendBatchRequestMessage(), batch=True)
    assert empty.code == "INVALID_ARGUMENT" and empty.message.startswith("requests:")
    bad_item = g.RecommendBatchRequestMessage(requests=[g.request_message([0, 1]), g.request_message([0, "nope"])])
    err = await _refused(svc, bad_item, batch=True)
    assert err.code == "INVALID_ARGUMENT" and "requests.1.recent_clusters.1" in err.message


async def test_no_release_is_unavailable(pg_dsn: str) -> None:
    svc = service_over(pg_dsn)
    try:
        err = await _refused(svc, g.request_message([0, 1]))
        assert err.code == "UNAVAILABLE" and "no release loaded yet" in err.message
    finally:
        svc.shutdown()


class _Context:
    def __init__(self) -> None:
        self.code: Any = None
        self.details = ""

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


async def test_serve_grpc_sets_the_status_on_the_context(client: tuple[httpx.AsyncClient, Any]) -> None:
    import grpc

    _, svc = client
    ctx = _Context()
    ok = await g.serve_grpc(svc, g.request_message([0, 1]).SerializeToString(), ctx, batch=False, limit=1 << 20)
    assert ok.clusters and ctx.code is None
    out = await g.serve_grpc(svc, b"\xff", ctx, batch=True, limit=1 << 20)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "RecommendBatchRequest" in ctx.details
    assert not out.results  # an empty answer beside the status
