"""Loaders into the canonical InteractionLog: MovieLens directories, generic CSV/Parquet, synthetic.

A file that cannot be loaded at all (missing, empty, binary, a fake Parquet, a required column absent, a column
of an unusable type, no header) raises DataError, whose str() is ONE line naming the file and the problem.
A bad ROW never raises: it is counted under the first reason below that applies, and skipped; every other row
loads. rows_read == rows_kept + sum(skipped) always holds (blank lines are not rows).

Accepted values (docs/data.md, "Accepted values and bad rows"):

- CSV: comma-separated UTF-8 text with a header line; a .gz/.bz2/.zst/.lz4 suffix is decompressed. A line with
  more or fewer fields than the header is `too_many_fields` / `too_few_fields`; a line whose quotes do not close
  on that same line is `bad_quoting` (a quoted value never spans lines, so one stray quote costs one line, never
  the rest of the file); a line that is not valid UTF-8 is `bad_encoding`. Parquet is recognised by its magic
  bytes; a Parquet binary value used as text that is not UTF-8 is `bad_encoding` too.
- user, item: text or numbers, surrounding whitespace stripped; empty or null is `missing_field`; longer than
  ID_MAX_CHARS (256) characters (an event id too) is `id_too_long`. An item absent from the items file
  (movies.csv for MovieLens; the store's catalogue for an ingest) is `unknown_item`.
- ts is read by the column's TYPE: timestamps by their unit (s/ms/us/ns; tz-aware ones as the UTC instant,
  naive ones taken as UTC), dates as their UTC midnight, integers and floats as seconds since the epoch
  (fractions floored), text as a number of seconds or an ISO-8601 date/time (no offset: UTC). Accepted:
  TS_MIN <= ts < TS_MAX, i.e. 1970-01-01T00:00:00Z up to (not including) 2200-01-01T00:00:00Z; outside is
  `timestamp_out_of_range`; unparseable, NaN or infinite is `bad_timestamp`.
- weight (optional; 1.0 when the column is absent): a finite number, 0 <= weight <= WEIGHT_MAX (1e6).
  Unparseable, NaN or infinite is `bad_weight`; below 0 `negative_weight`; above 1e6 `weight_out_of_range`.

Parsing is vectorised (pyarrow's CSV reader, Arrow compute, numpy): a bad row costs nothing extra. Only lines
with a quote character are matched for quoting, and only the non-ASCII lines of a file that is not all UTF-8
(or a Parquet binary column that is not) are decoded one by one.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recupdate_workloads.data.errors import DataError, one_line
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog, normalize_name

#: Accepted timestamps, unix seconds: 1970-01-01T00:00:00Z <= ts < 2200-01-01T00:00:00Z.
TS_MIN = 0
TS_MAX = 7_258_118_400
#: Accepted weights: finite, 0 <= w <= WEIGHT_MAX (float32 holds them; 1e308 would become inf).
WEIGHT_MAX = 1e6

#: Why a row was skipped, in the order they are checked (a row counts under the first that applies).
BAD_REASONS = (
    "bad_encoding",
    "bad_quoting",
    "too_many_fields",
    "too_few_fields",
    "missing_field",
    "id_too_long",
    "bad_timestamp",
    "timestamp_out_of_range",
    "bad_weight",
    "negative_weight",
    "weight_out_of_range",
    "unknown_item",
)
#: Why an items/clusters/movies row was skipped (its interactions then count as unknown_item).
BAD_CATALOGUE_REASONS = (
    "too_many_fields",
    "too_few_fields",
    "bad_quoting",
    "bad_encoding",
    "missing_field",
    "bad_cluster",
)

_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# One CSV field as pyarrow parses it: quoted ("" escapes a quote; no CR inside, so no line break), or unquoted.
_FIELD = r'(?:"(?:[^"\r]|"")*"[^,"\r\n]*|[^",\r\n][^,\r\n]*|)'
_LINE = rf"^{_FIELD}(?:,{_FIELD})*\r?\n?$"
_LINE_RE = re.compile(_LINE)
_NUMBER = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_NON_FINITE = r"(?i)^[+-]?(?:inf|infinity|nan)$"


@dataclass
class LoadReport:
    """What a loader read: rows kept and rows skipped per reason (and catalogue rows skipped, per reason)."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    catalogue_skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"read {self.rows_read} rows, kept {self.rows_kept}, skipped: {bad}"
        if self.catalogue_skipped:
            text += "; catalogue rows skipped: " + ", ".join(
                f"{k}={v}" for k, v in sorted(self.catalogue_skipped.items())
            )
        return text


@dataclass
class Dataset:
    """A loaded log with its catalogue and the report of what was skipped."""

    log: InteractionLog
    report: LoadReport
    name: str

    @property
    def catalogue(self) -> Catalogue:
        return self.log.catalogue


# -- reading files ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """The needed columns of one file (those present), its data rows (skipped lines included) and the lines
    skipped before any value was looked at."""

    columns: dict[str, pa.Array]
    rows: int
    skipped: Counter[str]

    @property
    def length(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def _read(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> _Raw:
    """Read the `required` (DataError if absent) and `optional` columns of a CSV or Parquet file."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, not a data file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    if magic == _PARQUET_MAGIC:
        return _read_parquet(path, required, optional)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        raise DataError(path, "not a Parquet file (no PAR1 magic bytes)")
    return _read_csv(path, required, optional)


def _pick(path: Path, names: list[str], required: Sequence[str], optional: Sequence[str]) -> list[str]:
    """The needed columns present; DataError for a required one absent or any needed one repeated."""
    missing = [c for c in required if c not in names]
    if missing:
        shown = ", ".join(repr(one_line(n, 40)) for n in names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(
            path, f"missing column(s) {', '.join(map(repr, missing))}; the file has: {shown or 'no columns'}"
        )
    present = [c for c in dict.fromkeys([*required, *optional]) if c in names]
    for c in present:
        if names.count(c) > 1:
            raise DataError(path, f"column {c!r} appears {names.count(c)} times")
    return present


def _read_parquet(path: Path, required: Sequence[str], optional: Sequence[str]) -> _Raw:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(path, f"not a readable Parquet file ({one_line(str(exc), 160)})") from None
    present = _pick(path, list(schema.names), required, optional)
    try:
        table = pq.read_table(path, columns=present)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(path, f"cannot read the Parquet data ({one_line(str(exc), 160)})") from None
    return _Raw({c: table.column(c).combine_chunks() for c in present}, table.num_rows, Counter())


def _file_buffer(path: Path) -> pa.Buffer:
    try:
        if path.suffix.lower() in _COMPRESSED_SUFFIXES:
            with pa.input_stream(str(path), compression="detect") as f:
                return f.read_buffer()
        with pa.memory_map(str(path)) as m:
            return m.read_buffer()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"cannot read ({one_line(str(exc), 160)})") from None


def _line_end(data: np.ndarray, start: int) -> int:
    """Index of the first newline at or after `start` (len(data) if none), scanning in blocks."""
    step = 1 << 16
    for lo in range(start, len(data), step):
        hits = np.flatnonzero(data[lo : lo + step] == 10)
        if len(hits):
            return lo + int(hits[0])
    return len(data)


def _read_csv(path: Path, required: Sequence[str], optional: Sequence[str]) -> _Raw:
    buf = _file_buffer(path)
    data = np.frombuffer(buf, dtype=np.uint8)
    # The header: the first non-blank line.
    start = 3 if data[:3].tobytes() == b"\xef\xbb\xbf" else 0  # a UTF-8 byte-order mark
    while True:
        if start >= len(data):
            raise DataError(path, "empty file: no header line")
        end = _line_end(data, start)
        raw_header = data[start:end].tobytes().rstrip(b"\r")
        if raw_header.strip():
            break
        start = end + 1
    if b"\x00" in raw_header:  # a NUL in a row is a bad value; in the header, the file is not text
        raise DataError(path, "binary content (NUL bytes in the first line): not a CSV text file")
    try:
        header = raw_header.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text: the header line cannot be decoded") from None
    if not _LINE_RE.match(header):
        raise DataError(path, "malformed header line (a quote that does not close)")
    names = [n.strip() for n in next(csv.reader([header]))]
    present = _pick(path, names, required, optional)
    body = buf.slice(min(end + 1, len(data)))
    body, skipped = _drop_bad_lines(body)  # every line left is UTF-8 and closes its quotes
    # pyarrow needs unique names; only the needed ones are read, and those are unique (_pick).
    unique = [n if names.index(n) == i else f"{n}\x00{i}" for i, n in enumerate(names)]
    empty = {c: pa.array([], pa.string()) for c in present}
    if not len(body):
        return _Raw(empty, sum(skipped.values()), skipped)
    bad_lines: list[str] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:  # called per malformed line only
        bad_lines.append("too_few_fields" if row.actual_columns < row.expected_columns else "too_many_fields")
        return "skip"

    block = 1 << 22
    for _ in range(2):
        bad_lines.clear()
        try:
            table = pcsv.read_csv(
                pa.BufferReader(body),
                read_options=pcsv.ReadOptions(column_names=unique, block_size=block),
                parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
                # Text: typing happens per column, where bad values are counted, not raised.
                convert_options=pcsv.ConvertOptions(
                    include_columns=present, column_types=dict.fromkeys(present, pa.string()), check_utf8=False
                ),
            )
            break
        except pa.ArrowInvalid as exc:
            if "Empty CSV" in str(exc):
                return _Raw(empty, sum(skipped.values()), skipped)
            if "straddl" not in str(exc):  # anything else is not a row problem
                raise DataError(path, f"cannot parse as CSV ({one_line(str(exc), 160)})") from None
            # A line longer than a block: read with blocks longer than the longest line.
            nl = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10)
            block = int(np.diff(np.r_[-1, nl, len(body)]).max()) + 2
    else:  # pragma: no cover - the second pass has blocks longer than any line
        raise DataError(path, "cannot parse as CSV")
    skipped.update(bad_lines)
    cols = {c: table.column(c).combine_chunks() for c in present}
    return _Raw(cols, table.num_rows + sum(skipped.values()), skipped)


def _drop_bad_lines(body: pa.Buffer) -> tuple[pa.Buffer, Counter[str]]:
    """Remove the lines that are not UTF-8 (bad_encoding) or whose quoting does not close on the line
    (bad_quoting); returns (body, lines removed per reason).

    pyarrow lets a quoted value run over line ends, so one stray quote would swallow every line after it; and it
    cannot report a malformed line that is not UTF-8. A valid file costs one UTF-8 validation and one byte scan;
    only lines with a quote are matched (vectorised: RE2 through Arrow), only lines with non-ASCII bytes of a
    file that failed validation are decoded one by one.
    """
    data = np.frombuffer(body, dtype=np.uint8)
    removed: Counter[str] = Counter()
    try:
        whole = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, len(data)], np.int64)), body]
        )
        whole.cast(pa.large_string())
        utf8 = True
    except pa.ArrowInvalid:
        utf8 = False
    quotes = np.flatnonzero(data == 34)
    if utf8 and not len(quotes):
        return body, removed
    nl = np.flatnonzero(data == 10)
    offsets = np.r_[0, nl + 1] if len(nl) and nl[-1] == len(data) - 1 else np.r_[0, nl + 1, len(data)]
    offsets = offsets.astype(np.int64)
    bad = np.zeros(len(offsets) - 1, dtype=bool)
    if not utf8:
        for i in np.unique(np.searchsorted(offsets, np.flatnonzero(data >= 0x80), side="right") - 1).tolist():
            try:
                data[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
        removed["bad_encoding"] = int(bad.sum())
    if len(quotes):
        lines = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(bad), [None, pa.py_buffer(offsets), body])
        quoted = np.unique(np.searchsorted(offsets, quotes, side="right") - 1)
        quoted = quoted[~bad[quoted]]
        ok = pc.match_substring_regex(lines.take(pa.array(quoted)), _LINE).to_numpy(zero_copy_only=False)
        removed["bad_quoting"] = int((~ok).sum())
        bad[quoted[~ok]] = True
    if not bad.any():
        return body, Counter()
    lines_bad = np.flatnonzero(bad)
    edges = np.zeros(len(data) + 1, dtype=np.int8)
    edges[offsets[lines_bad]] += 1
    edges[offsets[lines_bad + 1]] -= 1
    keep = np.cumsum(edges[:-1]) == 0
    return pa.py_buffer(data[keep].tobytes()), +removed


# -- typing columns --------------------------------------------------------------------------------------------


def _plain(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    return arr


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _decode(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Binary -> UTF-8 text; values that are not UTF-8 become null and are flagged (a per-value slow path,
    taken only for a column that holds such a value)."""
    try:
        return pc.cast(arr, pa.large_string()), None
    except pa.ArrowInvalid:
        values, bad = [], np.zeros(len(arr), dtype=bool)
        for i, v in enumerate(arr.to_pylist()):
            try:
                values.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
                bad[i] = True
        return pa.array(values, pa.large_string()), bad


def _text(arr: pa.Array, name: str, path: Path | str) -> tuple[pa.Array, np.ndarray | None]:
    """A column as stripped text, null where missing (empty, null, NaN); plus the undecodable-row mask."""
    arr = _plain(arr)
    t = arr.type
    bad = None
    if pa.types.is_null(t):
        arr = pa.nulls(len(arr), pa.large_string())
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        arr, bad = _decode(arr if not pa.types.is_fixed_size_binary(t) else arr.cast(pa.binary()))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = arr.cast(pa.large_string())
    else:
        try:  # numbers (NaN is missing), booleans, dates...: their text, as the items file would spell them
            if pa.types.is_floating(t):
                arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, t), arr)
            arr = pc.cast(arr, pa.large_string())
        except pa.ArrowException:  # lists, structs, maps...
            raise DataError(path, f"column {name!r} has type {t}: expected text or numbers") from None
    arr = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.large_string()), arr), bad


def _numbers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Text -> float64 (NaN where not a number) and the mask of values that are neither numbers nor the words
    inf/nan (so may be dates)."""
    n = len(text)
    try:  # the common case, a column of numbers: one cast (inf/nan words parse as non-finite, as below)
        values = np.asarray(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return values, np.zeros(n, dtype=bool)
    except pa.ArrowInvalid:
        pass
    values = np.full(n, np.nan)
    is_num = _mask(pc.match_substring_regex(text, _NUMBER))
    if is_num.any():
        sub = text.filter(pa.array(is_num))
        try:
            values[is_num] = pc.cast(sub, pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # fast_float refused one: parse them one by one
            values[is_num] = [float(s) for s in sub.to_pylist()]
    words = is_num | _mask(pc.match_substring_regex(text, _NON_FINITE)) | _mask(pc.is_null(text))
    return values, ~words


def _iso_seconds(text: list[str]) -> np.ndarray:
    """ISO-8601 strings -> unix seconds as float64 (NaN where unparseable); no offset means UTC."""
    try:
        parsed = pd.to_datetime(pd.Series(text, dtype=object), errors="coerce", utc=True, format="ISO8601")
        arr = parsed.dt.tz_convert(None).to_numpy()
        unit = np.datetime_data(arr.dtype)[0]
        out = (arr.view(np.int64) // _UNIT_PER_SECOND[unit]).astype(np.float64)
        out[np.isnat(arr)] = np.nan
        return out
    except (ValueError, TypeError, OverflowError, KeyError):  # one odd value: parse them one by one
        return np.array([_iso_one(s) for s in text], dtype=np.float64)


def _iso_one(s: str) -> float:
    try:
        ts = pd.to_datetime(s, errors="coerce", utc=True, format="ISO8601")
        return float(np.floor(ts.timestamp())) if not pd.isna(ts) else np.nan
    except (ValueError, TypeError, OverflowError):
        return np.nan


@dataclass
class _Checked:
    """Values of one column and its per-row problem masks (reason -> mask)."""

    values: np.ndarray
    missing: np.ndarray
    problems: dict[str, np.ndarray]


def _float_values(arr: pa.Array) -> np.ndarray:
    """A numeric Arrow array as float64 (nulls as NaN; int64 beyond 2**53 rounds, harmlessly out of range)."""
    if pa.types.is_integer(arr.type):
        return np.asarray(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)).astype(np.float64)
    return np.asarray(pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False), dtype=np.float64)


def _seconds(arr: pa.Array, name: str, path: Path | str) -> _Checked:
    """Timestamps by the column's type, to unix seconds, with bad_timestamp / timestamp_out_of_range masks."""
    arr = _plain(arr)
    t = arr.type
    n = len(arr)
    none = np.zeros(n, dtype=bool)
    enc = None
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        # Arrow stores a tz-aware timestamp as the UTC instant and a naive one as wall time: both read as UTC.
        if pa.types.is_timestamp(t):
            per, scale = _UNIT_PER_SECOND[t.unit], 1
        elif pa.types.is_date32(t):
            per, scale = 1, 86_400
        else:
            per, scale = 1_000, 1
        missing = _mask(pc.is_null(arr))
        raw = np.asarray(
            pc.fill_null(arr.view(pa.int64()) if t.bit_width == 64 else arr.view(pa.int32()), 0).to_numpy(
                zero_copy_only=False
            ),
            dtype=np.int64,
        )
        oor = ~missing & ((raw * scale < TS_MIN * per) | (raw * scale >= TS_MAX * per))
        secs = np.where(oor | missing, 0, raw * scale // per)
        return _Checked(secs.astype(np.int64), missing, {"bad_timestamp": none, "timestamp_out_of_range": oor})
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        missing = _mask(pc.is_null(arr))
        values = _float_values(arr)
    elif _is_text(t):
        text, enc = _text(arr, name, path)
        missing = _mask(pc.is_null(text))
        values, maybe_date = _numbers(text)
        if maybe_date.any():
            values[maybe_date] = _iso_seconds(text.filter(pa.array(maybe_date)).to_pylist())
    else:
        raise DataError(path, f"column {name!r} has type {t}: expected timestamps, dates, numbers or ISO-8601 text")
    finite = np.isfinite(values)
    bad = ~missing & ~finite
    oor = ~missing & finite & ((values < TS_MIN) | (values >= TS_MAX))
    secs = np.floor(np.where(finite & ~oor, values, 0)).astype(np.int64)
    problems = {"bad_timestamp": bad, "timestamp_out_of_range": oor}
    if enc is not None:
        problems["bad_encoding"] = enc
    return _Checked(secs, missing, problems)


def _is_text(t: pa.DataType) -> bool:
    """Columns read as text and parsed (CSV cells, or a Parquet string column); null: an all-empty column."""
    return (
        pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _weights(arr: pa.Array, name: str, path: Path | str) -> _Checked:
    """Weights as float64 with bad_weight / negative_weight / weight_out_of_range masks."""
    arr = _plain(arr)
    t = arr.type
    enc = None
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        missing = _mask(pc.is_null(arr))
        values = _float_values(arr.cast(pa.int8()) if pa.types.is_boolean(t) else arr)
    elif _is_text(t):
        text, enc = _text(arr, name, path)
        missing = _mask(pc.is_null(text))
        values, _ = _numbers(text)
    else:
        raise DataError(path, f"column {name!r} has type {t}: expected numbers")
    finite = np.isfinite(values)
    problems = {
        "bad_weight": ~missing & ~finite,
        "negative_weight": ~missing & finite & (values < 0),
        "weight_out_of_range": ~missing & finite & (values > WEIGHT_MAX),
    }
    if enc is not None:
        problems["bad_encoding"] = enc
    return _Checked(np.where(finite, values, 0.0), missing, problems)


def _codes(text: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Dictionary codes of a text column (first-seen order; -1 where null) and its distinct values."""
    enc = pc.dictionary_encode(text)
    idx = np.asarray(pc.fill_null(enc.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return idx, enc.dictionary.to_pylist()


# -- rows into a log -------------------------------------------------------------------------------------------


#: The canonical column names; a column mapping renames them to a source's own.
_CANONICAL = {"user": "user", "item": "item", "ts": "ts", "weight": "weight", "event_id": "event_id"}


@dataclass
class CheckedRows:
    """Interaction rows validated by check_rows: typed columns, which rows are kept, and why the others are not.

    `user`, `item` (and `event_id`) are stripped text (external ids: the integer 42 and the text "42" are the
    same id); `ts` unix seconds; `weight` float64 (the default where the column is absent). Rows where `ok` is
    False are counted in `skipped` under their first reason and must be skipped."""

    user: pa.Array
    item: pa.Array
    ts: np.ndarray
    weight: np.ndarray
    event_id: pa.Array | None
    ok: np.ndarray
    skipped: Counter[str]
    rows: int


#: The longest external id (user, item, event id) accepted, in characters: PostgreSQL's btree indexes, which
#: the id maps use, refuse keys of more than about 2.7 kB, and one such row would fail a whole transaction.
ID_MAX_CHARS = 256


def check_rows(
    columns: Mapping[str, pa.Array],
    path: Path | str,
    cols: Mapping[str, str] | None = None,
    default_weight: float = 1.0,
    skipped: Counter[str] | None = None,
) -> CheckedRows:
    """Validate interaction rows (docs/data.md, "Accepted values and bad rows"): every reason of BAD_REASONS but
    unknown_item (the caller knows the items). `cols` maps the canonical names user, item, ts, weight and
    event_id to the names in `columns`; user, item and ts must be present, weight and event_id are optional.
    `skipped`: lines dropped before any value was looked at (they are added to the result's counts).

    A column of an unusable type (a list as ts) is a DataError; a bad value never raises."""
    c = _CANONICAL | dict(cols or {})
    _pick(Path(path), [str(k) for k in columns], [c["user"], c["item"], c["ts"]], [])
    user_col = columns[c["user"]]
    n = len(user_col)
    user, user_enc = _text(user_col, c["user"], path)
    item, item_enc = _text(columns[c["item"]], c["item"], path)
    ts = _seconds(columns[c["ts"]], c["ts"], path)
    weight = _weights(columns[c["weight"]], c["weight"], path) if c["weight"] in columns else None
    event_id, ev_enc = _text(columns[c["event_id"]], c["event_id"], path) if c["event_id"] in columns else (None, None)
    enc = np.zeros(n, dtype=bool)
    for m in (
        user_enc,
        item_enc,
        ev_enc,
        ts.problems.get("bad_encoding"),
        weight.problems.get("bad_encoding") if weight else None,
    ):
        if m is not None:
            enc |= m
    missing = _mask(pc.is_null(user)) | _mask(pc.is_null(item)) | ts.missing
    if weight is not None:
        missing |= weight.missing
    too_long = _mask(pc.greater(pc.utf8_length(user), ID_MAX_CHARS)) | _mask(
        pc.greater(pc.utf8_length(item), ID_MAX_CHARS)
    )
    if event_id is not None:
        too_long |= _mask(pc.greater(pc.utf8_length(event_id), ID_MAX_CHARS))
    checks: list[tuple[str, np.ndarray]] = [
        ("bad_encoding", enc),
        ("missing_field", missing),
        ("id_too_long", too_long),
    ]
    checks += [(k, ts.problems[k]) for k in ("bad_timestamp", "timestamp_out_of_range")]
    if weight is not None:
        checks += [(k, weight.problems[k]) for k in ("bad_weight", "negative_weight", "weight_out_of_range")]
    counts: Counter[str] = Counter(skipped or {})
    bad = np.zeros(n, dtype=bool)
    for reason, mask in checks:  # first reason wins: each skipped row is counted once
        m = mask & ~bad
        counts[reason] += int(m.sum())
        bad |= m
    w = weight.values if weight is not None else np.full(n, default_weight, dtype=np.float64)
    return CheckedRows(
        user=user,
        item=item,
        ts=ts.values,
        weight=w,
        event_id=event_id,
        ok=~bad,
        skipped=Counter({k: v for k, v in counts.items() if v}),
        rows=n + sum((skipped or {}).values()),
    )


def _to_log(
    raw: _Raw,
    path: Path | str,
    cols: dict[str, str],
    item_cluster: dict[str, int],
    catalogue: Catalogue,
    default_weight: float,
) -> tuple[InteractionLog, LoadReport]:
    checked = check_rows(raw.columns, path, cols, default_weight, raw.skipped)
    report = LoadReport(rows_read=raw.rows, skipped=Counter(checked.skipped))
    user_idx, _ = _codes(checked.user)
    item_idx, item_names = _codes(checked.item)
    item_ids = {name: i for i, name in enumerate(item_cluster)}
    lut = np.array([item_ids.get(s, -1) for s in item_names] + [-1], dtype=np.int64)
    item_dense = lut[item_idx]  # idx -1 (null) hits the trailing -1
    unknown = checked.ok & (item_dense < 0)
    if unknown.any():
        report.skipped["unknown_item"] += int(unknown.sum())
    ok = checked.ok & ~unknown
    user_codes, _ = pd.factorize(user_idx[ok])  # dense user ids in first-seen order
    log = InteractionLog(
        user=np.asarray(user_codes, dtype=np.int64),
        item=item_dense[ok].astype(np.int64),
        ts=checked.ts[ok].astype(np.int64),
        weight=checked.weight[ok].astype(np.float32),
        item_cluster=np.fromiter(item_cluster.values(), dtype=np.int32, count=len(item_cluster)),
        catalogue=catalogue,
    )
    report.rows_kept = len(log)
    return log, report


def frame_to_log(
    frame: pd.DataFrame,
    item_cluster: dict[str, int],
    catalogue: Catalogue,
    columns: dict[str, str] | None = None,
    default_weight: float = 1.0,
) -> tuple[InteractionLog, LoadReport]:
    """Validate raw rows (any dtype) into a log. `columns` maps canonical names (user, item, ts, weight)
    to the frame's own column names. Items are external ids (strings); users may be anything hashable."""
    cols = _CANONICAL | (columns or {})
    present = _pick(
        Path("<frame>"), [str(c) for c in frame.columns], [cols["user"], cols["item"], cols["ts"]], [cols["weight"]]
    )
    arrays: dict[str, pa.Array] = {}
    for c in present:
        try:
            arrays[c] = pa.array(frame[c], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):  # mixed object column: its text
            arrays[c] = pa.array(frame[c].astype("string"), from_pandas=True)
    return _to_log(_Raw(arrays, len(frame), Counter()), "<frame>", cols, item_cluster, catalogue, default_weight)


# -- catalogues ------------------------------------------------------------------------------------------------


def _catalogue(names: list[str], keywords: dict[str, tuple[str, ...]], path: Path | str) -> Catalogue:
    """Clusters 0..n-1 in `names` order; DataError for two names equal once case and punctuation are ignored."""
    seen: dict[str, str] = {}
    for n in names:
        other = seen.setdefault(normalize_name(n), n)
        if other != n:
            raise DataError(
                path, f"clusters {other!r} and {n!r} are the same name once case and punctuation are ignored"
            )
    return Catalogue([Cluster(id=i, name=n, keywords=keywords.get(n, (n,))) for i, n in enumerate(names)])


def _valid_text(raw: _Raw, path: Path, names: Sequence[str], skipped: Counter[str]) -> tuple[list[str | None], ...]:
    """Text of the given columns over the rows where every required one is present (counted otherwise)."""
    texts, enc = [], np.zeros(raw.length, dtype=bool)
    for n in names:
        if n in raw.columns:
            t, e = _text(raw.columns[n], n, path)
            if e is not None:
                enc |= e
        else:
            t = pa.nulls(raw.length, pa.large_string())
        texts.append(t)
    skipped.update(raw.skipped)
    missing = _mask(pc.is_null(texts[0]))
    skipped["bad_encoding"] += int(enc.sum())
    skipped["missing_field"] += int((missing & ~enc).sum())
    keep = pa.array(~(enc | missing))
    return tuple(t.filter(keep).to_pylist() for t in texts)


_NO_GENRE = "(no genres listed)"


def movielens_clusters(genres: pd.Series, mode: str = "pair") -> tuple[list[str], list[tuple[str, ...]]]:
    """Cluster of each movie: its two most specific genres ('pair'), or its most specific one ('genre').

    The most specific genre is the one the fewest movies carry (173 pair clusters on ml-latest-small; single
    genres are too coarse, full combinations too sparse).
    """
    lists = genres.fillna(_NO_GENRE).str.split("|")
    freq = Counter(g for gs in lists for g in gs)
    take = 2 if mode == "pair" else 1
    names, keywords = [], []
    for gs in lists:
        spec = sorted(set(gs), key=lambda g: (freq[g], g))[:take]
        names.append("|".join(sorted(spec)))
        keywords.append(tuple(g.lower().replace("-", " ") for g in sorted(spec)))
    return names, keywords


def movielens_catalogue(
    path: str | Path, clusters: str = "pair"
) -> tuple[dict[str, list[Any]], dict[str, list[Any]], Counter[str]]:
    """The catalogue of a MovieLens directory as external ids, for the store's ingest: items {item: movieId,
    cluster}, clusters {cluster, name, keywords} (a cluster's id is its name), and the movies rows skipped."""
    root = Path(path)
    movies_path = root / "movies.csv"
    if not movies_path.is_file():
        raise DataError(root, "not a MovieLens directory (needs ratings.csv and movies.csv)")
    skipped: Counter[str] = Counter()
    ids, genres = _valid_text(_read(movies_path, ("movieId", "genres")), movies_path, ("movieId", "genres"), skipped)
    names, keywords = movielens_clusters(pd.Series(genres, dtype=object), clusters)
    kw = dict(zip(names, keywords, strict=True))
    order = sorted(kw)
    items: dict[str, list[Any]] = {"item": list(ids), "cluster": names}
    cats: dict[str, list[Any]] = {"cluster": order, "name": order, "keywords": [list(kw[n]) for n in order]}
    return items, cats, Counter({k: v for k, v in skipped.items() if v})


def load_movielens(path: str | Path, clusters: str = "pair", min_weight: float = 0.0) -> Dataset:
    """A MovieLens directory (ratings.csv + movies.csv), e.g. ml-latest-small."""
    root = Path(path)
    if not (root / "ratings.csv").is_file() or not (root / "movies.csv").is_file():
        raise DataError(root, "not a MovieLens directory (needs ratings.csv and movies.csv)")
    if clusters not in ("pair", "genre"):
        raise ValueError("clusters must be 'pair' or 'genre'")
    movies_path = root / "movies.csv"
    cat_skipped: Counter[str] = Counter()
    ids, genres = _valid_text(
        _read(movies_path, ("movieId", "genres")), movies_path, ("movieId", "genres"), cat_skipped
    )
    names, keywords = movielens_clusters(pd.Series(genres, dtype=object), clusters)
    order = sorted(set(names))
    cid = {n: i for i, n in enumerate(order)}
    catalogue = _catalogue(order, dict(zip(names, keywords, strict=True)), movies_path)
    item_cluster = {str(m): cid[n] for m, n in zip(ids, names, strict=True)}
    ratings = root / "ratings.csv"
    cols = {"user": "userId", "item": "movieId", "ts": "timestamp", "weight": "rating"}
    log, report = _to_log(
        _read(ratings, ("userId", "movieId", "timestamp"), ("rating",)), ratings, cols, item_cluster, catalogue, 1.0
    )
    report.catalogue_skipped = Counter({k: v for k, v in cat_skipped.items() if v})
    return Dataset(log=log, report=report, name=f"movielens:{root.name}")


def load_table(
    interactions: str | Path,
    items: str | Path,
    clusters: str | Path | None = None,
    columns: dict[str, str] | None = None,
) -> Dataset:
    """Generic CSV/Parquet: an interactions file (user, item, ts[, weight] under any column names given by
    `columns`), an items file (item, cluster), and optionally a clusters file (cluster, keywords, with
    keywords separated by ';' or ',')."""
    items_path = Path(items)
    cat_skipped: Counter[str] = Counter()
    item_names, item_clusters = _valid_text(
        _read(items_path, ("item", "cluster")), items_path, ("item", "cluster"), cat_skipped
    )
    # `missing_field` counted rows without an item; a row without a cluster is missing a field too.
    pairs = []
    for i, c in zip(item_names, item_clusters, strict=True):
        if c is None:
            cat_skipped["missing_field"] += 1
        elif not normalize_name(c):
            cat_skipped["bad_cluster"] += 1  # a name of punctuation only cannot be told apart from others
        else:
            pairs.append((i, c))
    kw_of: dict[str, tuple[str, ...]] = {}
    if clusters is not None:
        cpath = Path(clusters)
        cnames, ckws = _valid_text(
            _read(cpath, ("cluster",), ("keywords",)), cpath, ("cluster", "keywords"), cat_skipped
        )
        for name, kws in zip(cnames, ckws, strict=True):
            if name is None or not normalize_name(name):
                cat_skipped["bad_cluster"] += 1
                continue
            kw_of[name] = tuple(k.strip() for k in re.split(r"[;,]", kws or name) if k.strip()) or (name,)
    if not pairs:
        raise DataError(items_path, f"no usable (item, cluster) rows ({_counts(cat_skipped)})")
    names = sorted({c for _, c in pairs} | set(kw_of))
    catalogue = _catalogue(names, kw_of, items_path)
    cid = {n: i for i, n in enumerate(names)}
    item_cluster = {str(i): cid[c] for i, c in pairs}
    cols = _CANONICAL | (columns or {})
    ipath = Path(interactions)
    raw = _read(ipath, (cols["user"], cols["item"], cols["ts"]), (cols["weight"],))
    log, report = _to_log(raw, ipath, cols, item_cluster, catalogue, 1.0)
    report.catalogue_skipped = Counter({k: v for k, v in cat_skipped.items() if v})
    return Dataset(log=log, report=report, name=f"table:{ipath.name}")


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()) if v) or "the file has no data rows"


def load_synthetic(spec: SyntheticSpec | None = None) -> Dataset:
    stream = SyntheticStream(spec or SyntheticSpec())
    log = stream.generate()
    return Dataset(log=log, report=LoadReport(rows_read=len(log), rows_kept=len(log)), name="synthetic")


def load(source: str, clusters: str = "pair", synthetic: SyntheticSpec | None = None) -> Dataset:
    """Resolve a data URI: 'synthetic', 'movielens:PATH', or 'table:INTERACTIONS,ITEMS[,CLUSTERS]'.

    Every consumer needs interactions, so a source with no usable row is a DataError here (the loaders
    themselves return the empty log with its report)."""
    kind, _, rest = source.partition(":")
    if kind == "synthetic":
        return load_synthetic(synthetic)
    if kind == "movielens":
        ds, where = load_movielens(rest, clusters=clusters), Path(rest) / "ratings.csv"
    elif kind == "table":
        parts = rest.split(",")
        if len(parts) not in (2, 3) or not all(parts):
            raise DataError(source, "expected table:INTERACTIONS,ITEMS[,CLUSTERS] (file paths, comma-separated)")
        ds, where = load_table(parts[0], parts[1], parts[2] if len(parts) == 3 else None), Path(parts[0])
    else:
        raise DataError(source, "unknown data source: use synthetic, movielens:PATH or table:I,ITEMS[,C]")
    if not ds.report.rows_read:
        raise DataError(where, "no data rows: the file holds only a header")
    if not len(ds.log):
        raise DataError(where, f"no usable interaction rows ({ds.report.summary()})")
    return ds
