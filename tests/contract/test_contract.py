"""The contract module: what both sides import, written once, importing only the standard library and pydantic."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from recupdate_workloads.contract import durations, entrypoints, serve, timefmt

REPO = pathlib.Path(__file__).resolve().parents[2]
CONTRACT = REPO / "workloads" / "recupdate_workloads" / "contract"
ALLOWED_THIRD_PARTY = {"pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection"}


def test_contract_imports_only_the_standard_library_and_pydantic() -> None:
    modules = sorted(f"recupdate_workloads.contract.{p.stem}" for p in CONTRACT.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        f"before = set(sys.modules)\n"
        f"for m in {modules!r}: __import__(m)\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(' '.join(sorted(new)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    foreign = {m for m in out if m not in sys.stdlib_module_names and not m.startswith("_sysconfigdata")}
    foreign.discard("recupdate_workloads")
    assert foreign <= ALLOWED_THIRD_PARTY, foreign - ALLOWED_THIRD_PARTY
    assert "pydantic" in out  # the check sees third-party imports at all


def _assigned_names(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_each_contract_item_is_assigned_in_one_file() -> None:
    """The literal store-DSN variable and the Serve import path appear as values in one Python file only."""
    for literal in ('"RECUPDATE_STORE_DSN"', '"recupdate_workloads.serving.deployment:app"'):
        holders = [
            p for root in ("operator", "workloads") for p in (REPO / root).rglob("*.py") if literal in p.read_text()
        ]
        assert len(holders) == 1, (literal, holders)
    for name in ("DSN_ENV", "USER_CONFIG_KEYS", "LABEL_POLICY", "ANNOTATION_APPROVE", "IMPORT_PATH"):
        holders = [
            p for root in ("operator", "workloads") for p in (REPO / root).rglob("*.py") if name in _assigned_names(p)
        ]
        assert len(holders) == 1, (name, holders)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("6h", 21600), ("90d", 7776000), ("2w", 1209600), ("1h30m", 5400), (" 2w3d ", 1468800)],
)
def test_one_duration_grammar(text: str, seconds: int) -> None:
    assert durations.parse_seconds(text) == seconds
    assert durations.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "h", "1.5h", "-3d", "3 d", "1y", "1h30"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        durations.parse_seconds(text)


def test_the_operator_and_the_workloads_read_durations_alike() -> None:
    from recupdate_operator.api import parse_duration
    from recupdate_workloads.jobs.config import RunConfig  # noqa: F401  (the jobs parse with the contract)

    assert parse_duration("1h30m") == timedelta(seconds=durations.parse_seconds("1h30m"))


def test_entrypoint_command() -> None:
    assert entrypoints.command("refresh", "{}", "r1") == [
        "python",
        "-m",
        "recupdate_workloads.jobs.refresh",
        "--config",
        "{}",
        "--run-id",
        "r1",
    ]
    with pytest.raises(ValueError, match="unknown run kind"):
        entrypoints.command("train", "{}", "r1")


def test_entrypoint_modules_exist() -> None:
    import importlib.util

    for module in entrypoints.MODULES.values():
        assert importlib.util.find_spec(module) is not None, module
    module, _, attr = serve.IMPORT_PATH.partition(":")
    assert importlib.util.find_spec(module) is not None and attr == "app"


def test_user_config_is_typed() -> None:
    uc = serve.user_config("r1", None, "3", "s", online_timeout_ms=50)
    assert uc == {
        "release_id": "r1",
        "adapter_uri": None,
        "table_version": 3,
        "store_schema": "s",
        "online_timeout_ms": 50,
    }
    assert list(uc)[:4] == list(serve.USER_CONFIG_KEYS)
    with pytest.raises(ValueError):
        serve.user_config("r1", None, -1, "s")
    with pytest.raises(ValueError, match="unknown user_config keys"):
        serve.user_config("r1", None, 1, "s", colour="blue")
    with pytest.raises(ValueError, match="lacks"):
        serve.normalize_user_config({"release_id": "r1"})


def test_times_round_trip() -> None:
    t = datetime(2030, 1, 8, 0, 30, tzinfo=UTC)
    assert timefmt.iso(t) == "2030-01-08T00:30:00Z"
    assert timefmt.parse_time(timefmt.iso(t)) == t
    assert timefmt.parse_time("") is None and timefmt.parse_time("yesterday") is None
    assert timefmt.epoch_seconds("2030-01-08T00:30:00Z") == int(t.timestamp()) == timefmt.epoch_seconds(t.timestamp())
