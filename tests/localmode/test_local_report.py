"""The end of `recupdate local`'s report: ΔHR@5 per CPU-hour of the served releases over the first one, from
the runs' recorded cost, and the plot with the fine-tunes and promotions marked (fast: no Ray, no Serve)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from recupdate_operator.local_driver import LocalRun
from recupdate_workloads.store import registry as reg
from recupdate_workloads.store.db import Store

T0 = datetime(2020, 6, 1, tzinfo=UTC)


def test_report_ends_with_cost_quality_and_a_marked_plot(store: Store, tmp_path: Path) -> None:
    for run_id, kind, cpu in (
        ("lm-ft-1", "finetune", 100.0),
        ("lm-rf-2", "refresh", 60.0),
        ("lm-ft-3", "finetune", 200.0),
    ):
        reg.start_run(store, run_id, kind)
        reg.finish_run(store, run_id, "succeeded", {"cpuSeconds": cpu})
    reg.register_release(store, reg.Release("lm-ft-1", "tiny", None, None, None, None, run_id="lm-ft-1"))
    run = object.__new__(LocalRun)  # the report's state only: what the loop would have gathered
    run.store, run.static_release, run.workdir, run.name = store, "lm-ft-1", tmp_path, "lm"
    run.args = argparse.Namespace(report_period="30d")
    run.data = SimpleNamespace(log=SimpleNamespace(ts=np.array([int(T0.timestamp())])))
    run.finetunes = [T0 + timedelta(days=1), T0 + timedelta(days=45)]
    run.promotions = [T0 + timedelta(days=1), T0 + timedelta(days=10), T0 + timedelta(days=45)]

    text = run._cost_quality(0.05)
    static, served = (line.split() for line in text.splitlines()[3:5])
    assert static[:4] == ["static", "baseline", "100.0", "+0.0"]
    # 0.05 HR@5 over the 260 CPU s spent after the first release: 0.05 / (260 / 3600) per CPU-hour
    assert served[:5] == ["served", "+0.0500", "360.0", "+260.0", f"{0.05 / (260 / 3600):+.4g}"]
    assert served[-2:] == ["2", "3"]  # fine-tunes, promotions
    path = run._plot([(0, 0.4, 0.35, 10), (1, 0.45, 0.3, 10)], 30 * 86_400)
    assert path == tmp_path / "served-hr5.png" and path.read_bytes()[:4] == b"\x89PNG"
