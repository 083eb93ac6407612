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

Bad requests never get a 5xx and never hold up other requests. A body over ``MAX_BODY_BYTES`` (256 KiB; set
``$RECUPDATE_SERVE_MAX_BODY_BYTES`` to change it, e.g. in the Serve application's ``runtime_env.env_vars``)
is answered 413 before it is read, whatever the endpoint, with or without a Content-Length. JSON is parsed
strictly (``parse_json``: invalid UTF-8, lone surrogates and nesting deeper than ``MAX_JSON_DEPTH`` are 422s)
and a 422 echoes at most ``MAX_ECHOED_ERRORS`` errors in at most ``MAX_ERROR_BODY_BYTES``, each input cut to
a short preview while it is walked.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recupdate_workloads.contract.env import positive_int
from recupdate_workloads.serving.intake import (
    INTAKE_PATH,
    Intake,
    IntakeResult,
    IntakeUnavailable,
    InteractionBatch,
    intake_enabled,
    intake_max_body_bytes,
)
from recupdate_workloads.serving.metrics import ServingMetrics
from recupdate_workloads.serving.release import swap_duty
from recupdate_workloads.serving.schema import (
    BATCH_TOO_LARGE,
    RecommendBatchRequest,
    RecommendBatchResponse,
    RecommendRequest,
    RecommendResponse,
    UnknownClusters,
    max_batch,
)
from recupdate_workloads.serving.service import RecommenderService

log = logging.getLogger("recupdate.serving")


# Limits on what a bad request may cost. The largest valid /recommend body (100 names of 200 characters and a
# 256-character user id, every character written as a 12-byte surrogate-pair escape) is about 244 KB, so
# MAX_BODY_BYTES refuses no valid request; the slowest body at the limit (all empty lists) parses in ~15 ms.
MAX_BODY_BYTES = 256 * 1024
MAX_BODY_BYTES_ENV = "RECUPDATE_SERVE_MAX_BODY_BYTES"
# A batch's own body limit: 8 KiB per context at the default 256 (a page of typical contexts is ~60 bytes each).
BATCH_PATH = "/recommend/batch"
MAX_BATCH_BODY_BYTES = 2 * 1024 * 1024
MAX_BATCH_BODY_BYTES_ENV = "RECUPDATE_SERVE_MAX_BATCH_BODY_BYTES"
MAX_JSON_DEPTH = 200  # pydantic-core's JSON parser refuses deeper nesting (its fixed limit, give or take one)
MAX_ECHOED_ERRORS = 10  # an error response lists at most this many errors (and says how many it left out)
MAX_ERROR_BODY_BYTES = 16 * 1024  # and stops listing errors before it would grow past this
_ECHO_CHARS = 200  # an echoed input is cut to about this many characters
_NAME_CHARS = 64  # a key or type name within an error
_MSG_CHARS = 300
_LOC_ITEMS = 12
_CTX_ITEMS = 6


def max_body_bytes(
    environ: Mapping[str, str] | None = None, name: str = MAX_BODY_BYTES_ENV, default: int = MAX_BODY_BYTES
) -> int:
    """The request-size limit: ``$RECUPDATE_SERVE_MAX_BODY_BYTES`` (or ``name``; a positive integer) when set,
    else MAX_BODY_BYTES (``default``). A bad value fails start-up with a clear error rather than serving
    unbounded."""
    return positive_int(name, default, environ, unit="bytes")


def batch_max_body_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The batch endpoint's request-size limit: ``$RECUPDATE_SERVE_MAX_BATCH_BODY_BYTES`` or MAX_BATCH_BODY_BYTES."""
    return max_body_bytes(environ, name=MAX_BATCH_BODY_BYTES_ENV, default=MAX_BATCH_BODY_BYTES)


_TIMED = {"/recommend": "recommend", BATCH_PATH: "batch"}


class Timed:
    """ASGI middleware: the latency and status code of every /recommend and /recommend/batch request, into the
    serving metrics (the whole request in the app: reading the body, validation, the answer)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http":
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            endpoint = _TIMED.get(path)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        code = 500

        async def send_code(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_code)
        finally:
            self.metrics.request(endpoint, code, (time.perf_counter() - t0) * 1000)


def _error_body(message: str, errors: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> bytes:
    # The texts are cleaned of lone surrogates (_text); backslashreplace is the net should one slip through.
    body = json.dumps(
        {"message": message, "detail": errors, **(extra or {})},
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    )
    return body.encode("utf-8", "backslashreplace")


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` is answered 413 before anything parses it.
    A declared Content-Length is checked before reading; otherwise (chunked bodies) the bytes are counted as
    they arrive and reading stops at the limit. The body, once complete, is handed to the app in one message.
    The unread rest of a refused body is drained and dropped by the server (uvicorn), so the client still
    reads the 413 and the connection stays usable."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})  # exact paths (below the root path) with limits of their own

    def limit(self, scope: Scope) -> int:
        if not self.per_path:
            return self.max_bytes
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # Serve passes the route prefix as root_path, the full path as path
            path = path[len(root) :]
        return self.per_path.get(path, self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                with contextlib.suppress(ValueError):  # malformed: the server refuses those; count instead
                    if int(value) > max_bytes:
                        await self._too_large(send, max_bytes)
                        return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                await self._too_large(send, max_bytes)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        first: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()  # after the body: waits for http.disconnect, as the server's receive does

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, max_bytes: int) -> None:
        msg = f"the request body is larger than {max_bytes} bytes"
        body = _error_body(
            f"body: {msg}",
            [{"type": "body_too_large", "loc": ["body"], "msg": msg, "ctx": {"max_bytes": max_bytes}}],
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


_JITER_ERROR = re.compile(r"(?s)(.*) at line (\d+) column (\d+)")
_SURROGATE = "lone surrogate escape (\\ud800-\\udfff must come as a high-low pair)"
_JITER_MESSAGES = {  # the parser's wording, where it does not say what is wrong
    "unexpected end of hex escape": _SURROGATE,
    "lone leading surrogate in hex escape": _SURROGATE,
    "invalid unicode code point": "invalid UTF-8",
    "recursion limit exceeded": f"nested more than {MAX_JSON_DEPTH} levels deep",
}


def parse_json(body: bytes) -> Any:
    """A request body as JSON, strictly: valid UTF-8 only, no lone surrogates (escaped or raw), nesting at most
    MAX_JSON_DEPTH deep, integers of at most 4300 digits; NaN and Infinity are read (validation refuses them
    where a number must be finite). Raises json.JSONDecodeError, which FastAPI answers with a 422."""
    # A body of many small containers (256 KiB of []) set off collections over the whole heap while it was
    # parsed: median 110 ms, 15 ms without. The parser holds the GIL, so only its own (acyclic) objects skip them.
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return from_json(body, allow_inf_nan=True)
    except ValueError as exc:
        m = _JITER_ERROR.fullmatch(str(exc))
        if m is None:
            raise json.JSONDecodeError(str(exc), "", 0) from None
        why, line, column = _JITER_MESSAGES.get(m[1], m[1]), int(m[2]), int(m[3])
        start = 0
        if line > 1:  # the byte where that line starts (the parser counts columns in bytes)
            head = re.match(rb"(?:[^\n]*\n){%d}" % (line - 1), body)
            start = head.end() if head else 0
        at = min(len(body), max(0, start + column - 1))
        pos = len(body[:at].decode("utf-8", "replace"))  # as a character offset
        raise json.JSONDecodeError(why, "", pos) from None
    finally:
        if paused:
            gc.enable()


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read by parse_json (FastAPI's documented custom-Request hook): the standard
    library's parser would let lone surrogates through, which the response cannot encode, and would spend
    unbounded time on deep nesting."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _text(s: str, limit: int) -> str:
    """At most ``limit`` characters of ``s`` (then "..."), lone surrogates written as \\udXXX (unencodable)."""
    cut = s[:limit]
    if any("\ud800" <= ch <= "\udfff" for ch in cut):
        cut = cut.encode("utf-8", "backslashreplace").decode("utf-8")
    return cut + "..." if len(s) > limit else cut


def _int_text(v: int) -> str:
    if v.bit_length() > 4000:  # str() of a huge int is slow and may raise (sys.set_int_max_str_digits)
        return f"<an integer of about {int(v.bit_length() * 0.30103) + 1} digits>"
    return str(v)


def _preview(v: Any, limit: int) -> str:
    """JSON-like text of any value, at most about ``limit`` characters, built while walking: a container is
    visited only as far as the text has room, so a huge or deep input costs no more than a small one."""
    out: list[str] = []
    room = limit

    def put(s: str) -> None:
        nonlocal room
        if room > 0:
            out.append(s[:room])
            room -= len(s)

    def walk(x: Any) -> None:
        if room <= 0:
            return
        if isinstance(x, Mapping):
            put("{")
            for i, (k, val) in enumerate(x.items()):
                if room <= 0:
                    return
                put(", " if i else "")
                walk(k if isinstance(k, str) else str(k))
                put(": ")
                walk(val)
            put("}")
        elif isinstance(x, (list, tuple)):
            put("[")
            for i, item in enumerate(x):
                if room <= 0:
                    return
                put(", " if i else "")
                walk(item)
            put("]")
        elif isinstance(x, str):
            put(json.dumps(_text(x, room), ensure_ascii=False))
        elif x is None or isinstance(x, bool):
            put(json.dumps(x))
        elif isinstance(x, int):
            put(_int_text(x))
        elif isinstance(x, float):
            put(repr(x) if np.isfinite(x) else str(x))
        elif isinstance(x, (bytes, bytearray, memoryview)):
            put(json.dumps(_text(bytes(x[: room + 1]).decode("utf-8", "backslashreplace"), room)))
        else:
            put(_text(str(x), room))

    walk(v)
    text = "".join(out)
    return text if room >= 0 else text + "..."


def _safe(v: Any, limit: int = _ECHO_CHARS) -> Any:
    """A value as echoed back in an error: JSON-safe (no inf/nan, no lone surrogates) and short, whatever its
    size; containers become a preview string."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if abs(v) < 2**63 else _text(_int_text(v), limit)
    if isinstance(v, float):
        return v if np.isfinite(v) else str(v)
    if isinstance(v, str):
        return _text(v, limit)
    return _preview(v, limit)


def _echo(e: Mapping[str, Any]) -> dict[str, Any]:
    """One error as answered: its type, location, message, input and context, each bounded."""
    raw_loc = e.get("loc", ())
    loc: list[Any] = [
        x if isinstance(x, int) and not isinstance(x, bool) else _text(str(x), _NAME_CHARS)
        for x in itertools.islice(raw_loc, _LOC_ITEMS)
    ]
    if len(raw_loc) > _LOC_ITEMS:
        loc.append("...")
    out: dict[str, Any] = {"type": _text(str(e.get("type", "")), _NAME_CHARS), "loc": loc}
    if "msg" in e:
        out["msg"] = _text(str(e["msg"]), _MSG_CHARS)
    if "input" in e:
        out["input"] = _safe(e["input"])
    ctx = e.get("ctx")
    if isinstance(ctx, Mapping) and ctx:
        out["ctx"] = {_text(str(k), _NAME_CHARS): _safe(v) for k, v in itertools.islice(ctx.items(), _CTX_ITEMS)}
    return out


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


def _echoes(errors: Sequence[Mapping[str, Any]], reserved: int = 0) -> list[dict[str, Any]]:
    """The first errors as answered: at most MAX_ECHOED_ERRORS, each bounded (_echo), no more once the body
    (``reserved`` bytes besides) would pass MAX_ERROR_BODY_BYTES; the first is always listed."""
    errs: list[dict[str, Any]] = []
    size = reserved + 100
    for e in itertools.islice(errors, MAX_ECHOED_ERRORS):
        echo = _echo(e)
        # an error's share of the body: its entry, and its part of the message
        cost = 2 * len(json.dumps(echo, ensure_ascii=False).encode("utf-8", "backslashreplace")) + 4
        if errs and size + cost > MAX_ERROR_BODY_BYTES:
            break
        errs.append(echo)
        size += cost
    return errs


def _message(errors: Sequence[Mapping[str, Any]], errs: Sequence[Mapping[str, Any]], hint: str = "") -> str:
    message = hint + _summary(errs)
    if len(errors) > len(errs):
        message += f" (and {len(errors) - len(errs)} more errors)"
    return message


def invalid_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """The message of a 422 (or 413) answer for these validation errors, bounded as the answer is; the gRPC
    API (serving.grpc_api) words its INVALID_ARGUMENT details with it."""
    return _message(errors, _echoes(errors))


def _invalid(errors: Sequence[Mapping[str, Any]], hint: str = "", extra: Mapping[str, Any] | None = None) -> Response:
    """The 422 answer (413 for a batch over its limit): the first errors (_echoes); the message says how many
    were left out. Its cost does not grow with the input: nothing is serialised whole and cut afterwards.
    ``extra``: further keys of the body."""
    errs = _echoes(errors, len(hint.encode()))
    message = _message(errors, errs, hint)
    code = 413 if any(e.get("type") == BATCH_TOO_LARGE for e in errs) else 422
    return Response(_error_body(message, errs, extra), status_code=code, media_type="application/json")


def make_api(
    service: RecommenderService,
    lifespan: Any = None,
    *,
    body_limit: int | None = None,
    intake_body_limit: int | None = None,
    batch_body_limit: int | None = None,
) -> FastAPI:
    """The FastAPI app over a service: POST /recommend, POST /recommend/batch, GET /healthz, GET /release, and
    the event intake POST /v1/interactions (``service.intake``; off with ``$RECUPDATE_INTAKE=off``). Request
    bodies larger than ``body_limit`` bytes (default: max_body_bytes(), from the environment) are answered 413
    unread; the batch and the intake have their own limits, ``batch_body_limit`` (default:
    ``$RECUPDATE_SERVE_MAX_BATCH_BODY_BYTES`` or MAX_BATCH_BODY_BYTES) and ``intake_body_limit`` (default:
    intake_max_body_bytes()). A batch carries at most max_batch() contexts (``$RECUPDATE_SERVE_MAX_BATCH``)."""
    api = FastAPI(
        title="recupdate recommender",
        description="Next novel interest clusters from the transition table of the active release.",
        version="1",
        lifespan=lifespan,
    )
    api.router.route_class = StrictJSONRoute
    with_intake = service.intake is not None and intake_enabled()
    max_batch()  # a bad $RECUPDATE_SERVE_MAX_BATCH fails here, at start-up
    swap_duty()  # and a bad $RECUPDATE_SERVE_SWAP_DUTY
    per_path = {BATCH_PATH: batch_max_body_bytes() if batch_body_limit is None else batch_body_limit}
    if with_intake:
        per_path[INTAKE_PATH] = intake_max_body_bytes() if intake_body_limit is None else intake_body_limit
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes() if body_limit is None else body_limit, per_path=per_path)
    api.add_middleware(Timed, metrics=service.metrics)  # added last: the outermost, so 413s are counted too

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
        ctype = request.headers.get("content-type", "")
        hint = "" if "json" in ctype else f"send Content-Type: application/json (got {_text(ctype, 80) or 'none'!r}); "
        return _invalid(exc.errors(), hint)

    @api.exception_handler(UnknownClusters)
    async def _on_unknown(request: Request, exc: UnknownClusters) -> Response:
        return _invalid(exc.errors)

    @api.post(
        "/recommend",
        response_model=RecommendResponse,
        responses={422: {"description": "Invalid request: the message says what and where."}},
    )
    async def recommend(req: RecommendRequest) -> Response:
        return Response(content=await service.recommend(req), media_type="application/json")

    @api.post(
        BATCH_PATH,
        response_model=RecommendBatchResponse,
        responses={
            413: {"description": "More contexts than the batch limit, or a body over its size limit."},
            422: {"description": "Invalid items: the message names each one (requests.<index>.<field>)."},
        },
    )
    async def recommend_batch(batch: RecommendBatchRequest) -> Response:
        """Many contexts in one request, all answered from the same release; each result is what /recommend
        answers for that context."""
        return Response(content=await service.recommend_batch(batch.requests), media_type="application/json")

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        b = service.loaded
        if b is None:
            return JSONResponse(status_code=503, content={"status": "loading", "error": service.last_error})
        return JSONResponse({"status": "ok", "release": b.release_id})

    @api.get("/release")
    async def release() -> JSONResponse:
        return JSONResponse(service.release_info())

    if with_intake and service.intake is not None:
        _add_intake(api, service.intake)
    return api


def _add_intake(api: FastAPI, intake: Intake) -> None:
    @api.post(
        INTAKE_PATH,
        response_model=IntakeResult,
        summary="Append a batch of interaction events",
        responses={
            413: {"description": "The body is larger than the intake's limit; nothing was read."},
            422: {"description": "Not a batch, or no event of it could be written; nothing was written."},
            503: {"description": "Nothing can be written now (no release yet, schema not ready, store down)."},
        },
    )
    async def interactions(batch: InteractionBatch) -> Response:
        """Valid events are written and the invalid ones reported by index and reason (docs/data.md)."""
        try:
            out = await intake.submit(batch.events)
        except IntakeUnavailable as exc:
            body = _error_body(_text(str(exc), _MSG_CHARS), [])
            return Response(body, status_code=503, media_type="application/json", headers={"Retry-After": "5"})
        rejected = [e.index for e in out.errors]
        if out.accepted == 0 and out.duplicates == 0:
            return _invalid(
                [e.as_error() for e in out.errors],
                f"no event of the batch could be written ({len(rejected)} rejected): ",
                {"reasons": out.reasons, "rejected_rows": rejected},
            )
        result = {
            "read": out.read,
            "accepted": out.accepted,
            "duplicates": out.duplicates,
            "rejected": len(rejected),
            "reasons": out.reasons,
            "rejected_rows": rejected,
            "detail": _echoes([e.as_error() for e in itertools.islice(out.errors, MAX_ECHOED_ERRORS)]),
            "store_schema": out.schema,
        }
        return Response(_compact(result), media_type="application/json")


def _compact(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )


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
