"""Issue 15, loaders: one clear error for a bad file, bad rows counted and skipped, values read by type.

One regression test per reproduction of the independent test (each failed on the code before the fix), plus
the CLIs that load data (`recupdate replay`, `drift`, `local`, `demo --data`): one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.loaders import TS_MAX, load, load_table
from recupdate_workloads.data.sequences import MAX_PERIODS, period_edges
from recupdate_workloads.data.types import Triples
from recupdate_workloads.replay.drift import drift

HEADER = "user,item,ts,weight\n"
POLICY = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "local-demo-policy.yaml"


@pytest.fixture
def items(tmp_path: Path) -> Path:
    path = tmp_path / "items.csv"
    path.write_text("item,cluster\na,drama\nb,comedy\nc,horror\n")
    return path


def _csv(tmp_path: Path, body: str, name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def _rows(n: int, start: int = 1_600_000_000) -> str:
    """n rows: three users, each cycling through the items a, b, c (so they make triples)."""
    return "".join(f"u{i % 3},{'abc'[i // 3 % 3]},{start + 60 * i},4\n" for i in range(n))


def _one_line_naming(exc: BaseException, path: Path) -> str:
    text = str(exc)
    assert isinstance(exc, DataError), f"{type(exc).__name__}: {text}"
    assert "\n" not in text and text.startswith(f"{path}: "), text
    return text


# -- 9: loader errors are one clear line ------------------------------------------------------------------------


def test_missing_column_is_one_line_data_error(tmp_path: Path, items: Path) -> None:
    events = _csv(tmp_path, "user,item,weight\nu1,a,4\n")
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "missing column(s) 'ts'" in _one_line_naming(info.value, events)


def test_parquet_with_wrong_schema_is_one_line_data_error(tmp_path: Path, items: Path) -> None:
    events = tmp_path / "events.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "item": ["a"], "when": [1_600_000_000]}), events)
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "missing column(s) 'user', 'ts'" in _one_line_naming(info.value, events)
    # a column of a type no timestamp can come from: named, not a crash
    pq.write_table(pa.table({"user": ["u1"], "item": ["a"], "ts": [[1, 2]]}), events)
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "column 'ts' has type list" in _one_line_naming(info.value, events)


def test_empty_file_is_one_line_data_error(tmp_path: Path, items: Path) -> None:
    events = _csv(tmp_path, "")
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "empty file" in _one_line_naming(info.value, events)


def test_binary_file_is_one_line_data_error(tmp_path: Path, items: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "binary" in _one_line_naming(info.value, events)
    events.write_bytes(b"\xff\xfe\xfd\n" + b"\xc3(" * 50)  # no NUL byte, but not UTF-8 either
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "UTF-8" in _one_line_naming(info.value, events)


def test_fake_parquet_is_one_line_data_error(tmp_path: Path, items: Path) -> None:
    events = tmp_path / "events.parquet"
    events.write_bytes(b"not a parquet file at all\n")
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "not a Parquet file" in _one_line_naming(info.value, events)
    events.write_bytes(b"PAR1" + os.urandom(64))  # the magic, then garbage
    with pytest.raises(DataError) as info:
        load_table(events, items)
    assert "Parquet" in _one_line_naming(info.value, events)


def test_stray_quote_costs_one_row_not_the_file(tmp_path: Path, items: Path) -> None:
    # on the last row (the reproduction), and in the middle, where it used to swallow every later line
    for body in (_rows(5) + 'u9,a,"1600009999,4\n', _rows(2) + 'u9,"a,1600009999,4\n' + _rows(3)):
        ds = load_table(_csv(tmp_path, HEADER + body), items)
        assert (ds.report.rows_read, ds.report.rows_kept, dict(ds.report.skipped)) == (6, 5, {"bad_quoting": 1})
        assert 1_600_009_999 not in ds.log.ts.tolist()
    # properly quoted values (a comma inside, a doubled quote) are fine
    ds = load_table(_csv(tmp_path, HEADER + '"u1","a","1600000000","4"\n"u""2",b,1600000001,"4.5"\n'), items)
    assert ds.report.rows_kept == 2 and not ds.report.skipped


def test_extra_and_missing_fields_are_counted(tmp_path: Path, items: Path) -> None:
    body = _rows(19) + "u1,a,1600000000,4,surplus\n"  # 20 data rows, one with an extra column
    ds = load_table(_csv(tmp_path, HEADER + body), items)
    assert (ds.report.rows_read, ds.report.rows_kept, dict(ds.report.skipped)) == (20, 19, {"too_many_fields": 1})
    ds = load_table(_csv(tmp_path, HEADER + _rows(3) + "u1,a\n"), items)
    assert (ds.report.rows_read, ds.report.rows_kept, dict(ds.report.skipped)) == (4, 3, {"too_few_fields": 1})


def test_lines_that_are_not_utf8_are_counted_not_fatal(tmp_path: Path, items: Path) -> None:
    """A malformed line that is not UTF-8 made pyarrow's row handler fail the whole file: counted instead."""
    events = tmp_path / "events.csv"
    events.write_bytes(HEADER.encode() + _rows(3).encode() + b"u9,a,16\xff00,4,extra\n" + b"u\xc3(,b,1600000001,4\n")
    ds = load_table(events, items)
    assert (ds.report.rows_read, ds.report.rows_kept, dict(ds.report.skipped)) == (5, 3, {"bad_encoding": 2})
    events.write_bytes(HEADER.encode() + "ü,a,1600000000,4\n".encode())  # UTF-8 beyond ASCII is fine
    assert load_table(events, items).report.rows_kept == 1


def test_header_only_is_one_line_data_error_in_load(tmp_path: Path, items: Path) -> None:
    events = _csv(tmp_path, HEADER)
    ds = load_table(events, items)  # the loader: a clean empty result
    assert len(ds.log) == 0 and ds.report.rows_read == 0
    with pytest.raises(DataError) as info:  # every consumer goes through load(): one clear line
        load(f"table:{events},{items}")
    assert "no data rows" in _one_line_naming(info.value, events)


# -- 10: bad values are skipped, never kept, never allowed to allocate ------------------------------------------


def test_non_finite_and_huge_weights_are_skipped(tmp_path: Path, items: Path) -> None:
    body = "u1,a,1600000000,inf\nu1,b,1600000001,1e308\nu1,c,1600000002,-inf\nu1,a,1600000003,nan\nu2,a,1600000004,5\n"
    ds = load_table(_csv(tmp_path, HEADER + body), items)
    assert dict(ds.report.skipped) == {"bad_weight": 3, "weight_out_of_range": 1}
    assert ds.log.weight.tolist() == [5.0] and np.isfinite(ds.log.weight).all()


def test_non_finite_and_huge_timestamps_are_skipped(tmp_path: Path, items: Path) -> None:
    body = (
        "u1,a,1e30,4\nu1,b,inf,4\nu1,c,-inf,4\nu1,a,nan,4\nu1,b,9000000000000000000,4\nu1,c,-1,4\n"
        "u2,a,1600000000,4\nu2,b,2020-09-13T12:26:40Z,4\n"
    )
    ds = load_table(_csv(tmp_path, HEADER + body), items)
    assert dict(ds.report.skipped) == {"bad_timestamp": 3, "timestamp_out_of_range": 3}
    assert ds.log.ts.tolist() == [1_600_000_000, 1_600_000_000]


def test_far_timestamp_does_not_allocate_in_recupdate_drift(
    tmp_path: Path, items: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recupdate_operator.cli import main

    body = _rows(30) + "u1,b,9000000000000000000,4\n"  # u1's history ends on a: (c, a) -> b at ts 9e18
    events = _csv(tmp_path, HEADER + body)
    t0 = time.monotonic()
    rc = main(["drift", "--data", f"table:{events},{items}", "--min-support", "1"])
    assert rc in (0, 1) and time.monotonic() - t0 < 30
    assert "drift of top-5" in capsys.readouterr().out


def test_drift_and_period_edges_are_bounded_by_data_not_span() -> None:
    """The class: nothing is allocated per period of a span that data values set."""
    ts = np.array([0, 1, 9_000_000_000_000_000_000, 9_000_000_000_000_000_001], dtype=np.int64)
    t = Triples(np.zeros(4, np.int64), ts, np.zeros(4, np.int32), np.ones(4, np.int32), np.full(4, 2, np.int32))
    obs, _ = drift(t, 3, period=1, min_support=1)  # a 1 s period over 9e18 s: arithmetic, no edges
    assert (obs.comparisons, obs.mean) == (2, 1.0)
    empty = Triples(*(np.zeros(0, np.int64) for _ in range(2)), *(np.zeros(0, np.int32) for _ in range(3)))
    assert drift(empty, 3, period=86_400, min_support=1)[0].comparisons == 0
    with pytest.raises(ValueError, match="more than"):
        period_edges(0, 9_000_000_000_000_000_000, 7_776_000)
    assert len(period_edges(0, MAX_PERIODS * 10, 10)) == MAX_PERIODS + 1


@pytest.mark.parametrize(
    ("unit", "tz"), [("s", None), ("ms", "UTC"), ("us", None), ("us", "Europe/Paris"), ("ns", "+05:30")]
)
def test_parquet_timestamps_are_read_by_their_unit(tmp_path: Path, items: Path, unit: str, tz: str | None) -> None:
    instants = pd.to_datetime(["2020-01-01T00:00:00Z", "2021-06-30T12:34:56.789Z"], utc=True, format="ISO8601")
    col = instants.tz_convert(tz) if tz else instants.tz_convert(None)
    events = tmp_path / "events.parquet"
    table = pa.table({"user": ["u1", "u2"], "item": ["a", "b"], "ts": pa.array(col.as_unit(unit))})
    assert table.schema.field("ts").type == pa.timestamp(unit, tz)
    pq.write_table(table, events)
    ds = load_table(events, items)
    assert ds.log.ts.tolist() == [1_577_836_800, 1_625_056_496]


def test_parquet_dates_numbers_and_text_timestamps(tmp_path: Path, items: Path) -> None:
    events = tmp_path / "events.parquet"
    cases = {
        "date32": pa.array([18262, 80000], pa.date32()),  # 2020-01-01; 2189-01-14 is in range
        "int64": pa.array([1_577_836_800, TS_MAX], pa.int64()),  # TS_MAX itself is out of range
        "float64": pa.array([1_577_836_800.9, float("inf")]),
        "string": pa.array(["2020-01-01T01:00:00+01:00", "not a time"]),
    }
    for name, col in cases.items():
        pq.write_table(pa.table({"user": ["u1", "u2"], "item": ["a", "b"], "ts": col}), events)
        ds = load_table(events, items)
        assert ds.log.ts.tolist()[0] == 1_577_836_800, name
        assert ds.report.rows_read == 2 and ds.report.rows_kept + sum(ds.report.skipped.values()) == 2, name
    assert load_table(events, items).report.skipped == {"bad_timestamp": 1}


# -- the CLIs that load data: one line on stderr, exit 2, no traceback ------------------------------------------


def _bad_sources(tmp_path: Path, items: Path) -> dict[str, Path]:
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"hello")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)))
    return {
        "header-only": _csv(tmp_path, HEADER, "header.csv"),
        "empty": _csv(tmp_path, "", "empty.csv"),
        "no-ts-column": _csv(tmp_path, "user,item\nu1,a\n", "nots.csv"),
        "fake-parquet": fake,
        "binary": binary,
        "all-rows-bad": _csv(tmp_path, HEADER + "u1,a,inf,4\nu1,b,1e30,inf\n", "allbad.csv"),
    }


def _stop_store(workdir: Path) -> None:
    if (workdir / "pg").exists():  # only the code before the fix got that far
        import pgserver

        pgserver.get_server(str((workdir / "pg").absolute()), cleanup_mode="stop").cleanup()


@pytest.mark.parametrize("command", ["replay", "drift", "local", "demo"])
def test_clis_print_one_line_and_exit_2(
    tmp_path: Path, items: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from recupdate_operator.cli import main

    workdir = tmp_path / "work"
    extra = {
        "replay": ["--no-progress", "--out", str(tmp_path / "out")],
        "drift": [],
        "local": ["-f", str(POLICY), "--simulate", "1d", "--workdir", str(workdir), "--no-status-line"],
        "demo": ["--simulate", "1d", "--workdir", str(workdir)],
    }[command]
    for label, path in _bad_sources(tmp_path, items).items():
        try:
            rc = main([command, *extra, "--data", f"table:{path},{items}"])
        except SystemExit as exc:  # argparse refusing an option counts as a failure below
            rc = exc.code  # type: ignore[assignment]
        finally:
            _stop_store(workdir)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (label, rc, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (label, err)
        assert err.startswith(f"recupdate {'local' if command == 'demo' else command}: {path}: "), (label, err)
        assert not (workdir / "pg").exists(), f"{label}: the store started before the data was checked"
