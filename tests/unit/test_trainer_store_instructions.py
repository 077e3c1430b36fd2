"""benchmarks/trainer_store_instructions.py's measured part (without valgrind): it stores the whole mix, every
ranking joined, so that the instructions it counts are those of storing, not of an error path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("order", ["interleaved", "feedback-first"])
def test_the_counted_run_stores_every_record_of_the_mix(order):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trainer_store_instructions.py"), "--child", "1",
                           "--records", "3000", "--order", order, "--print-sizes"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sizes["responses"] == 1000 and sizes["demonstrations"] == 1500, sizes
    assert sizes["pairs"] == 500 and sizes["feedback_used"] == 2000 and sizes.get("feedback_pending", 0) == 0, sizes
