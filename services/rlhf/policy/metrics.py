"""Prometheus metrics of the policy service (``rlhf_policy_`` prefix, base units, ``_total`` counters).

Labels: ``version`` (the policy version that answered; "none" before routing), ``method`` (Generate /
GenerateStream), ``code`` (gRPC status name). Versions are few (stable, candidate, standby), so the label stays small;
the per-version series of an unloaded version are removed.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlhf.policy.engine import EngineMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

REQUESTS = Counter(
    "rlhf_policy_requests_total", "Generation requests answered or failed, by method and version.",
    ["method", "version"],
)
ERRORS = Counter(
    "rlhf_policy_request_errors_total", "Generation requests that failed, by method, version and gRPC status code.",
    ["method", "version", "code"],
)
REQUEST_SECONDS = Histogram(
    "rlhf_policy_request_duration_seconds", "Time from receiving a generation request to its last response message.",
    ["method", "version"], buckets=LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "rlhf_policy_time_to_first_token_seconds",
    "Time from receiving a generation request to the first generated token of its first sample.",
    ["method", "version"], buckets=TTFT_BUCKETS,
)
GENERATED_TOKENS = Counter(
    "rlhf_policy_generated_tokens_total", "Response tokens served (completion_tokens), by version.", ["version"]
)
PROMPT_TOKENS = Counter(
    "rlhf_policy_prompt_tokens_total", "Prompt tokens of served samples, by version.", ["version"]
)
SAMPLES = Counter(
    "rlhf_policy_samples_total", "Samples finished, by version and finish reason.", ["version", "finish_reason"]
)
BATCH_SIZE = Histogram(
    "rlhf_policy_batch_size", "Rows decoded together in one decode step (torch backend), by version.",
    ["version"], buckets=BATCH_BUCKETS,
)
DECODE_STEPS = Counter("rlhf_policy_decode_steps_total", "Decode forward passes (torch backend), by version.", ["version"])
QUEUE_DEPTH = Gauge(
    "rlhf_policy_queue_depth", "Rows (samples) waiting for a slot in the batch, by version.", ["version"]
)
ACTIVE_ROWS = Gauge(
    "rlhf_policy_active_rows", "Rows being generated now (torch: in the batch; triton: in flight), by version.",
    ["version"],
)
EXPIRED_ROWS = Counter(
    "rlhf_policy_expired_rows_total", "Rows dropped unstarted because their deadline passed while queued, by version.",
    ["version"],
)
IN_FLIGHT = Gauge("rlhf_policy_in_flight_requests", "Requests being served, by version.", ["version"])

RECORDS = Counter(
    "rlhf_policy_records_total", "Served-response records written, by sink (cache, bus).", ["sink"]
)
RECORD_FAILURES = Counter(
    "rlhf_policy_record_failures_total",
    "Served-response records not written, by sink: cache or bus (the write failed), queue (the queue was full).",
    ["sink"],
)
RECORD_QUEUE = Gauge("rlhf_policy_record_queue_depth", "Served responses waiting to be recorded.")

VERSION_LOADS = Counter(
    "rlhf_policy_version_loads_total", "Policy version loads, by backend and outcome (ok, failed).", ["backend", "outcome"]
)
VERSION_LOAD_SECONDS = Histogram(
    "rlhf_policy_version_load_seconds", "Time to load a policy version until it is ready.", ["backend"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
TRAFFIC_PERCENT = Gauge(
    "rlhf_policy_traffic_percent", "Share of routed traffic per loaded version, 0..100.", ["version", "role"]
)
MODEL_EVENTS = Counter(
    "rlhf_policy_model_events_total", "Events read from rlhf.models.v1, by outcome (applied, ignored, failed).",
    ["outcome"],
)

def engine_metrics(version: str) -> EngineMetrics:
    return EngineMetrics(
        queue_depth=QUEUE_DEPTH.labels(version),
        active_rows=ACTIVE_ROWS.labels(version),
        batch_size=BATCH_SIZE.labels(version),
        expired=EXPIRED_ROWS.labels(version),
        steps=DECODE_STEPS.labels(version),
    )


def forget_version(version: str) -> None:
    """Remove the gauges of an unloaded version (counters and histograms stay: rates over them stay right)."""
    for gauge in (QUEUE_DEPTH, ACTIVE_ROWS, IN_FLIGHT):
        try:
            gauge.remove(version)
        except KeyError:
            pass
    for role in ("stable", "candidate", "standby"):
        try:
            TRAFFIC_PERCENT.remove(version, role)
        except KeyError:
            pass
