"""Issue 15, loaders: property/fuzz tests. Random CSV and Parquet files either load into a log whose every row
satisfies the documented ranges, with every skipped row counted, or raise the one-line DataError naming the
file; never any other exception.

The CSV and Parquet generators also carry an oracle: each generated row knows the reason it must be skipped
for (or its expected timestamp and weight), so the counts per reason and the kept values are checked exactly.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.loaders import BAD_REASONS, TS_MAX, TS_MIN, WEIGHT_MAX, Dataset, load_table

ITEMS = {"a": "drama", "b": "comedy", "c": "horror"}
#: Examples per test; LOADER_FUZZ_EXAMPLES=5000 for a deeper run.
EXAMPLES = int(os.environ.get("LOADER_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORDER = [
    "missing_field",
    "bad_timestamp",
    "timestamp_out_of_range",
    "bad_weight",
    "negative_weight",
    "weight_out_of_range",
    "unknown_item",
]


def _workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="loader-fuzz-")


def _items(d: Path) -> Path:
    path = d / "items.csv"
    path.write_text("item,cluster\n" + "".join(f"{i},{c}\n" for i, c in ITEMS.items()))
    return path


def _check(outcome: Dataset | DataError, path: Path) -> Dataset | None:
    """The invariants every outcome must meet; returns the dataset when it loaded."""
    if isinstance(outcome, DataError):
        text = str(outcome)
        event(f"DataError: {text.split(': ', 1)[1][:28]}")
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith(f"{path}: ") and len(text) > len(f"{path}: "), text
        return None
    log, r = outcome.log, outcome.report
    event("loaded, some rows kept" if len(log) else "loaded, no row kept")
    for reason in r.skipped:
        event(f"skipped: {reason}")
    assert r.rows_kept == len(log)
    assert r.rows_read == r.rows_kept + sum(r.skipped.values()), r
    assert set(r.skipped) <= set(BAD_REASONS) and all(v > 0 for v in r.skipped.values()), r
    assert log.ts.dtype == np.int64 and log.weight.dtype == np.float32
    assert ((log.ts >= TS_MIN) & (log.ts < TS_MAX)).all()
    assert (np.isfinite(log.weight) & (log.weight >= 0) & (log.weight <= WEIGHT_MAX)).all()
    assert ((log.item >= 0) & (log.item < len(log.item_cluster))).all()
    if len(log):
        assert log.user.min() == 0 and set(np.unique(log.user)) == set(range(int(log.user.max()) + 1))
    return outcome


def _load(inter: Path, items: Path) -> Dataset | DataError:
    try:
        return load_table(inter, items)
    except DataError as exc:  # anything else fails the test
        return exc


# -- CSV ---------------------------------------------------------------------------------------------------------

IN_RANGE = st.integers(TS_MIN, TS_MAX - 1)
INSTANT = st.datetimes(datetime(1970, 1, 1), datetime(2199, 12, 31), timezones=st.just(UTC))


def _iso(dt: datetime, style: int) -> str:
    if style == 0:
        return dt.replace(tzinfo=None).isoformat()  # naive: UTC
    if style == 1:
        return dt.isoformat().replace("+00:00", "Z")
    off = timezone(timedelta(hours=5, minutes=30))
    return dt.astimezone(off).isoformat() if dt.year > 1970 else dt.isoformat()


# A field is (text, reason or None, value): value is the expected seconds / weight when the field is good.
TS_FIELD = st.one_of(
    IN_RANGE.map(lambda v: (str(v), None, v)),
    st.tuples(st.integers(TS_MIN, TS_MAX - 2), st.floats(0, 0.999)).map(
        lambda p: (repr(p[0] + p[1]), None, math.floor(p[0] + p[1]))
    ),
    st.tuples(INSTANT, st.integers(0, 2)).map(lambda p: (_iso(p[0], p[1]), None, math.floor(p[0].timestamp()))),
    st.sampled_from(
        ["-1", "-1e9", "1e30", "9000000000000000000", str(TS_MAX), "99999999999999999999999", "2300-01-01"]
    ).map(lambda s: (s, "timestamp_out_of_range", None)),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "Infinity", "1e400", "yesterday", "2020-13-45", "12:00", "0x10"]).map(
        lambda s: (s, "bad_timestamp", None)
    ),
    st.sampled_from(["", "  "]).map(lambda s: (s, "missing_field", None)),
)
W_FIELD = st.one_of(
    st.floats(0, WEIGHT_MAX, allow_nan=False).map(lambda v: (repr(v), None, v)),
    st.integers(0, int(WEIGHT_MAX)).map(lambda v: (str(v), None, float(v))),
    st.sampled_from(["-1", "-0.5", "-1e308"]).map(lambda s: (s, "negative_weight", None)),
    st.sampled_from(["1e308", "1000000.5", "1e7", "18446744073709551616"]).map(
        lambda s: (s, "weight_out_of_range", None)
    ),
    st.sampled_from(["inf", "-inf", "nan", "lots", "4 stars", "1e400"]).map(lambda s: (s, "bad_weight", None)),
    st.sampled_from(["", " "]).map(lambda s: (s, "missing_field", None)),
)
ITEM_FIELD = st.one_of(
    st.sampled_from(sorted(ITEMS)).map(lambda s: (s, None, s)),
    st.sampled_from(["zzz", "A", "a b", "1"]).map(lambda s: (s, "unknown_item", None)),
    st.just(("", "missing_field", None)),
)
SAFE_TEXT = st.text(st.characters(blacklist_characters=',"\r\n', blacklist_categories=("Cs", "Zl", "Zp")), max_size=8)
USER_FIELD = st.one_of(
    SAFE_TEXT.map(lambda s: ("u" + s, None, ("u" + s).strip())),
    st.just(("", "missing_field", None)),
)
EXTRA_FIELD = st.one_of(SAFE_TEXT, st.just('q"uote'), st.just("x")).map(lambda s: (s, None, None))
FIELDS = {"user": USER_FIELD, "item": ITEM_FIELD, "ts": TS_FIELD, "weight": W_FIELD}


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@st.composite
def csv_files(draw: Any) -> tuple[bytes, list[str], list[dict[str, Any]]]:
    """(file bytes, header, rows); each row: {'line': form, 'fields': {column: (text, reason, value)}}."""
    cols = ["user", "item", "ts"] + (["weight"] if draw(st.booleans()) else [])
    cols += draw(st.lists(st.sampled_from(["extra", "note"]), max_size=2, unique=True))
    if draw(st.integers(0, 9)) == 0:  # sometimes a required column is absent: DataError
        cols.remove(draw(st.sampled_from(["user", "item", "ts"])))
    cols = draw(st.permutations(cols))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    rows, lines = [], [",".join(_quote(c) if draw(st.booleans()) else c for c in cols)]
    for _ in range(draw(st.integers(0, 25))):
        fields = {c: draw(FIELDS.get(c, EXTRA_FIELD)) for c in cols}
        texts = [_quote(fields[c][0]) if draw(st.integers(0, 4)) == 0 else fields[c][0] for c in cols]
        form = draw(st.sampled_from(["ok"] * 6 + ["too_many_fields", "too_few_fields", "bad_quoting"]))
        if form == "too_many_fields":
            texts.append(draw(SAFE_TEXT))
        elif form == "too_few_fields":
            texts = texts[: draw(st.integers(1, len(texts) - 1))] if len(texts) > 1 else texts
            if len(texts) == len(cols):
                form = "ok"
        elif form == "bad_quoting":  # one stray quote opening a field that never closes
            texts = [t.replace('"', "") for t in texts]
            i = draw(st.integers(0, len(texts) - 1))
            texts[i] = '"' + texts[i]
        line = ",".join(texts)
        if form == "too_few_fields" and not line.strip():
            line = "x"  # a blank line is no row at all
        if form == "ok" and not line.strip():
            continue
        rows.append({"line": form, "fields": fields})
        lines.append(line)
    text = eol.join(lines) + (eol if draw(st.booleans()) else "")
    return text.encode(), list(cols), rows


def _expected(cols: list[str], rows: list[dict[str, Any]]) -> tuple[Counter[str], list[tuple[int, float, str]]]:
    """Counts per reason and the kept (ts, weight, item) in file order, by the documented rules."""
    counts: Counter[str] = Counter()
    kept = []
    for row in rows:
        if row["line"] != "ok":
            counts[row["line"]] += 1
            continue
        f = row["fields"]
        reasons = {f[c][1] for c in ("user", "item", "ts", "weight") if c in cols} - {None}
        first = next((r for r in ORDER if r in reasons), None)
        if first:
            counts[first] += 1
        else:
            kept.append((f["ts"][2], f["weight"][2] if "weight" in cols else 1.0, f["item"][2]))
    return counts, kept


@SETTINGS
@given(csv_files())
def test_random_csv_files_load_exactly_as_documented(case: tuple[bytes, list[str], list[dict[str, Any]]]) -> None:
    data, cols, rows = case
    with _workdir() as d:
        inter = Path(d) / "events.csv"
        inter.write_bytes(data)
        outcome = _load(inter, _items(Path(d)))
        ds = _check(outcome, inter)
        if not {"user", "item", "ts"} <= set(cols):
            assert ds is None and "missing column" in str(outcome)
            return
        assert ds is not None, outcome
        counts, kept = _expected(cols, rows)
        assert ds.report.rows_read == len(rows)  # a well-formed-line file: every data line is counted
        assert dict(ds.report.skipped) == dict(counts)
        log = ds.log
        names = list(ITEMS)
        assert [(int(t), float(w), names[i]) for t, w, i in zip(log.ts, log.weight, log.item, strict=True)] == [
            (t, float(np.float32(w)), it) for t, w, it in kept
        ]


@SETTINGS
@given(st.one_of(st.binary(max_size=600), csv_files().map(lambda c: c[0])), st.data())
def test_random_bytes_and_mutated_csv_never_raise_anything_else(data: bytes, draw: st.DataObject) -> None:
    """Random bytes, and generated files with random bytes flipped, inserted or cut: invariants only."""
    if data and draw.draw(st.booleans()):
        buf = bytearray(data)
        for _ in range(draw.draw(st.integers(1, 6))):
            i = draw.draw(st.integers(0, len(buf)))
            op = draw.draw(st.sampled_from(["flip", "insert", "cut"]))
            b = draw.draw(st.sampled_from([0, 10, 13, 34, 44, 0xFF, 0xC3, draw.draw(st.integers(0, 255))]))
            if op == "insert" or i == len(buf):
                buf.insert(i, b)
            elif op == "flip":
                buf[i] = b
            else:
                del buf[i : i + draw.draw(st.integers(1, 20))]
        data = bytes(buf)
    name = draw.draw(st.sampled_from(["events.csv", "events.parquet", "events.csv.gz"]))
    with _workdir() as d:
        inter = Path(d) / name
        inter.write_bytes(data)
        _check(_load(inter, _items(Path(d))), inter)


# -- Parquet -----------------------------------------------------------------------------------------------------

PER = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
TZS = [None, "UTC", "Europe/Paris", "+05:30", "America/New_York"]


@st.composite
def ts_columns(draw: Any, n: int) -> tuple[pa.Array | None, list[tuple[str | None, int | None]]]:
    """A ts column of a random type and, per row, (reason, expected seconds). None column: a DataError type."""
    kind = draw(st.sampled_from(["timestamp", "int", "float", "string", "date32", "null", "bool", "list"]))
    nulls = [draw(st.integers(0, 5)) == 0 for _ in range(n)]
    out: list[tuple[str | None, int | None]] = []
    if kind == "timestamp":
        unit, tz = draw(st.sampled_from(sorted(PER))), draw(st.sampled_from(TZS))
        # Parquet stores seconds as milliseconds: keep those within what int64 milliseconds hold.
        lo, hi = (-(10**15), 10**15) if unit == "s" else (-(2**62), 2**62)
        vals = [draw(st.one_of(st.integers(0, TS_MAX * PER[unit] - 1), st.integers(lo, hi))) for _ in range(n)]
        for v, null in zip(vals, nulls, strict=True):
            ok = 0 <= v < TS_MAX * PER[unit]
            out.append(
                ("missing_field", None)
                if null
                else ((None, v // PER[unit]) if ok else ("timestamp_out_of_range", None))
            )
        return pa.array([None if z else v for v, z in zip(vals, nulls, strict=True)], pa.timestamp(unit, tz)), out
    if kind == "int":
        vals = [draw(st.one_of(IN_RANGE, st.integers(-(2**63), 2**63 - 1))) for _ in range(n)]
        for v, null in zip(vals, nulls, strict=True):
            out.append(
                ("missing_field", None)
                if null
                else ((None, v) if TS_MIN <= v < TS_MAX else ("timestamp_out_of_range", None))
            )
        return pa.array([None if z else v for v, z in zip(vals, nulls, strict=True)], pa.int64()), out
    if kind == "float":
        vals = [
            draw(st.one_of(st.floats(0, TS_MAX - 1), st.floats(allow_nan=True, allow_infinity=True))) for _ in range(n)
        ]
        for v, null in zip(vals, nulls, strict=True):
            if null:
                out.append(("missing_field", None))
            elif not math.isfinite(v):
                out.append(("bad_timestamp", None))
            else:
                out.append((None, math.floor(v)) if TS_MIN <= v < TS_MAX else ("timestamp_out_of_range", None))
        return pa.array([None if z else v for v, z in zip(vals, nulls, strict=True)], pa.float64()), out
    if kind == "string":
        texts = []
        for null in nulls:
            text, reason, value = draw(TS_FIELD)
            texts.append(None if null else text)
            out.append(("missing_field", None) if null else (reason, value))
        return pa.array(texts, pa.string()), out
    if kind == "date32":
        vals = [draw(st.integers(-(10**6), 10**6)) for _ in range(n)]
        for v, null in zip(vals, nulls, strict=True):
            ok = TS_MIN <= v * 86_400 < TS_MAX
            out.append(
                ("missing_field", None) if null else ((None, v * 86_400) if ok else ("timestamp_out_of_range", None))
            )
        return pa.array([None if z else v for v, z in zip(vals, nulls, strict=True)], pa.date32()), out
    if kind == "null":
        return pa.nulls(n), [("missing_field", None)] * n
    return None, []  # bool or list: a DataError whatever the rows


@st.composite
def parquet_cases(draw: Any) -> tuple[pa.Table, list[dict[str, Any]] | None, list[str]]:
    n = draw(st.integers(0, 20))
    ts_col, ts_rows = draw(ts_columns(n))
    kind_u = draw(st.sampled_from(["string", "int", "float"]))
    users: list[Any] = []
    u_reason = []
    for _ in range(n):
        if draw(st.integers(0, 6)) == 0:
            users.append(None if kind_u != "float" or draw(st.booleans()) else float("nan"))
            u_reason.append("missing_field")
        else:
            users.append({"string": "u%d", "int": "%d", "float": "%d.5"}[kind_u] % draw(st.integers(0, 5)))
            u_reason.append(None)
    users_arr = pa.array(
        [
            None
            if u is None
            else (
                u if kind_u == "string" else (int(u) if kind_u == "int" else (u if isinstance(u, float) else float(u)))
            )
            for u in users
        ],
        {"string": pa.string(), "int": pa.int64(), "float": pa.float64()}[kind_u],
    )
    item_fields = [draw(ITEM_FIELD) for _ in range(n)]
    items_arr = pa.array([t or None for t, _, _ in item_fields], pa.string())
    if draw(st.booleans()):
        items_arr = items_arr.dictionary_encode()
    columns: dict[str, pa.Array] = {"user": users_arr, "item": items_arr}
    w_kind = draw(st.sampled_from(["absent", "float", "int", "string", "bool"]))
    w_rows: list[tuple[str | None, float | None]] = [(None, 1.0)] * n
    if w_kind == "float":
        ws = [
            draw(st.one_of(st.floats(0, WEIGHT_MAX), st.floats(allow_nan=True, allow_infinity=True))) for _ in range(n)
        ]
        w_rows = [
            ("bad_weight", None)
            if not math.isfinite(w)
            else ("negative_weight", None)
            if w < 0
            else ("weight_out_of_range", None)
            if w > WEIGHT_MAX
            else (None, w)
            for w in ws
        ]
        columns["weight"] = pa.array(ws, pa.float64())
    elif w_kind == "int":
        wi = [draw(st.integers(-(2**63), 2**63 - 1)) for _ in range(n)]
        w_rows = [
            ("negative_weight", None)
            if w < 0
            else ("weight_out_of_range", None)
            if w > WEIGHT_MAX
            else (None, float(w))
            for w in wi
        ]
        columns["weight"] = pa.array(wi, pa.int64())
    elif w_kind == "string":
        wf = [draw(W_FIELD) for _ in range(n)]
        w_rows = [(r, v) for _, r, v in wf]
        columns["weight"] = pa.array([t for t, _, _ in wf], pa.string())
    elif w_kind == "bool":
        wb = [draw(st.booleans()) for _ in range(n)]
        w_rows = [(None, float(b)) for b in wb]
        columns["weight"] = pa.array(wb, pa.bool_())
    if ts_col is not None:
        columns["ts"] = ts_col
    else:
        columns["ts"] = (
            pa.array([True] * n, pa.bool_()) if draw(st.booleans()) else pa.array([[1]] * n, pa.list_(pa.int64()))
        )
    dropped = draw(st.sampled_from([None] * 8 + ["user", "item", "ts"]))
    if dropped:
        del columns[dropped]
    table = pa.table(columns)
    if ts_col is None or dropped:
        return table, None, [c for c in ("user", "item", "ts") if c not in columns]
    rows = []
    for i in range(n):
        reasons = {u_reason[i], item_fields[i][1], ts_rows[i][0], w_rows[i][0]} - {None}
        rows.append(
            {
                "reason": next((r for r in ORDER if r in reasons), None),
                "ts": ts_rows[i][1],
                "weight": w_rows[i][1],
                "item": item_fields[i][2],
            }
        )
    return table, rows, []


@SETTINGS
@given(parquet_cases(), st.sampled_from(["none", "snappy", "zstd"]), st.integers(0, 3))
def test_random_parquet_files_load_exactly_as_documented(
    case: tuple[pa.Table, list[dict[str, Any]] | None, list[str]], compression: str, damage: int
) -> None:
    table, rows, missing = case
    with _workdir() as d:
        inter = Path(d) / "events.parquet"
        pq.write_table(table, inter, compression=compression, row_group_size=max(1, table.num_rows // 2 or 1))
        if damage == 0:  # a truncated or corrupted copy: a DataError or a clean load, nothing else
            raw = bytearray(inter.read_bytes())
            rnd = random.Random(len(raw))
            for _ in range(4):
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
            inter.write_bytes(bytes(raw[: rnd.randrange(4, len(raw) + 1)]))
            _check(_load(inter, _items(Path(d))), inter)
            return
        outcome = _load(inter, _items(Path(d)))
        ds = _check(outcome, inter)
        if rows is None:
            assert ds is None, "a missing column or a ts column of an unusable type must be a DataError"
            assert ("missing column" if missing else "column 'ts' has type") in str(outcome), outcome
            return
        assert ds is not None, outcome
        assert ds.report.rows_read == len(rows)
        assert dict(ds.report.skipped) == dict(Counter(r["reason"] for r in rows if r["reason"]))
        kept = [r for r in rows if r["reason"] is None]
        names = list(ITEMS)
        got = [(int(t), float(w), names[i]) for t, w, i in zip(ds.log.ts, ds.log.weight, ds.log.item, strict=True)]
        assert got == [(r["ts"], float(np.float32(r["weight"])), r["item"]) for r in kept]
