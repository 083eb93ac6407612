"""`recupdate local` with gates.analysis (docs/analysis.md): on the simulated clock, the synthetic stream's new
events decide; a good candidate is promoted after its analysis, a deliberately worse one (--worse-run: it passes
its offline gates, then its table is shuffled) is aborted, and serving never fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
  gates:
    minExactMatch: 0.9
    minRecall: 0.015
    maxRegression: 0.05
    promotion: Automatic
    analysis: {mode: Shadow, duration: 3d, minEvents: 40, maxRegression: 0.08}
"""
WORSE = "ft-20200715"  # the monthly fine-tune of the simulated span (see test_local_mode.py)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def workdir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`recupdate local` leaves its embedded PostgreSQL running on purpose (a rerun resumes); stop it after."""
    yield tmp_path / "w"
    import pgserver

    if (tmp_path / "w" / "pg").exists():
        pgserver.get_server(str((tmp_path / "w" / "pg").absolute()), cleanup_mode="stop").cleanup()


def _releases(workdir: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    import pgserver

    server = pgserver.get_server(str((workdir / "pg").absolute()), cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as c:
        return {r[0]: (r[1], r[2]) for r in c.execute("SELECT release_id, state, gates FROM lm.releases").fetchall()}


def test_local_analysis_promotes_good_and_aborts_worse(tmp_path: Path, workdir: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    cmd = [
        sys.executable,
        "-m",
        "recupdate_operator.cli",
        "local",
        "-f",
        str(policy),
        "--simulate",
        "25d",  # the worse fine-tune on day 15 and its 3-day analysis, after a promoted refresh's
        "--interactions",
        "30000",
        "--executor",
        "inline",
        "--model-size",
        "tiny",
        "--workdir",
        str(workdir),
        "--port",
        str(free_port()),
        "--probe-requests",
        "10",
        "--tick",
        "2d",
        "--worse-run",
        WORSE,
        "--no-status-line",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"requests to /recommend: [1-9]\d*, failed: 0", out.stdout), out.stdout[-2000:]
    assert "analysis on live events" in out.stdout

    releases = _releases(workdir)
    worse = next(k for k in releases if WORSE in k)
    state, gates = releases[worse]
    assert gates["passed"] is True  # it passed its offline gates...
    assert state == "rejected" and gates["analysis"]["verdict"] == "Aborted"  # ...and failed on live events
    a = gates["analysis"]
    assert a["candidateEvents"] >= 40 and a["candidateHitRate"] < a["baselineHitRate"] - 0.08
    assert any("analysis: HR@5" in r for r in gates["reasons"])

    promoted = [k for k, (s, g) in releases.items() if (g.get("analysis") or {}).get("verdict") == "Promoted"]
    assert promoted, {k: (s, g.get("analysis")) for k, (s, g) in releases.items()}
    for k in promoted:
        assert releases[k][0] in ("active", "retired")
        assert releases[k][1]["analysis"]["candidateEvents"] >= 40
    assert list(s for s, _ in releases.values()).count("active") == 1

    timeline = json.loads((workdir / "timeline.json").read_text())
    reasons = [e["event"] for e in timeline]
    assert {"AnalysisStarted", "AnalysisPromoted", "AnalysisAborted"} <= set(reasons)
    status = json.loads((workdir / "lm.status.json").read_text())["status"]
    assert status["analysis"]["phase"] in ("Running", "Promoted", "Aborted", "Inconclusive", "Cancelled")
