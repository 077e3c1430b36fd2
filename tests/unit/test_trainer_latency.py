"""The trainer's latency windows: quantiles as numpy computes them, a bounded window of the most recent values, and
weight sync observed once per saved version, on its first batch."""
from __future__ import annotations

import random

import numpy as np
import pytest

from rlhf.trainer.latency import LatencyWindow, WeightSync, quantile


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_quantiles_equal_numpys_linear_interpolation(n):
    values = sorted(random.Random(n).uniform(0, 50) for _ in range(n))
    for q in (0.0, 0.5, 0.95, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_the_window_keeps_the_most_recent_values_and_drops_nonsense():
    window = LatencyWindow(capacity=3)
    assert window.summary().count == 0 and window.summary().p95_s == 0.0
    window.observe_many([100.0, 1.0, 2.0, float("nan"), 3.0, -5.0])  # nan ignored, negative clamps to 0
    summary = window.summary()
    assert summary.count == 3 and summary.max_s == 3.0 and summary.p50_s == 2.0  # 100 and 1 fell out
    with pytest.raises(ValueError):
        LatencyWindow(capacity=0)


def test_weight_sync_is_the_first_batch_of_each_saved_version_only():
    seen = []
    sync = WeightSync(LatencyWindow(), observe=seen.append, remember=2)
    assert sync.batch("v0", 5.0) is None  # the run's parent: never saved by this learner
    sync.saved("v1", 10.0)
    assert sync.batch("v1", 12.5) == 2.5
    assert sync.batch("v1", 20.0) is None  # later batches of v1 are not weight sync
    sync.saved("v2", 30.0)
    sync.saved("v3", 31.0)
    sync.saved("v4", 32.0)  # v2 never got a batch and is forgotten (remember=2)
    assert sync.batch("v2", 40.0) is None
    assert sync.batch("v4", 31.5) == 0.0  # a clock a little behind clamps to 0
    assert seen == [2.5, 0.0] and sync.window.summary().count == 2
