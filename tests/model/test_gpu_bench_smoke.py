"""The GPU benchmark's smoke mode: the same script and code paths as on a GPU (product fine-tune and table
scoring, each against plain PEFT in the same run) at a tiny size on the CPU; its last line is one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mode_runs_every_phase_and_prints_json_last(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECUPDATE_DEVICE": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "bench_gpu.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["setup"]["device"] == "cpu" and report["setup"]["smoke"]
    ft, base, sc = report["finetune_product"], report["finetune_baseline"], report["scoring"]
    assert "error" not in ft and "error" not in base and "error" not in sc, (ft, base, sc)
    # both loops trained on the same sequences: the same tokens per timed epoch / steps
    assert ft["tokens_per_epoch"] == base["tokens"] > 0
    assert ft["tokens_per_s"] > 0 and base["tokens_per_s"] > 0
    assert ft["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sc["answer_tokens_mean"] >= 2 and sc["attention"] == "sdpa"
    for k in ("product", "baseline", "single_token", "previous_multi_token"):
        assert sc[f"{k}_prompts_per_s"] > 0, k
    s = report["summary"]
    assert s["finetune_speedup"] == round(ft["tokens_per_s"] / base["tokens_per_s"], 3)
    assert s["scoring_speedup"] == round(sc["product_prompts_per_s"] / sc["baseline_prompts_per_s"], 3)
    assert s["targets"] == {"finetune_speedup": 2.0, "scoring_speedup": 1.5}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
