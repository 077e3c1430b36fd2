"""Prometheus metrics of the reward service (``rlhf_reward_`` prefix, base units, ``_total`` counters).

Per-version series are removed when a version is unloaded (:func:`forget_version`), so a long-lived replica does not
accumulate the series of every version it ever served.
"""
from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("rlhf_reward_requests_total", "Score calls answered or failed, by version.", ["version"])
ERRORS = Counter(
    "rlhf_reward_request_errors_total", "Score calls that failed, by version and gRPC status code.", ["version", "code"]
)
REQUEST_SECONDS = Histogram(
    "rlhf_reward_request_duration_seconds", "Time from receiving a Score call to its answer, by version.", ["version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ITEMS = Counter("rlhf_reward_items_total", "Items scored (from the model or the cache), by version.", ["version"])
BATCH_SIZE = Histogram(
    "rlhf_reward_batch_size", "Items in one forward pass, by version.", ["version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD_SECONDS = Histogram(
    "rlhf_reward_forward_duration_seconds", "Time of one forward pass, by version.", ["version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PADDING = Histogram(
    "rlhf_reward_padding_ratio", "Share of a forward pass' token slots that are padding (length bucketing bounds it).",
    ["version"], buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
)
QUEUE_DEPTH = Gauge("rlhf_reward_queue_depth", "Items waiting for a forward pass, all versions together.")
CACHE_HITS = Counter("rlhf_reward_cache_hits_total", "Items answered from the score cache.")
CACHE_MISSES = Counter("rlhf_reward_cache_misses_total", "Items looked up in the score cache and not found.")
CACHE_ERRORS = Counter(
    "rlhf_reward_cache_errors_total", "Score-cache operations that failed (the model scored instead), by operation.",
    ["operation"],
)
SCORES = Histogram(
    "rlhf_reward_score", "Scores returned, by version (drift between versions shows here).", ["version"],
    buckets=(-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10),
)
VERSION_LOADS = Counter("rlhf_reward_version_loads_total", "Reward-model loads, by outcome (ok, failed).", ["outcome"])
VERSION_LOAD_SECONDS = Histogram(
    "rlhf_reward_version_load_seconds", "Time to load and probe a reward-model version.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
MODEL_INFO = Gauge("rlhf_reward_model_info", "1 for the current reward-model version, 0 for one still draining.",
                   ["version"])
MODEL_EVENTS = Counter(
    "rlhf_reward_model_events_total", "Events read from rlhf.models.v1, by outcome (applied, ignored, failed).",
    ["outcome"],
)

_PER_VERSION = (REQUESTS, ITEMS, BATCH_SIZE, FORWARD_SECONDS, PADDING, SCORES, REQUEST_SECONDS, MODEL_INFO)
_error_codes: dict[str, set[str]] = {}


def count_error(version: str, code: str) -> None:
    _error_codes.setdefault(version, set()).add(code)
    ERRORS.labels(version, code).inc()


def forget_version(version: str) -> None:
    """Drop the series of an unloaded version."""
    for metric in _PER_VERSION:
        with contextlib.suppress(KeyError):
            metric.remove(version)
    for code in _error_codes.pop(version, ()):
        with contextlib.suppress(KeyError):
            ERRORS.remove(version, code)
