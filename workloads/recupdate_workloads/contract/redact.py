"""The one redaction of secrets for every text that leaves a process: the operator's status conditions, Events,
logs and metrics, serving's ``/release`` and logs, jobs' ``runs.error``, local mode's status file and timeline.

Two layers, applied together to the original text (every masked span becomes ``***``):

1. Known secrets. ``register(dsn)`` is called wherever a DSN is read or connected with. It remembers the DSN
   and every form of its password that libpq or psycopg may echo back: the value as libpq parses it and as
   the author meant it (a raw space, ``@`` or ``/`` makes libpq cut a URI's password short, and its error
   then quotes the rest), raw, percent-decoded, percent-encoded, escaped. Those values (4 characters or
   more) and their whitespace-separated pieces (4 or more anywhere, 3 as whole tokens) are masked wherever
   they appear. libpq and psycopg quote the fragments of input they complain about (``unexpected spaces
   found in "S3cret PW"``, ``failed to resolve host 'ss@h'``), so a quoted fragment that is part of a
   password, shares 4 consecutive characters with one, or holds one of its pieces is masked whole.
2. Shapes. Without knowing the secret, the password of anything shaped like a connection string is masked:
   URI user info (``scheme://user:PASSWORD@``, also the malformed ``postgres:/user:PASSWORD@``),
   ``?password=`` / ``&password=`` query parameters, and ``password=...`` / ``password='...'`` pairs.

Standard library only: the operator imports this without the workloads' dependencies.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "MASK",
    "SECRETS",
    "RedactingFilter",
    "Redactor",
    "dsn_passwords",
    "redact",
    "redact_data",
    "redact_logs",
    "register",
]

MASK = "***"
MIN_SECRET = 4  # whole values shorter than this would mask ordinary words (the shapes still mask them in DSNs)
MIN_PIECE = 3  # pieces of exactly 3 characters are masked as whole tokens only, longer ones anywhere
MIN_FRAGMENT_PIECE = 2  # inside a quoted fragment, a piece of 2 characters already counts
SHARED = 4  # a quoted fragment sharing this many consecutive characters with a password is masked

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*"
# URI user info. libpq reads the password up to '@' (spaces included: it then quotes them back in its error);
# the greedy run to the last '@' before a '/' also covers a raw '@' in the password. Zero to three slashes:
# 'postgres:/u:pw@h' and 'postgres:u:pw@h' are typos that libpq echoes whole.
_URI = re.compile(rf"\b{_SCHEME}:/{{0,3}}[^\s:@/?#'\"]*:(?P<pw>[^/\r\n]*)@")
_QUERY = re.compile(r"[?&]password=(?P<pw>[^&\s]*)", re.IGNORECASE)
# key=value conninfo (also PGPASSWORD=..., db_password=...): a quoted value with backslash escapes (an
# unterminated one runs to the end), or an unquoted one up to whitespace. Query parameters are _QUERY's.
_KV = re.compile(
    r"(?<![?&])password\s*=\s*(?P<pw>'(?:\\.|[^'\\])*(?:'|\\?\Z)|(?:\\.|[^\s'\\])(?:\\.|[^\s\\])*)",
    re.IGNORECASE,
)
_SHAPES = (_URI, _QUERY, _KV)
# Every stretch between two consecutive quotes of a kind (lookahead: overlapping, so an apostrophe earlier
# in the text cannot pair up with the opening quote of a fragment).
_FRAGMENTS = (re.compile(r"(?=\"([^\"\r\n]*)\")"), re.compile(r"(?=\'([^\'\r\n]*)\')"))
# And from the first to the last quote of a line: the echo of a DSN whose password holds that quote.
_LINE_FRAGMENTS = (re.compile(r"^[^\"\r\n]*\"([^\r\n]*)\"", re.M), re.compile(r"^[^\'\r\n]*\'([^\r\n]*)\'", re.M))
# libpq's connection keywords: where a password written with spaces (or '&' in a URI query) is meant to end.
_KEYWORDS = (  # noqa: SIM905  (a word list reads better than 50 quoted items)
    "host hostaddr port dbname user password passfile require_auth channel_binding connect_timeout "
    "client_encoding options application_name fallback_application_name keepalives keepalives_idle "
    "keepalives_interval keepalives_count tcp_user_timeout replication gssencmode sslmode sslnegotiation "
    "sslcompression sslcert sslkey sslkeylogfile sslpassword sslcertmode sslrootcert sslcrl sslcrldir sslsni "
    "requirepeer ssl_min_protocol_version ssl_max_protocol_version min_protocol_version max_protocol_version "
    "krbsrvname gsslib gssdelegation target_session_attrs load_balance_hosts service scram_client_key "
    "scram_server_key oauth_issuer oauth_client_id oauth_client_secret oauth_scope"
).split()
_NEXT_KEY = "(?:" + "|".join(sorted(_KEYWORDS, key=len, reverse=True)) + ")"
_PIECE_SPLIT = re.compile(r"[\s@/:,?&=#'\"\\]+")  # where libpq cuts a DSN: a fragment may start or end there
_DSN_LIKE = re.compile(rf"^\s*(?:{_SCHEME}:/|\S+\s*=)")


# ---------------------------------------------------------------------------------------------------------
# Reading passwords out of connection strings


def _conninfo(s: str) -> list[tuple[str, int, int, str, bool]]:
    """(key, raw start, raw end, value, terminated) of each pair of a key=value conninfo, read as libpq reads
    it (values quoted with ' or bare, backslash escapes in both); stops where libpq would fail."""
    out: list[tuple[str, int, int, str, bool]] = []
    i, n = 0, len(s)
    while i < n:
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            break
        k0 = i
        while i < n and not s[i].isspace() and s[i] != "=":
            i += 1
        key = s[k0:i]
        while i < n and s[i].isspace():
            i += 1
        if i >= n or s[i] != "=":
            break
        i += 1
        while i < n and s[i].isspace():
            i += 1
        v0, chars = i, []
        quoted = i < n and s[i] == "'"
        if quoted:
            i += 1
        while i < n and (s[i] != "'" if quoted else not s[i].isspace()):
            if s[i] == "\\" and i + 1 < n:
                i += 1
            chars.append(s[i])
            i += 1
        terminated = not quoted or i < n
        if quoted and i < n:
            i += 1  # the closing quote
        out.append((key, v0, i, "".join(chars), terminated))
    return out


def _password_spans(dsn: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[str]]:
    """Where the password(s) of a connection string may lie, well-formed or not: (spans of its readings,
    wider spans that only serve to recognise echoed fragments, values as libpq unescapes them).

    Readings: URI user info as libpq reads it (up to the first '@' or '/') and as meant (up to the last '@'
    before the path: a raw '@' in the password; or the last '@' at all when a raw '/' hid it from libpq);
    ``password`` query parameters as libpq splits them (at '&') and as meant (up to the next '&keyword=');
    ``password`` conninfo values as libpq reads them and, for a bare value with spaces, as meant (up to the
    next ' keyword=', a keyword of libpq's); and every password shape of the text."""
    spans: list[tuple[int, int]] = []
    wide: list[tuple[int, int]] = []
    values: list[str] = []
    m = re.match(rf"\s*{_SCHEME}:/{{0,3}}", dsn)
    if m:
        b = m.end()
        rest = dsn[b:]
        colon = rest.find(":")
        if colon != -1 and not re.search(r"[@/]", rest[:colon]):  # user info with a password
            first = re.search(r"[@/]", rest)
            if first is not None and first.group() == "@" and first.start() > colon:
                spans.append((b + colon + 1, b + first.start()))
            slash = rest.find("/", colon)
            at = rest.rfind("@", colon, slash if slash != -1 else len(rest))
            if at != -1:
                spans.append((b + colon + 1, b + at))
            last = rest.rfind("@")
            if last > colon:  # a reading of its own only when the path's '@' explains nothing better
                (spans if at in (-1, colon + 1) else wide).append((b + colon + 1, b + last))
        q = rest.find("?")
        if q != -1:
            for mm in re.finditer(r"(?:^|&)password=([^&]*)", rest[q + 1 :], re.IGNORECASE):
                start = b + q + 1 + mm.start(1)
                spans.append((start, start + len(mm.group(1))))
                meant = re.match(rf".*?(?=&{_NEXT_KEY}=|\s*\Z)", dsn[start:], re.S | re.I)
                if meant:
                    spans.append((start, start + meant.end()))
    for key, start, end, value, terminated in _conninfo(dsn):
        if key.lower() != "password":
            continue
        if terminated:  # (an unterminated quoted value runs to the end: libpq echoes none of it)
            spans.append((start, end))
            values.append(value)
        else:
            wide.append((start, end))
        # As meant: up to the next keyword= (a bare value with spaces; text glued to a quoted value).
        meant = re.match(rf"'?(.*?)(?=\s+{_NEXT_KEY}\s*=|\s*\Z)", dsn[start:], re.S | re.I)
        if meant:
            spans.append((start + meant.start(1), start + meant.end(1)))
    for rx in _SHAPES:  # connection strings inside a longer text (an unterminated quote: see above)
        for mm in rx.finditer(dsn):
            v = mm.group("pw")
            (spans if not v.startswith("'") or v.endswith("'") else wide).append(mm.span("pw"))
    ok = [(a, e) for a, e in spans if e > a]
    return ok, ok + [(a, e) for a, e in wide if e > a], values


def dsn_passwords(dsn: str) -> set[str]:
    """Every reading of the password(s) in a connection string (see _password_spans), with the forms in which
    it may be echoed: raw, unquoted, unescaped, percent-decoded and -encoded, escaped as by repr and JSON."""
    spans, _, values = _password_spans(dsn)
    found = {dsn[a:e] for a, e in spans} | set(values)
    out: set[str] = set()
    for p in found:
        if len(p) >= 2 and p[0] == p[-1] == "'":
            p = p[1:-1]
        unescaped = re.sub(r"\\(.)", r"\1", p)
        for v in (p, unescaped):
            out.update(
                (
                    v,
                    urllib.parse.unquote(v),
                    urllib.parse.quote(v, safe=""),
                    v.replace("\\", "\\\\").replace("'", "\\'"),  # as written in a quoted conninfo value
                    repr(v)[1:-1],  # as %r and tracebacks show it
                    json.dumps(v)[1:-1],
                )
            )
    out.discard("")
    return out


# ---------------------------------------------------------------------------------------------------------
# What is known, and masking it


@dataclass(frozen=True)
class _Parts:
    values: frozenset[str] = frozenset()  # masked wherever they appear
    tokens: frozenset[str] = frozenset()  # masked as whole tokens
    passwords: frozenset[str] = frozenset()  # for quoted fragments
    fragment_pieces: frozenset[str] = frozenset()
    dsns: frozenset[tuple[str, tuple[tuple[int, int], ...]]] = frozenset()  # with where their passwords lie

    def __or__(self, other: _Parts) -> _Parts:
        return _Parts(
            self.values | other.values,
            self.tokens | other.tokens,
            self.passwords | other.passwords,
            self.fragment_pieces | other.fragment_pieces,
            self.dsns | other.dsns,
        )


@lru_cache(maxsize=512)
def _derive(secret: str) -> _Parts:
    dsn_like = bool(_DSN_LIKE.match(secret))
    passwords = dsn_passwords(secret) if dsn_like else {secret}
    dsns = frozenset([(secret, tuple(_password_spans(secret)[1]))]) if dsn_like else frozenset()
    values = {secret, *passwords}
    tokens: set[str] = set()
    pieces: set[str] = set()
    for p in passwords:
        for piece in p.split():
            if len(piece) > MIN_PIECE:
                values.add(piece)
            elif len(piece) == MIN_PIECE:
                tokens.add(piece)
        pieces.update(x for x in _PIECE_SPLIT.split(p) if len(x) >= MIN_FRAGMENT_PIECE)
    return _Parts(
        frozenset(v for v in values if len(v) >= MIN_SECRET),
        frozenset(tokens),
        frozenset(passwords),
        frozenset(pieces),
        dsns,
    )


def _token_rx(pieces: Iterable[str]) -> re.Pattern[str] | None:
    """Pieces as whole tokens: not glued to a letter or digit on an edge that is itself a letter or digit."""
    alts = []
    for p in sorted(pieces, key=len, reverse=True):
        left = r"(?<![^\W_])" if p[0].isalnum() else ""
        right = r"(?![^\W_])" if p[-1].isalnum() else ""
        alts.append(f"{left}{re.escape(p)}{right}")
    return re.compile("|".join(alts)) if alts else None


class _Compiled:
    def __init__(self, parts: _Parts) -> None:
        self.values = sorted(parts.values, key=len, reverse=True)
        self.tokens = _token_rx(parts.tokens)
        self.passwords = tuple(parts.passwords)
        self.grams = frozenset(p[i : i + SHARED] for p in parts.passwords for i in range(len(p) - SHARED + 1))
        self.fragment_pieces = _token_rx(parts.fragment_pieces)
        self.dsns = tuple((d, spans) for d, spans in parts.dsns if spans)

    def secret_fragment(self, frag: str) -> bool:
        """Whether a quoted fragment of a message is (part of) a password: libpq quotes pieces of its input,
        such as the first word of a malformed DSN, or a host name that begins with the password's tail."""
        if len(frag) < MIN_FRAGMENT_PIECE:
            return False
        if any(frag in p for p in self.passwords) or self.dsn_fragment(frag):
            return True
        # Otherwise the fragment must be mostly password: a quoted path or name that merely shares a few
        # characters with one (a password with "ecre" in it, a traceback's "/srv/secrets/...") is no echo.
        need = max(SHARED, len(frag) // 2)
        if self.grams and self._shared_run(frag) >= need:
            return True
        return bool(self.fragment_pieces and any(len(m[0]) >= need // 2 for m in self.fragment_pieces.finditer(frag)))

    def _shared_run(self, frag: str) -> int:
        """The longest run of ``frag`` that is part of a password."""
        best = 0
        for i in range(len(frag) - SHARED + 1):
            if frag[i : i + SHARED] not in self.grams:
                continue
            j = i + SHARED
            while j < len(frag) and any(frag[i : j + 1] in p for p in self.passwords):
                j += 1
            best = max(best, j - i)
        return best

    def dsn_fragment(self, frag: str) -> bool:
        """Whether ``frag`` (as quoted, or unescaped: psycopg quotes with repr) is a piece of a registered DSN
        that overlaps where its password lies."""
        for piece in {frag, re.sub(r"\\(.)", r"\1", frag)}:
            for dsn, spans in self.dsns:
                at = dsn.find(piece)
                while at != -1:
                    if any(at < e and a < at + len(piece) for a, e in spans):
                        return True
                    at = dsn.find(piece, at + 1)
        return False

    def redact(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        for v in self.values:
            at = text.find(v)
            while at != -1:
                spans.append((at, at + len(v)))
                at = text.find(v, at + 1)
        if self.tokens is not None:
            spans.extend(m.span() for m in self.tokens.finditer(text))
        if self.passwords or self.dsns:
            for rx in _FRAGMENTS:
                spans.extend(m.span(1) for m in rx.finditer(text) if self.secret_fragment(m.group(1)))
            for rx in _LINE_FRAGMENTS:
                spans.extend(
                    m.span(1) for m in rx.finditer(text) if len(m.group(1)) > 1 and self.dsn_fragment(m.group(1))
                )
        for rx in _SHAPES:
            spans.extend(m.span("pw") for m in rx.finditer(text))
        return _mask(text, spans)


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """Each maximal run of masked characters becomes one MASK."""
    spans = sorted(s for s in spans if s[1] > s[0])
    if not spans:
        return text
    out, pos, cur_start, cur_end = [], 0, spans[0][0], spans[0][1]
    for start, end in spans[1:]:
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        out += [text[pos:cur_start], MASK]
        pos, cur_start, cur_end = cur_end, start, end
    out += [text[pos:cur_start], MASK, text[cur_end:]]
    return "".join(out)


@lru_cache(maxsize=64)
def _compiled(parts: _Parts) -> _Compiled:
    return _Compiled(parts)


class Redactor:
    """Remembers secrets (``add``) and masks them, and anything shaped like a password, in text. Thread-safe."""

    def __init__(self) -> None:
        self._parts = _Parts()
        self._compiled = _Compiled(self._parts)
        self._lock = threading.Lock()

    def add(self, secret: str | None) -> None:
        """Remember a secret: a DSN (with every form of its password) or any other secret string."""
        if not secret:
            return
        parts = _derive(secret)
        with self._lock:
            merged = self._parts | parts
            if merged != self._parts:
                self._parts, self._compiled = merged, _Compiled(merged)

    def redact(self, text: Any, secrets: Iterable[str | None] = ()) -> str:
        """``text`` (made a str) with the known secrets, those in ``secrets`` (for this call only) and
        anything shaped like a password masked."""
        out = text if isinstance(text, str) else str(text)
        compiled = self._compiled
        extra = [s for s in secrets if s]
        if extra:
            parts = self._parts
            for s in extra:
                parts = parts | _derive(s)
            compiled = _compiled(parts)
        return compiled.redact(out)

    __call__ = redact


SECRETS = Redactor()


def register(secret: str | None) -> None:
    """Remember a secret (a DSN, when one is read or connected with) process-wide."""
    SECRETS.add(secret)


def redact(text: Any, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every registered secret, every secret in ``secrets`` and every password-shaped part of a
    connection string masked as ``***``."""
    return SECRETS.redact(text, secrets)


def redact_data(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A copy of JSON-like data (dicts, lists, tuples, strings) with every string redacted; masking before
    serialising, because the JSON text would show a secret's quotes and backslashes escaped."""
    extra = tuple(secrets)
    if isinstance(value, str):
        return redact(value, extra)
    if isinstance(value, Mapping):
        return {k: redact_data(v, extra) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_data(v, extra) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in log records: the message and a formatted traceback (whose text repeats the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record alone
            return True
        clean = redact(message)
        if clean != message or record.exc_info or record.exc_text or record.stack_info:
            record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        return True


def redact_logs(logger: logging.Logger | None = None) -> None:
    """Mask secrets in logs. With a logger: in the records it creates (a filter on a logger does not see its
    children's records). Without: in everything the root logger's current handlers write. Idempotent."""
    targets: list[logging.Filterer] = [logger] if logger is not None else list(logging.getLogger().handlers)
    for t in targets:
        if not any(isinstance(f, RedactingFilter) for f in t.filters):
            t.addFilter(RedactingFilter())
