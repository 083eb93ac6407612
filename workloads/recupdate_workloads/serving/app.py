"""The recommender's HTTP API, without Ray: the same FastAPI app runs inside a Ray Serve replica
(deployment.py) and under plain uvicorn (the benchmark's baseline). The request models are in schema.py, the
release bundle in release.py and the request handling in service.py.

A release is held in memory as one immutable ``Loaded`` bundle (catalogue, transition table, popularity,
optional model, a store connection for fresh evidence). ``RecommenderService.reconfigure`` builds the next
bundle beside the current one and swaps it in with one reference assignment; a request reads the reference
once, so a response never mixes two releases. When a load fails, the current bundle keeps serving and
``/release`` says why.

Answering ``(c1, c2)`` (the last two distinct clusters, c2 the newest):
1. a table hit: the precomputed ranking (source ``model`` or ``evidence``, as the table recorded it);
2. a miss: fresh evidence for the pair (its own in the current snapshot, or borrowed from neighbour pairs),
   then the adapter ranks every cluster online within ``online_timeout_ms`` (source ``model``); past the
   limit, or without a model, the evidence answers (``evidence``); without evidence, popularity (``popular``);
3. fewer than two distinct clusters: the most popular clusters, excluding the known one (``popular``).
Short answers are filled up to ``n`` from popularity. Online rankings are cached per bundle, including those
that finished after their request had given up waiting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from recupdate_workloads.serving.schema import RecommendRequest, RecommendResponse, UnknownClusters
from recupdate_workloads.serving.service import RecommenderService

log = logging.getLogger("recupdate.serving")


def _summary(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            where = list(e.get("loc", ()))
            why = (e.get("ctx") or {}).get("error") or e.get("msg")
            parts.append(f"body: invalid JSON at character {where[-1] if len(where) > 1 else 0}: {why}")
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def _safe(v: Any, limit: int = 200) -> Any:
    """A value as echoed back in an error: JSON-safe (no inf/nan) and short."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else str(v)
    text = v if isinstance(v, str) else json.dumps(jsonable_encoder(v), default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _invalid(errors: Sequence[Mapping[str, Any]], hint: str = "") -> JSONResponse:
    errs = []
    for e in errors:
        out = {k: e[k] for k in ("type", "loc", "msg") if k in e}
        out["loc"] = list(out.get("loc", ()))
        if "input" in e:
            out["input"] = _safe(e["input"])
        if e.get("ctx"):
            out["ctx"] = {str(k): _safe(v) for k, v in e["ctx"].items()}
        errs.append(out)
    return JSONResponse(status_code=422, content={"message": hint + _summary(errs), "detail": errs})


def make_api(service: RecommenderService, lifespan: Any = None) -> FastAPI:
    """The FastAPI app over a service: POST /recommend, GET /healthz, GET /release."""
    api = FastAPI(
        title="recupdate recommender",
        description="Next novel interest clusters from the transition table of the active release.",
        version="1",
        lifespan=lifespan,
    )

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        hint = "" if "json" in ctype else f"send Content-Type: application/json (got {ctype or 'none'!r}); "
        return _invalid(exc.errors(), hint)

    @api.exception_handler(UnknownClusters)
    async def _on_unknown(request: Request, exc: UnknownClusters) -> JSONResponse:
        return _invalid(exc.errors)

    @api.post(
        "/recommend",
        response_model=RecommendResponse,
        responses={422: {"description": "Invalid request: the message says what and where."}},
    )
    async def recommend(req: RecommendRequest) -> Response:
        return Response(content=await service.recommend(req), media_type="application/json")

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        b = service.loaded
        if b is None:
            return JSONResponse(status_code=503, content={"status": "loading", "error": service.last_error})
        return JSONResponse({"status": "ok", "release": b.release_id})

    @api.get("/release")
    async def release() -> JSONResponse:
        return JSONResponse(service.release_info())

    return api


USER_CONFIG_ENV = "RECUPDATE_SERVE_USER_CONFIG"


def create_app() -> FastAPI:
    """The same app without Ray, for ``uvicorn --factory recupdate_workloads.serving.app:create_app``: the release
    comes from ``$RECUPDATE_SERVE_USER_CONFIG`` (a user_config as JSON) and loads at start-up."""
    from contextlib import asynccontextmanager

    service = RecommenderService()
    raw = os.environ.get(USER_CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"set ${USER_CONFIG_ENV} to a release's user_config (JSON)")
    user_config = json.loads(raw)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if not await service.reconfigure(user_config):
            log.error("release failed to load: %s", service.last_error)
        yield
        service.shutdown()

    return make_api(service, lifespan=lifespan)
