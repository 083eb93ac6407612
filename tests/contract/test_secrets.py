"""Secrets never leak (issue 15): one redaction (contract/redact.py) on every path a store error takes outward,
and the DSN reaching Ray processes by a path Ray does not log.

Real libpq/psycopg errors are the inputs: ``psycopg.connect`` of a malformed DSN fails while parsing (no
server), a well-formed one against 127.0.0.1:1 (nothing listens) fails at once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
from argparse import Namespace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fixtures.net import free_port
from recupdate_workloads.contract import redact as rd
from recupdate_workloads.contract.secret_file import secret_from_env, write_private
from recupdate_workloads.serving.app import make_api
from recupdate_workloads.serving.service import RecommenderService
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store, connect

# ---------------------------------------------------------------------------------------------------------
# Helpers


def _piece_rx(piece: str) -> re.Pattern[str]:
    left = r"(?<![^\W_])" if piece[0].isalnum() else ""
    right = r"(?![^\W_])" if piece[-1].isalnum() else ""
    return re.compile(left + re.escape(piece) + right)


def leaks(password: str, text: str) -> list[str]:
    """What of ``password`` shows in ``text``: the whole, a whitespace piece of 4+ characters anywhere, or a
    piece of 3 as a token of its own (inside a longer word, 3 characters reveal nothing and mask real words)."""
    found = [password] if password in text else []
    for piece in password.split():
        if (len(piece) >= 4 and piece in text) or (len(piece) == 3 and _piece_rx(piece).search(text)):
            found.append(piece)
    return found


def echoed(password: str, text: str) -> list[str]:
    """Quoted stretches of ``text`` (where libpq and psycopg echo parts of their input) that are mostly
    password: a run of 4+ characters of it, at least half the stretch."""
    stretches = re.findall(r"(?=\"([^\"\r\n]*)\")", text) + re.findall(r"(?=\'([^\'\r\n]*)\')", text)
    out = []
    for f in stretches:
        runs = [j - i for i in range(len(f)) for j in range(i + 4, len(f) + 1) if f[i:j] in password]
        if runs and max(runs) >= max(4, len(f) // 2):
            out.append(f)
    return out


def libpq_error(dsn: str) -> str:
    try:
        psycopg.connect(dsn, connect_timeout=1).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"connected with {dsn!r}")


def _kv_quote(pw: str) -> str:
    return pw.replace("\\", "\\\\").replace("'", "\\'")


# Printable ASCII with everything libpq treats specially (space, quotes, @ : / ? & = # % \), a few letters
# beyond ASCII; no '*' (the mask itself), no control characters.
_ALPHABET = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
    + list(" !\"#$%&'()+,-./:;<=>?@[\\]^_`{|}~") + ["é", "ß", "密"]
)  # fmt: skip
PASSWORDS = st.text(_ALPHABET, min_size=4, max_size=18).filter(lambda p: p.strip() == p)

FORMS = ("uri", "uri_raw", "uri_query", "uri_query_raw", "kv_quoted", "kv_bare", "malformed", "malformed_noslash")


def build_dsn(form: str, pw: str, scheme: str = "postgresql", user: str = "admin", multi: bool = False) -> str:
    enc = urllib.parse.quote(pw, safe="")
    hosts = "127.0.0.1:1,127.0.0.1:1" if multi else "127.0.0.1:1"
    return {
        "uri": f"{scheme}://{user}:{enc}@{hosts}/db?connect_timeout=1&application_name=x",
        "uri_raw": f"{scheme}://{user}:{pw}@{hosts}/db",
        "uri_query": f"{scheme}://{hosts}/db?sslmode=disable&password={enc}&application_name=x",
        "uri_query_raw": f"{scheme}://{hosts}/db?password={pw}",
        "kv_quoted": f"host=127.0.0.1 port=1 user={user or 'u'} password = '{_kv_quote(pw)}' dbname=x",
        "kv_bare": f"host=127.0.0.1 port=1 password={pw} user={user or 'u'} dbname=x",
        "malformed": f"postgres:/{user}:{pw}@127.0.0.1/db",
        "malformed_noslash": f"postgres:{user}:{pw}@127.0.0.1/db",
    }[form]


@st.composite
def dsn_cases(draw: st.DrawFn, forms: tuple[str, ...] = FORMS) -> tuple[str, str, str]:
    form = draw(st.sampled_from(forms))
    pw = draw(PASSWORDS)
    dsn = build_dsn(
        form,
        pw,
        draw(st.sampled_from(["postgres", "postgresql"])),
        draw(st.sampled_from(["admin", "", "r.o-user"])),
        draw(st.booleans()),
    )
    return form, pw, dsn


# ---------------------------------------------------------------------------------------------------------
# The redaction: properties over generated passwords and DSN forms, with libpq's real errors


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dsn_cases())
def test_known_dsn_never_shows_in_libpq_errors(case: tuple[str, str, str]) -> None:
    """A DSN registered where it is read: neither it, nor its password, nor any piece of it survives in libpq's
    error for it, nor in a message quoting the DSN (as a 'missing "=" after "<dsn>"' error does); and no quoted
    fragment left shares 4 characters with the password."""
    form, pw, dsn = case
    err = libpq_error(dsn)
    for text in (err, f"cannot connect to the store: {err}", f"store error for {dsn}: refused", repr(dsn)):
        clean = rd.redact(text, secrets=[dsn])
        assert not leaks(pw, clean), (form, dsn, text, clean)
        assert not echoed(pw, clean), (form, dsn, text, clean)
        assert dsn not in clean


@settings(max_examples=400, deadline=None)
@given(dsn_cases(("uri", "uri_raw", "uri_query", "kv_quoted", "kv_bare", "malformed", "malformed_noslash")))
def test_unknown_dsn_password_is_masked_by_shape(case: tuple[str, str, str]) -> None:
    """A DSN nobody registered, quoted in a message: its password is masked from its shape alone, in every
    form where libpq's own grammar tells where the password ends."""
    form, pw, dsn = case
    # A raw '@' or '/' in URI user info: only the registered DSN says where the password ends.
    assume(form not in ("uri_raw", "malformed", "malformed_noslash") or not ("@" in pw or "/" in pw))
    # Spaces, quotes or backslashes: not one bare conninfo value.
    assume(form != "kv_bare" or not (any(c.isspace() for c in pw) or "'" in pw or "\\" in pw))
    clean = rd.redact(f"cannot connect to {dsn}: connection refused", secrets=())
    written = {"uri": urllib.parse.quote(pw, safe=""), "uri_query": urllib.parse.quote(pw, safe=""),
               "kv_quoted": _kv_quote(pw)}.get(form, pw)  # fmt: skip
    assert not leaks(pw, clean) and written not in clean, (form, dsn, clean)
    assert "connection refused" in clean  # the message around it stays readable


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("postgres:/admin:S3cretPW@127.0.0.1/db", "S3cretPW"),  # defect 3's DSN
        ("postgresql://admin:S3cret PW@127.0.0.1:1/db", "S3cret PW"),  # defect 4's DSN
        ("postgresql://admin:S3cret%20PW@127.0.0.1:1,127.0.0.1:1/db", "S3cret PW"),
        ("postgresql://:Only-Pass-9@127.0.0.1:1/db", "Only-Pass-9"),
        ("postgresql://127.0.0.1:1/db?password=Qw3rty U1op&x=1", "Qw3rty U1op"),
        ("postgresql://127.0.0.1:1/db?password=Qwerty%zz", "Qwerty%zz"),
        ("postgresql://127.0.0.1:1/db?passwrd=Qwerty99", "Qwerty99"),  # 'invalid URI query parameter'
        ("postgresql://admin:p@ss-w0rd@127.0.0.1:1/db", "p@ss-w0rd"),  # libpq: host 'ss-w0rd@127.0.0.1'
        ("postgresql://admin:pa/ss-w0rd@127.0.0.1:1/db", "pa/ss-w0rd"),
        ("postgresql://recupdate:Pa55word@[::1/recsys", "Pa55word"),
        ("host=127.0.0.1 port=1 password=Hunt3r Tw0 user=u", "Hunt3r Tw0"),  # 'missing "=" after "Tw0"'
        ("host=127.0.0.1 port=1 password='Hunt3r Tw0 user=u", "Hunt3r Tw0"),
        ("host=127.0.0.1 port=1 password = 'd0n\\'t l00k' user=u", "d0n't l00k"),
        ("host=127.0.0.1 port=xx password=Hunter22", "Hunter22"),
    ],
)
def test_registered_dsn_examples(dsn: str, password: str) -> None:
    """The brief's forms, registered process-wide as the code paths do (register when read or connected)."""
    rd.register(dsn)
    err = libpq_error(dsn)
    for text in (err, f"failed: {dsn}"):
        clean = rd.redact(text)
        assert not leaks(password, clean) and dsn not in clean, (text, clean)


def test_shapes_and_what_stays() -> None:
    r = rd.Redactor()  # nothing registered: the shapes alone
    assert r.redact("dsn=postgresql://x:other-pass@host/db") == "dsn=postgresql://x:***@host/db"
    assert r.redact("dsn=postgres:/x:other-pass@host/db") == "dsn=postgres:/x:***@host/db"
    assert r.redact("host=h password='a b c' user=u") == "host=h password=*** user=u"
    assert r.redact("host=h password = 'it\\'s' user=u") == "host=h password = *** user=u"
    assert r.redact("PGPASSWORD=plain2 psql") == "PGPASSWORD=*** psql"
    assert r.redact("postgresql://h/db?sslmode=require&password=x%20y&a=1") == (
        "postgresql://h/db?sslmode=require&password=***&a=1"
    )
    for clean in ("no secrets here", 'connection to server at "127.0.0.1", port 1 failed', "ts 10:20:30@node"):
        assert r.redact(clean) == clean
    # A secret that is not a DSN; and one per call only.
    assert r.redact("token tok-123456 used", secrets=["tok-123456"]) == "token *** used"
    assert r.redact("token tok-123456 used") == "token tok-123456 used"


def test_redact_data_masks_before_json_escaping() -> None:
    pw = 'qu"ote\\d pass'
    dsn = f"host=127.0.0.1 password='{_kv_quote(pw)}'"
    status = {"conditions": [{"type": "Ready", "message": f"cannot connect: {dsn}"}], "n": 3, "ok": True}
    text = json.dumps(rd.redact_data(status, secrets=[dsn]))
    assert "qu" not in text and "pass" not in text and json.loads(text)["n"] == 3


def test_logging_filter_masks_messages_and_tracebacks() -> None:
    dsn = "postgresql://admin:Tr4ceback PW@127.0.0.1:1/db"
    rd.register(dsn)
    logger = logging.getLogger("test.hardening.secrets")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    rd.redact_logs(logger)
    try:
        try:
            psycopg.connect(dsn)
        except psycopg.Error as exc:
            logger.error("store failed: %s", exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "unexpected spaces" in out and "Traceback" in out
    assert not leaks("Tr4ceback PW", out), out


# ---------------------------------------------------------------------------------------------------------
# Defect 3: serving's /release (and its logs) showed the DSN of a failed load


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("postgres:/admin:S3cretPW@127.0.0.1/db", "S3cretPW"),
        ("postgresql://admin:S3cret PW@127.0.0.1:1/db", "S3cret PW"),
        ("host=127.0.0.1 port=1 password=Serv1ng P4zz user=u", "Serv1ng P4zz"),
    ],
)
async def test_serving_release_never_shows_the_dsn(
    dsn: str, password: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RECUPDATE_STORE_DSN", dsn)
    service = RecommenderService(retry_delays_s=())  # the real loader: load_release from the environment
    uc = {"release_id": "r1", "adapter_uri": None, "table_version": 1, "store_schema": "recs"}
    assert not await service.reconfigure(uc)
    transport = httpx.ASGITransport(app=make_api(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        release = (await client.get("/release")).json()
        health = (await client.get("/healthz")).json()
        miss = (await client.post("/recommend", json={"recent_clusters": [1, 2]})).json()
    service.shutdown()
    assert release["last_reconfigure_failed"] and release["last_reconfigure_error"]
    shown = json.dumps([release, health, miss]) + caplog.text
    assert not leaks(password, shown), shown
    assert dsn not in shown


def test_serving_reads_the_dsn_from_a_private_file(tmp_path: Path) -> None:
    path = write_private(tmp_path / "secrets" / "dsn", "postgresql://u:F1le-Secret@h/db\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    env = {"RECUPDATE_STORE_DSN_FILE": str(path)}
    assert secret_from_env("RECUPDATE_STORE_DSN", env) == "postgresql://u:F1le-Secret@h/db"
    assert secret_from_env("RECUPDATE_STORE_DSN", {"RECUPDATE_STORE_DSN": "x", **env}) == "x"
    assert secret_from_env("RECUPDATE_STORE_DSN", {}) is None
    with pytest.raises(RuntimeError, match="cannot be read"):
        secret_from_env("RECUPDATE_STORE_DSN", {"RECUPDATE_STORE_DSN_FILE": str(tmp_path / "none")})


# ---------------------------------------------------------------------------------------------------------
# Jobs: runs.error


RUN_ERROR_CHARS = 2000  # runs.error keeps this much of a job's error


def test_runs_error_never_carries_the_password(store: Store) -> None:
    """A job's store error (from a connection made through store.db.connect, which registers its DSN) is
    written to runs.error masked, and the masking happens before the 2000-character cut."""
    password = "J0b-S3kr1t PW"
    dsn = f"postgresql://recupdate:{password}@127.0.0.1:1/db"
    with pytest.raises(psycopg.Error) as exc:
        connect(dsn)
    reg.start_run(store, "r1", "refresh")
    error = f"{type(exc.value).__name__}: {exc.value}"
    assert password in error  # libpq quotes it: 'unexpected spaces found in "J0b-S3kr1t PW"'
    # Cut first, the text would end in the password's first 5 characters, which no redaction could recognise.
    padding = "x" * (RUN_ERROR_CHARS - 5 - error.index(password))
    reg.finish_run(store, "r1", "failed", error=padding + error)
    run = reg.get_run(store, "r1")
    assert run is not None and run.error is not None
    assert run.error.startswith(padding + "ProgrammingError: unexpected spaces") and len(run.error) <= RUN_ERROR_CHARS
    assert not leaks(password, run.error) and password[:5] not in run.error, run.error[-80:]


# ---------------------------------------------------------------------------------------------------------
# Local mode: the status file and the timeline


POLICY = """
apiVersion: recupdate.io/v1alpha1
kind: RecommenderUpdatePolicy
metadata: {name: lm}
spec:
  data: {interactions: synthetic}
"""


def test_local_status_file_and_timeline_never_carry_the_password(tmp_path: Path, store: Store) -> None:
    from recupdate_operator.local_driver import LocalRun, Probe
    from recupdate_operator.planner import Event

    password = "L0cal S3kr1t"
    dsn = f"postgresql://admin:{password}@127.0.0.1:1/db"
    rd.register(dsn)
    err = libpq_error(dsn)
    (tmp_path / "p.yaml").write_text(POLICY)
    run = LocalRun(Namespace(file=tmp_path / "p.yaml", workdir=tmp_path / "w", status_file=None, report_period="30d"))
    run.now, run.store, run.schema = datetime(2030, 1, 1, tzinfo=UTC), store, store.schema
    run._event(Event("Warning", "RegistryUnavailable", f"cannot read the release registry: {err}"))
    run._write_status({"conditions": [{"type": "Degraded", "message": err}]}, run.now)
    run.timeline.append({"time": "t", "event": "X", "type": "Normal", "message": f"dsn {dsn}"})
    run._report(Probe(period=86_400), 1.0)  # writes timeline.json
    shown = run.status_file.read_text() + (run.workdir / "timeline.json").read_text()
    assert "unexpected spaces" in shown
    assert not leaks(password, shown), shown


# ---------------------------------------------------------------------------------------------------------
# Defect 5: the DSN in Ray's logs, in a world-readable temp dir that outlived the run


@pytest.mark.ray
@pytest.mark.slow
def test_local_serving_keeps_the_dsn_out_of_rays_files(
    pg_dsn: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local mode serves a release whose DSN has a password (the embedded PostgreSQL trusts it, so the replica
    really connects with it): no file under Ray's temp dir holds the password, the directory holding Ray's
    temp dir is 0700, and the session directory is gone after shutdown."""
    import ray

    from recupdate_operator.api import PolicySpec
    from recupdate_operator.backends import PolicyRef
    from recupdate_operator.backends.local import LocalBackend
    from recupdate_workloads.serving import deployment as sv
    from recupdate_workloads.serving.demo_store import build_demo_store

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    password = "Ray-L0g-Secret"
    parts = urllib.parse.urlsplit(pg_dsn)
    if parts.scheme not in ("postgres", "postgresql") or parts.password:
        pytest.skip("needs the embedded store's password-less URI")
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname or ''}" + (
        f":{parts.port}" if parts.port else ""
    )
    dsn = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    demo = build_demo_store(store)
    short = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths are length-limited
    monkeypatch.setattr(tempfile, "tempdir", short)  # the default temp dir (the one `recupdate local` uses)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RECUPDATE_STORE_DSN", raising=False)
    started = sv.ensure_local_ray(num_cpus=2)
    assert started
    from ray._private import worker

    session = Path(worker._global_node.get_session_dir_path())
    temp = session.parent
    port = free_port()
    backend = LocalBackend(dsn, tmp_path / "work", port=port, clock=lambda: datetime.now(UTC))
    ref = PolicyRef("lm", "default", "local", PolicySpec.model_validate({"store": {"schema": store.schema}}))
    try:
        backend.ensure_serving(ref, demo.releases["rel-a"])
        release = httpx.get(f"http://127.0.0.1:{port}/release", timeout=30).json()
        assert release["release_id"] == "rel-a", release  # the replica connected with the password
        found = []
        for root, _, files in os.walk(temp):
            for name in files:
                p = Path(root) / name
                try:
                    data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
                except OSError:
                    continue
                if password.encode() in data:
                    found.append(str(p))
        assert not found, found
        env_vars = sv.current_config()["applications"][0]["runtime_env"]["env_vars"]  # type: ignore[index]
        assert "RECUPDATE_STORE_DSN" not in env_vars and "RECUPDATE_STORE_DSN_FILE" in env_vars
        # Ray sets its own temp dir to 0777 (again whenever it sets up a runtime_env): the directory around it,
        # which Ray never touches, is this user's alone, so no other user reaches any of Ray's files.
        assert temp == Path(short) / f"recupdate-{os.getuid()}" / "ray"
        st = os.stat(temp.parent)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    finally:
        sv.shutdown()
        sv.shutdown_local_ray()
        backend.close()
    try:
        assert not session.exists() and not (temp / "session_latest").exists()
        assert not backend.dsn_file.exists()
    finally:
        shutil.rmtree(short, ignore_errors=True)
