"""`recupdate local` end to end: the planner, the local backend, real jobs, a real Serve, a simulated clock."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from fixtures.net import free_port

POLICY = """
apiVersion: recupdate.io/v1alpha1
kind: RecommenderUpdatePolicy
metadata: {name: lm}
spec:
  data: {interactions: synthetic}
  fineTune:
    schedule: "0 3 15 * *"
    window: 90d
    hyperparameters: {epochs: 2, learningRate: 0.003, batchSize: 64}
  retrieval: {refreshInterval: 10d, window: 60d, minSupport: 3, maxStaleness: 20d}
  gates: {minExactMatch: 0.9, minRecall: 0.015, maxRegression: 0.05, promotion: Automatic}
"""

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _local(tmp_path: Path, span: str, *extra: str, policy_text: str = POLICY) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    cmd = [
        sys.executable,
        "-m",
        "recupdate_operator.cli",
        "local",
        "-f",
        str(policy),
        "--simulate",
        span,
        "--interactions",
        "30000",
        "--executor",
        "inline",
        "--model-size",
        "tiny",
        "--workdir",
        str(tmp_path / "w"),
        "--port",
        str(free_port()),
        "--probe-requests",
        "10",
        "--tick",
        "2d",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def _runs(tmp_path: Path) -> list[tuple[str, str, str]]:
    uri = (tmp_path / "w" / "pg").absolute()
    import pgserver

    server = pgserver.get_server(str(uri), cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as c:
        return c.execute("SELECT run_id, kind, status FROM lm.runs ORDER BY run_id").fetchall()


def _releases(tmp_path: Path) -> dict[str, str]:
    import pgserver

    server = pgserver.get_server(str((tmp_path / "w" / "pg").absolute()), cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as c:
        return dict(c.execute("SELECT release_id, state FROM lm.releases").fetchall())


def _when(run_id: str) -> datetime:
    return datetime.strptime(re.search(r"-(\d{12})", run_id).group(1), "%Y%m%d%H%M").replace(tzinfo=UTC)  # type: ignore[union-attr]


@pytest.fixture
def stops_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`recupdate local` leaves its embedded PostgreSQL running on purpose (a rerun resumes); stop it after."""
    yield
    import pgserver

    if (tmp_path / "w" / "pg").exists():
        pgserver.get_server(str((tmp_path / "w" / "pg").absolute()), cleanup_mode="stop").cleanup()


@pytest.mark.usefixtures("stops_store")
def test_accelerated_run_schedules_promotes_rejects_serves_and_resumes(tmp_path: Path) -> None:
    first = _local(tmp_path, "40d", "--fail-run", "ft-20200715")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert re.search(r"requests to /recommend: [1-9]\d*, failed: 0", first.stdout), first.stdout[-2000:]
    runs = _runs(tmp_path)
    ft = [r for r in runs if r[1] == "finetune"]
    rf = [r for r in runs if r[1] == "refresh"]
    # the initial fine-tune at the start, then the cron's 15th of the month at 03:00
    assert [_when(r[0]).strftime("%m-%d %H:%M") for r in ft][1:] == ["07-15 03:00"]
    # refreshes every 10 days on the interval's grid, once a release serves
    assert len(rf) >= 2 and all(_when(r[0]).timestamp() % (10 * 86_400) == 0 for r in rf)
    assert all(r[2] == "succeeded" for r in runs)
    releases = _releases(tmp_path)
    assert releases[ft[1][0]] == "rejected"  # the injected failure: its gates could not pass
    assert releases[ft[0][0]] in ("active", "retired")
    assert list(releases.values()).count("active") == 1
    active = next(k for k, v in releases.items() if v == "active")
    assert active != ft[1][0]  # serving stayed on a good release
    status = json.loads((tmp_path / "w" / "lm.status.json").read_text())
    assert status["status"]["activeRelease"] == active
    # each run's cost from the registry, and the newest candidate's change against the active table
    ft_cost = status["status"]["lastFineTune"]["cost"]
    assert ft_cost["cpuSeconds"] > 0 and ft_cost["trainingTokens"] > 0 and ft_cost["wallSeconds"] > 0
    assert status["status"]["lastRefresh"]["cost"]["cpuSeconds"] > 0
    change = status["status"]["lastChange"]
    assert change["pairs"] > 0 and 0 <= change["top1Changed"] <= 1 and change["against"] in releases
    timeline = json.loads((tmp_path / "w" / "timeline.json").read_text())
    assert any(e["event"] == "CandidateChange" for e in timeline)
    assert any(e["event"] == "RunSucceeded" and "CPU s" in e["message"] for e in timeline)
    # the cost-quality line beside the plot, which marks the fine-tunes and promotions
    table = first.stdout.split("cost-quality:")[1]
    assert re.search(r"\nserved\s+[+-]\d\.\d{4}\s+\d+\.\d\s+\+\d+\.\d ", table), table
    assert "fine-tunes and promotions marked" in first.stdout
    assert (tmp_path / "w" / "served-hr5.png").read_bytes()[:4] == b"\x89PNG"
    # a restart resumes from the store and the status file: nothing already run runs again
    before = {r[0] for r in runs}
    second = _local(tmp_path, "20d")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _runs(tmp_path)
    assert {r[0] for r in after} > before
    launched = sorted(p.stem for p in (tmp_path / "w" / "jobs").glob("*.json"))
    assert len(launched) == len(after)  # one launch per run, across both sessions
    assert min(_when(r[0]) for r in after if r[0] not in before) > max(_when(r) for r in before)


# No cron: after the initial fine-tune, only measured drift launches one (the synthetic stream drifts every
# 90 days), and never within minInterval of the last.
DRIFT_POLICY = POLICY.replace(
    'schedule: "0 3 15 * *"', "schedule: null\n    onDrift: {threshold: 0.02, minInterval: 20d}"
)


@pytest.mark.usefixtures("stops_store")
def test_fine_tunes_on_measured_drift_without_a_schedule(tmp_path: Path) -> None:
    out = _local(tmp_path, "30d", policy_text=DRIFT_POLICY)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _runs(tmp_path)
    ft = sorted(_when(r[0]) for r in runs if r[1] == "finetune")
    rf = [r for r in runs if r[1] == "refresh"]
    assert len(ft) >= 2 and rf, runs
    assert all(b - a >= timedelta(days=20) for a, b in itertools.pairwise(ft))  # minInterval
    # a drift fine-tune is named after the refresh that measured the drift (on the refresh grid), or after
    # the end of minInterval when the drift was measured sooner
    assert all(t.timestamp() % (10 * 86_400) == 0 or t - p == timedelta(days=20) for p, t in itertools.pairwise(ft))
    status = json.loads((tmp_path / "w" / "lm.status.json").read_text())["status"]
    drift = status["lastDrift"]
    assert drift["contexts"] > 0 and drift["excess"] is not None and drift["adapterRun"], drift
    timeline = (tmp_path / "w" / "timeline.json").read_text()
    assert "drift beyond noise" in timeline, timeline[-2000:]
