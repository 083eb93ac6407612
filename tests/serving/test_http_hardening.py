"""Issue 15, the serving HTTP app under bad input: never a 5xx, never a blocked event loop.

The app is the real one (``make_api``) over an in-memory release (no store, no model), served through
httpx's ASGI transport or, for the latency and memory checks, by uvicorn in a subprocess on loopback.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json

from recupdate_workloads.contract.serve import UserConfig
from recupdate_workloads.data.types import Catalogue, Cluster
from recupdate_workloads.serving.app import (
    MAX_BODY_BYTES,
    MAX_BODY_BYTES_ENV,
    MAX_ECHOED_ERRORS,
    MAX_ERROR_BODY_BYTES,
    MAX_JSON_DEPTH,
    _invalid,
    _safe,
    make_api,
    max_body_bytes,
)
from recupdate_workloads.serving.release import SWAP_DUTY, SWAP_DUTY_ENV, Loaded, swap_duty
from recupdate_workloads.serving.service import RecommenderService

NAMES = ["Action|Adventure", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Film-Noir", "Documentary"]
RELEASE = {"release_id": "mem", "table_version": 1, "store_schema": "mem"}
JSON_CT = {"content-type": "application/json"}


def _bundle(cfg: UserConfig) -> Loaded:
    """A small release held in memory: a table row for (0, 1), popularity for everything else."""
    return Loaded(
        config=cfg,
        catalogue=Catalogue([Cluster(i, n) for i, n in enumerate(NAMES)]),
        table_index={(0, 1): 0},
        table_ids=np.array([[2, 3, -1]]),
        table_scores=np.array([[-0.1, -0.2, 0.0]]),
        table_source=np.array([0]),
        popular=tuple((i, 1.0 / (i + 1)) for i in range(len(NAMES))),
    )


def memory_service() -> RecommenderService:
    return RecommenderService(loader=_bundle, retry_delays_s=())


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    svc = memory_service()
    assert await svc.reconfigure(RELEASE), svc.last_error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t") as c:
        yield c
    svc.shutdown()


def _check_error(r: httpx.Response) -> dict[str, Any]:
    """An error answer: strict JSON (valid UTF-8, no lone surrogates), bounded, in the API's error shape."""
    assert r.status_code < 500, r.content[:300]
    assert len(r.content) <= MAX_ERROR_BODY_BYTES, len(r.content)
    out = from_json(r.content)  # stricter than json.loads: refuses lone surrogate escapes and bad UTF-8
    if r.status_code in (413, 422):
        assert isinstance(out["message"], str) and out["message"]
        assert isinstance(out["detail"], list) and 1 <= len(out["detail"]) <= MAX_ECHOED_ERRORS
    return out


# ---------------------------------------------------------------------------------------------------------
# Defect 1: invalid Unicode anywhere in the body


UNICODE_BODIES: list[tuple[str, bytes]] = [
    ("the report: lone high surrogate in a name", b'{"recent_clusters": ["\\ud800", 1]}'),
    ("lone low surrogate in a name", b'{"recent_clusters": [0, "\\udfff"]}'),
    ("high surrogate then a non-surrogate", b'{"recent_clusters": ["a\\ud800\\u0041", 1]}'),
    ("in user_id", b'{"user_id": "\\ud800", "recent_clusters": [0, 1]}'),
    ("in n", b'{"recent_clusters": [0, 1], "n": "\\udc00"}'),
    ("as an extra key", b'{"\\ud800": 1, "recent_clusters": [0, 1]}'),
    ("in an extra value", b'{"recent_clusters": [0, 1], "x": {"y": ["\\udbff"]}}'),
    ("raw UTF-8-encoded surrogate", b'{"recent_clusters": ["\xed\xa0\x80", 1]}'),
    ("raw surrogate in a key", b'{"\xed\xbf\xbf": 1, "recent_clusters": [0, 1]}'),
    ("invalid UTF-8 byte", b'{"recent_clusters": ["\xff", 1]}'),
    ("overlong encoding", b'{"recent_clusters": ["\xc0\x80", 1]}'),
    ("truncated sequence", b'{"user_id": "\xe2\x82", "recent_clusters": [0, 1]}'),
    ("latin-1 text", '{"recent_clusters": ["caf\xe9"]}'.encode("latin-1")),
]


@pytest.mark.parametrize("body", [b for _, b in UNICODE_BODIES], ids=[i for i, _ in UNICODE_BODIES])
async def test_invalid_unicode_gets_422_in_any_field(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post("/recommend", content=body, headers=JSON_CT)
    assert r.status_code == 422, (r.status_code, r.content[:300])
    out = _check_error(r)
    assert out["message"].startswith("body: invalid JSON at character ")
    assert "surrogate" in out["message"] or "UTF-8" in out["message"], out["message"]


async def test_surrogate_pairs_and_non_ascii_names_still_work(client: httpx.AsyncClient) -> None:
    # a high-low pair is one character, not an error; unknown names are echoed as they were sent
    r = await client.post("/recommend", content=b'{"recent_clusters": ["\\ud83d\\ude00", 1]}', headers=JSON_CT)
    assert r.status_code == 422 and "unknown cluster '\U0001f600'" in _check_error(r)["message"]
    r = await client.post("/recommend", json={"recent_clusters": ["Sci-Fi", "romance"], "user_id": "é😀", "n": 2})
    assert r.status_code == 200 and len(r.json()["clusters"]) == 2


def test_error_answer_encodes_whatever_text_it_is_given() -> None:
    # Defect 1's root: the 422 echo must never fail on text it cannot encode (old code: UnicodeEncodeError)
    s = "\ud800"
    r = _invalid([{"type": s, "loc": ("body", s * 300), "msg": s, "input": {s: [s, s * 500]}, "ctx": {s: s}}])
    assert r.status_code == 422
    out = from_json(r.body)
    assert "\\ud800" in out["detail"][0]["loc"][1] and len(out["detail"][0]["loc"][1]) < 500


# ---------------------------------------------------------------------------------------------------------
# Defect 2: no size limit; echoes that cost as much as the input


def _nested_empty_objects(size: int) -> bytes:
    """What the report sent: a list of ``{}`` in recent_clusters, about ``size`` bytes long."""
    head, tail = b'{"recent_clusters": [', b"]}"
    n = (size - len(head) - len(tail) + 1) // 3
    return head + b",".join([b"{}"] * n) + tail + b" " * ((size - len(head) - len(tail) + 1) % 3)


async def test_body_over_the_limit_gets_413_before_parsing(client: httpx.AsyncClient) -> None:
    big = _nested_empty_objects(4 * MAX_BODY_BYTES)
    r = await client.post("/recommend", content=big, headers=JSON_CT)
    assert r.status_code == 413, (r.status_code, r.content[:200])
    assert str(MAX_BODY_BYTES) in _check_error(r)["message"]
    # every endpoint, also those that take no body, and paths that do not exist
    for method, path in (("GET", "/healthz"), ("GET", "/release"), ("POST", "/nope"), ("PUT", "/recommend")):
        r = await client.request(method, path, content=big, headers=JSON_CT)
        assert r.status_code == 413, (method, path, r.status_code)
    # exactly at the limit is read (whitespace is valid JSON padding), one byte more is not
    ok = b'{"recent_clusters": [0, 1], "n": 2}'
    r = await client.post("/recommend", content=ok.ljust(MAX_BODY_BYTES), headers=JSON_CT)
    assert r.status_code == 200 and r.json()["release"] == "mem"
    r = await client.post("/recommend", content=ok.ljust(MAX_BODY_BYTES + 1), headers=JSON_CT)
    assert r.status_code == 413


async def test_chunked_body_is_counted_while_it_streams(client: httpx.AsyncClient) -> None:
    sent = {"chunks": 0}
    chunk = b" " * 65536

    async def stream(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            sent["chunks"] += 1
            yield chunk

    # no Content-Length (httpx sends Transfer-Encoding: chunked): reading stops at the limit, not at 20 MB
    r = await client.post("/recommend", content=stream(320), headers=JSON_CT)
    assert r.status_code == 413
    assert sent["chunks"] <= MAX_BODY_BYTES // len(chunk) + 1, sent
    # a declared Content-Length over the limit: refused before reading a byte
    sent["chunks"] = 0
    r = await client.post("/recommend", content=stream(320), headers={**JSON_CT, "content-length": str(10**12)})
    assert r.status_code == 413 and sent["chunks"] == 0, sent
    # a chunked body within the limit is read whole
    body = b'{"recent_clusters": [0, 1]}'

    async def small() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 4):
            yield body[i : i + 4]

    r = await client.post("/recommend", content=small(), headers=JSON_CT)
    assert r.status_code == 200, r.text


def test_limit_setting() -> None:
    assert max_body_bytes({}) == MAX_BODY_BYTES == 256 * 1024
    assert max_body_bytes({MAX_BODY_BYTES_ENV: " 4096 "}) == 4096
    for bad in ("0", "-1", "1.5", "lots"):
        with pytest.raises(ValueError, match=MAX_BODY_BYTES_ENV):
            max_body_bytes({MAX_BODY_BYTES_ENV: bad})
    # the background swap's duty: a number in (0, 1]
    assert swap_duty({}) == SWAP_DUTY == 0.5
    assert swap_duty({SWAP_DUTY_ENV: "0.25"}) == 0.25 and swap_duty({SWAP_DUTY_ENV: "1"}) == 1.0
    for bad in ("0", "-0.5", "1.5", "nan", "half"):
        with pytest.raises(ValueError, match=rf"\${SWAP_DUTY_ENV} must be a number in \(0, 1\]"):
            swap_duty({SWAP_DUTY_ENV: bad})


async def test_limit_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = memory_service()
    assert await svc.reconfigure(RELEASE)
    body = b'{"recent_clusters": [0, 1]}'
    monkeypatch.setenv(MAX_BODY_BYTES_ENV, str(len(body) - 1))
    for app in (make_api(svc), make_api(svc, body_limit=len(body) - 1)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post("/recommend", content=body, headers=JSON_CT)).status_code == 413
            assert (await c.post("/recommend", content=body[:-1], headers=JSON_CT)).status_code == 422
    svc.shutdown()


def _many_keys(size: int) -> bytes:
    keys = [b'"k%d": {}' % i for i in range(size // 9)]
    return b'{"recent_clusters": [0, 1], ' + b", ".join(keys)[: size - 40].rsplit(b",", 1)[0] + b"}"


async def test_error_answers_are_bounded_whatever_the_input(client: httpx.AsyncClient) -> None:
    # Within the limit, the old code answered 100k extra keys with 100k echoed errors (14 MB for 1.3 MB)
    r = await client.post("/recommend", content=_many_keys(MAX_BODY_BYTES - 100), headers=JSON_CT)
    out = _check_error(r)
    assert r.status_code == 422 and "keys; /recommend takes only user_id, recent_clusters, n" in out["message"]
    # many errors: at most MAX_ECHOED_ERRORS are echoed, and the message says how many were left out
    r = await client.post("/recommend", json={"recent_clusters": [f"nope-{i}" for i in range(100)]})
    out = _check_error(r)
    assert len(out["detail"]) == MAX_ECHOED_ERRORS and f"(and {100 - MAX_ECHOED_ERRORS} more errors)" in out["message"]
    # large and deep inputs are echoed as short previews
    for value in (["x" * 5000] * 40, {"a": list(range(20000))}, [[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]):
        r = await client.post("/recommend", json={"recent_clusters": [0, 1], "user_id": value})
        out = _check_error(r)
        echoed = out["detail"][0]["input"]
        assert isinstance(echoed, str) and len(echoed) <= 210, echoed


class _CountingList(list):
    """A list that counts how many of its items anything looked at."""

    def __init__(self, n: int) -> None:
        super().__init__(range(n))
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:
        for x in super().__iter__():
            self.seen += 1
            yield x


def test_echo_walks_only_what_it_shows() -> None:
    # the old _safe serialised the whole input, then cut it to 200 characters
    big = _CountingList(1_000_000)
    text = _safe({"a": big})
    assert isinstance(text, str) and len(text) <= 210 and text.startswith('{"a": [0, 1, 2')
    assert big.seen < 200, big.seen
    deep: Any = "x"
    for _ in range(100_000):  # far deeper than any recursion limit
        deep = [deep]
    assert _safe(deep).startswith("[[[[") and len(_safe(deep)) <= 210
    assert _safe(10**5000).startswith("<an integer of about 5001 digits") and _safe(float("nan")) == "nan"


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"[" * 100_000, f"nested more than {MAX_JSON_DEPTH} levels deep"),
        # just past the limit (the parser counts lists and objects a level apart); just within it is read, below
        (b'{"recent_clusters": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", "nested more"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, f"nested more than {MAX_JSON_DEPTH} levels"),
        (b'{"recent_clusters": [0, ' + b"1" * 5000 + b"]}", "invalid JSON at character 4325: number out of range"),
        (b'{"recent_clusters":\n  [0,\n   1,]}', "invalid JSON at character 31: trailing comma"),
        (b'{"recent_clusters": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}", "expected a"),
        (b'{"recent_clusters": [0, 1], "n": NaN}', "n: Input should be a valid integer"),
        (b'{"recent_clusters": [0, Infinity]}', "recent_clusters.1: expected a cluster id"),
    ],
    ids=[
        "brackets",
        "one level too deep",
        "deep objects",
        "huge int",
        "multi-line position",
        "at the depth limit",
        "nan",
        "inf",
    ],
)
async def test_deep_and_odd_json_gets_422(client: httpx.AsyncClient, body: bytes, expect: str) -> None:
    r = await client.post("/recommend", content=body, headers=JSON_CT)
    assert r.status_code == 422, (r.status_code, r.content[:200])
    assert expect in _check_error(r)["message"]


# ---------------------------------------------------------------------------------------------------------
# Fuzz: random JSON values and random bytes, through the real ASGI app


SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.text(st.one_of(st.sampled_from('ab "\\/\x00\x1f\x7fé€'), st.characters(), SURROGATE), max_size=10)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.builds(lambda d, sign: sign * (10**d + 7), st.integers(18, 4000), st.sampled_from([1, -1])),  # huge ints
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUE = st.recursive(
    LEAF, lambda ch: st.lists(ch, max_size=5) | st.dictionaries(TEXT, ch, max_size=5), max_leaves=8
)
CLUSTER_REF = st.one_of(st.integers(-3, len(NAMES) + 3), st.sampled_from(NAMES), st.integers(2**31 - 2, 2**31))
REQUEST = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"recent_clusters": st.lists(st.one_of(CLUSTER_REF, JSON_VALUE), max_size=8) | JSON_VALUE},
        optional={"user_id": st.one_of(TEXT, JSON_VALUE), "n": st.one_of(st.integers(-3, 120), JSON_VALUE)},
    ),
    st.dictionaries(TEXT, JSON_VALUE, max_size=3),
)


def _encode(value: Any, how: str) -> bytes:
    if how == "escaped":  # lone surrogates as \udXXX escapes, NaN/Infinity literals
        return json.dumps(value, ensure_ascii=True).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")  # raw, CESU-8 style


def _mutate(body: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for at, b in edits:
        i = at % (len(body) + 1)
        body = body[:i] + b + body[i + 1 :]
    return body


def _nest(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b'{"recent_clusters": ' + b"[" * depth + b"0" + b"]" * depth + b"}"
    if kind == "object":
        return b'{"recent_clusters": [0, 1], "x": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    return b'{"user_id": ' + b"[{" * depth + b"}]" * depth + b', "recent_clusters": [0]}'


ENCODED = st.builds(_encode, st.one_of(REQUEST, JSON_VALUE), st.sampled_from(["escaped", "raw"]))
BODY = st.one_of(
    ENCODED,
    st.builds(_mutate, ENCODED, st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)), max_size=4)),
    st.builds(_nest, st.integers(1, MAX_JSON_DEPTH + 60), st.sampled_from(["list", "object", "mixed"])),
    st.binary(max_size=400),
    st.integers(4290, 4400).map(lambda n: b'{"recent_clusters": [0, -' + b"9" * n + b"]}"),
    st.sampled_from([b"", b"null", b"NaN", b"[Infinity, -Infinity]", b'{"n": 1e400, "recent_clusters": [1e400]}']),
    # around the size limit: padded with whitespace (valid JSON) to just under or just over it
    st.builds(lambda b, d: b.ljust(MAX_BODY_BYTES + d), ENCODED, st.integers(-3, 3)),
)
TARGET = st.sampled_from(
    [("POST", "/recommend")] * 6 + [("POST", "/healthz"), ("GET", "/release"), ("POST", "/nope"), ("PUT", "/recommend")]
)
CONTENT_TYPE = st.sampled_from(["application/json"] * 4 + ["application/problem+json", "text/plain", None])


@pytest.fixture(scope="module")
def loop_and_client() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]]:
    loop = asyncio.new_event_loop()
    svc = memory_service()
    assert loop.run_until_complete(svc.reconfigure(RELEASE))
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_api(svc)), base_url="http://t")
    yield loop, c
    loop.run_until_complete(c.aclose())
    svc.shutdown()
    loop.close()


FUZZ_EXAMPLES = int(os.environ.get("RECUPDATE_FUZZ_EXAMPLES", "300"))


def test_fuzz_no_5xx_and_bounded_json_errors(
    loop_and_client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient], capsys: pytest.CaptureFixture[str]
) -> None:
    loop, c = loop_and_client
    counts: dict[int, int] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(body=BODY, target=TARGET, ctype=CONTENT_TYPE)
    def check(body: bytes, target: tuple[str, str], ctype: str | None) -> None:
        headers = {"content-type": ctype} if ctype else {}
        r = loop.run_until_complete(c.request(target[0], target[1], content=body, headers=headers))
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, body[:200], r.content[:300])
        assert (r.status_code == 413) == (len(body) > MAX_BODY_BYTES), (r.status_code, len(body))
        if r.status_code == 200:
            assert target == ("POST", "/recommend") or target == ("GET", "/release")
            from_json(r.content)
        else:
            _check_error(r)

    check()
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} generated inputs, responses by status {dict(sorted(counts.items()))}")
    assert total >= FUZZ_EXAMPLES // 2
    assert {200, 413, 422} <= counts.keys(), counts  # the inputs reach every outcome


# ---------------------------------------------------------------------------------------------------------
# Under real uvicorn: /healthz stays fast while big bad bodies are refused; memory stays flat


def run_server(http: str) -> None:
    """The child process: the app on a free loopback port (printed first), until killed."""
    import uvicorn

    svc = memory_service()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        assert await svc.reconfigure(RELEASE)
        yield
        svc.shutdown()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(make_api(svc, lifespan=lifespan), http=http, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, int]]:
    tests = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {tests!r}); import test_http_hardening as t; t.run_server({request.param!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.05)
        yield request.param, port, proc.pid
    finally:
        proc.kill()
        proc.wait()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _send_big(port: int, body: bytes, chunked: bool, result: dict[str, Any]) -> None:
    """One request with a big body on its own connection; records the status line the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = "POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        if chunked:
            s.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            for i in range(0, len(body), 65536):
                part = body[i : i + 65536]
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            s.sendall(b"0\r\n\r\n")
        else:
            s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        result["status"] = s.recv(4096).split(b"\r\n", 1)[0].decode()


def _probe(conn: http.client.HTTPConnection) -> float:
    t0 = time.perf_counter()
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    return time.perf_counter() - t0


def _during(action: Callable[[], None], conn: http.client.HTTPConnection, min_probes: int = 8) -> list[float]:
    """Latencies of /healthz probes on ``conn`` while ``action`` runs in a thread (at least min_probes)."""
    t = threading.Thread(target=action)
    t.start()
    lat: list[float] = []
    while t.is_alive() or len(lat) < min_probes:
        lat.append(_probe(conn))
        time.sleep(0.005)
    t.join()
    return lat


def test_healthz_stays_fast_while_big_bodies_are_refused(server: tuple[str, int, int]) -> None:
    impl, port, pid = server
    big = _nested_empty_objects(20 * 1024 * 1024)  # the report's 20 MB of nested {}
    worst = [  # the slowest bodies within the limit (~20 ms each to parse): empty lists, many keys
        b'{"x": [' + b",".join([b"[]"] * ((MAX_BODY_BYTES - 10) // 3)) + b"]}",
        _many_keys(MAX_BODY_BYTES - 100),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # probes: their own, kept-alive connection
    _probe(conn)
    rss_before = _peak_rss_mb(pid)
    refusing: list[list[float]] = []  # probe latencies while a 20 MB body is refused, per request
    within: list[list[float]] = []  # ... while worst-case bodies within the limit are answered
    statuses: list[Any] = []
    for rnd in range(2):
        for chunked in (False, True):
            res: dict[str, Any] = {}
            refusing.append(_during(functools.partial(_send_big, port, big, chunked, res), conn))
            statuses.append(res.get("status"))

        def bad_within_limit(rnd: int = rnd) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                for i in range(6):
                    r = c.post("/recommend", content=worst[(i + rnd) % 2], headers=JSON_CT)
                    statuses.append((r.status_code, len(r.content)))

        within.append(_during(bad_within_limit, conn))
    conn.close()
    grew = _peak_rss_mb(pid) - rss_before
    flat = sorted(x for lat in refusing for x in lat)

    def ms(lats: list[list[float]]) -> str:
        medians = [round(statistics.median(lat) * 1000, 1) for lat in lats]
        return f"medians {medians} ms, max {max(max(lat) for lat in lats) * 1000:.1f} ms"

    print(
        f"\nhealthz while a 20 MB body is refused ({len(flat)} probes): {ms(refusing)}; while worst bodies within"
        f" the limit are answered: {ms(within)}; server peak RSS grew {grew:.1f} MB"
    )
    refused = [x for x in statuses if not isinstance(x, tuple)]
    answered = [x for x in statuses if isinstance(x, tuple)]
    assert len(refused) == 4 and all(isinstance(x, str) and x.startswith("HTTP/1.1 413") for x in refused), refused
    assert len(answered) == 12 and all(code == 422 and size <= MAX_ERROR_BODY_BYTES for code, size in answered)
    # The old code stalled /healthz for the whole ~20 s the 20 MB body took (a probe times out after 5 s).
    # Each request's median probe under 100 ms, and with httptools (what uvicorn[standard] and Ray Serve's proxy
    # run) every probe but one (slack for a busy machine). h11 drains the refused rest of a body in Python,
    # which holds its loop up to ~110 ms per 20 MB: there the max has slack.
    assert max(statistics.median(lat) for lat in refusing) < 0.1, refusing
    assert (flat[-2] if impl == "httptools" else flat[len(flat) // 2]) < 0.1 and flat[-1] < 1.0, flat[-5:]
    # Within the limit a request may hold the loop for its parse (~20 ms here), never much longer.
    assert max(statistics.median(lat) for lat in within) < 0.1 and max(max(lat) for lat in within) < 1.0
    assert grew < 60, grew  # the old code: ~1 GB for the 20 MB body
