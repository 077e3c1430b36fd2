"""benchmarks/gpu_train.py, the script prepared for a GPU, runs end to end at smoke sizes on the CPU and reports
every figure it promises (SFT tokens/s, PPO samples/s with its phases, TRL's SFT or why it was skipped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_train_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--tiny", "--device", "cpu", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--no-trl"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["sizes"]) == {"tiny-gpt2", "tiny-llama"}
    for entry in report["sizes"].values():
        assert entry["sft"]["tokens_per_s"] > 0 and entry["sft"]["parameters"] > 0
        ppo = entry["ppo"]
        assert ppo["samples_per_s"] > 0
        for phase in ("generation_s", "scoring_s", "rollout_forward_s", "update_s"):
            assert ppo[f"mean_{phase}"] >= 0
        assert "skipped" in entry["trl_sft"]
