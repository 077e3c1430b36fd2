"""Latencies the trainer reports with quantiles (GetStatus, `rlhf simulate`'s summary) besides its histograms:
freshness (feedback stored -> first served policy trained on it) and weight sync (a version saved -> its first
rollout batch). Prometheus histograms give rates and bucketed quantiles across replicas; these windows give the exact
median and p95 of the most recent observations of this trainer. Import-light: no gRPC, Kafka or Redis."""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class LatencySummary:
    count: int
    """Observations in the window; 0 means none yet (the quantiles are then 0)."""
    p50_s: float
    p95_s: float
    max_s: float


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of ascending ``ordered`` by linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class LatencyWindow:
    """The most recent ``capacity`` observations of one latency, in seconds; thread-safe."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._values: collections.deque[float] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        if math.isfinite(seconds):
            with self._lock:
                self._values.append(max(0.0, seconds))

    def observe_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.observe(v)

    def summary(self) -> LatencySummary:
        with self._lock:
            ordered = sorted(self._values)
        if not ordered:
            return LatencySummary(0, 0.0, 0.0, 0.0)
        return LatencySummary(len(ordered), quantile(ordered, 0.5), quantile(ordered, 0.95), ordered[-1])


class WeightSync:
    """Save -> first rollout batch of each saved version, from the learner's side: ``saved(version, at)`` when the
    learner saves one, ``batch(version, created_at)`` for each batch it reads. Works the same for workers in this
    process and in their own processes (the batch carries its creation time; clocks of one cluster). A version's
    first batch is observed once; versions that never got a batch are forgotten after ``remember`` newer saves."""

    def __init__(self, window: LatencyWindow, observe=None, remember: int = 64) -> None:
        self.window = window
        self._observe = observe
        self._saved: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def saved(self, version: str, at: float) -> None:
        with self._lock:
            self._saved[version] = at
            while len(self._saved) > self._remember:
                self._saved.popitem(last=False)

    def batch(self, version: str, created_at: float) -> float | None:
        """The weight-sync seconds when this is ``version``'s first batch since its save; else None."""
        with self._lock:
            at = self._saved.pop(version, None)
        if at is None:
            return None
        seconds = max(0.0, created_at - at)
        self.window.observe(seconds)
        if self._observe is not None:
            self._observe(seconds)
        return seconds
