"""Configuration of the feedback service (flags, ``RLHF_FEEDBACK_*`` or ``RLHF_*`` environment, defaults)."""
from __future__ import annotations

import dataclasses
import typing

from rlhf.serving.config import ServiceConfig, _check, field


@dataclasses.dataclass(frozen=True)
class FeedbackConfig(ServiceConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_FEEDBACK_"

    port: int = field(50053, "gRPC port of the feedback service; 0 picks a free one.")
    metrics_port: int = field(9103, "Port of /metrics; 0 picks a free one; -1 disables it.")
    max_text_bytes: int = field(32 * 1024, "Largest text of a demonstration or edit, in UTF-8 bytes.")
    max_ranking_size: int = field(16, "Most responses one ranking may order.")
    max_future_skew_s: float = field(
        300.0, "How far in the future an event's created_at may be (clients' clocks drift), in seconds."
    )
    idempotency_ttl_s: float = field(
        7 * 24 * 3600.0, "How long a published event_id is remembered: a repeat within this window is a duplicate."
    )
    publish_timeout_s: float = field(
        15.0, "Longest wait for the bus to make an event durable before it is reported FAILED (UNAVAILABLE)."
    )
    max_events_per_message: int = field(
        1000, "Most events in one SubmitStream message; a larger message has all its events REJECTED.")
    max_in_flight: int = field(4096, "Unacknowledged events per stream before the service stops reading it.")
    cache_calls_in_flight: int = field(
        1, "Concurrent cache calls per ingestion step (claim, lookup, mark done). Events of other batches that "
        "arrive meanwhile wait and go together in the next call (group commit): fewer, larger calls under load. "
        "One gave the most events/s on a 2-core machine (benchmarks/README.md).")
    publish_calls_in_flight: int = field(
        1, "Concurrent sends of records to the bus, each waiting until its records are durable. Records of batches "
        "that arrive meanwhile wait and go together in the next send (group commit); this adds at most one "
        "send's latency (the producer's linger plus a broker round trip) and gave the most events/s.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.max_text_bytes >= 1, "max_text_bytes", "must be >= 1")
        _check(2 <= self.max_ranking_size <= 1000, "max_ranking_size", "must be in [2, 1000]")
        _check(self.max_future_skew_s >= 0, "max_future_skew_s", "must be >= 0")
        _check(self.idempotency_ttl_s > 0, "idempotency_ttl_s", "must be > 0")
        _check(self.publish_timeout_s > 0, "publish_timeout_s", "must be > 0")
        _check(self.max_events_per_message >= 1, "max_events_per_message", "must be >= 1")
        _check(self.max_in_flight >= self.max_events_per_message, "max_in_flight", "must be >= max_events_per_message")
        _check(self.cache_calls_in_flight >= 1, "cache_calls_in_flight", "must be >= 1")
        _check(self.publish_calls_in_flight >= 1, "publish_calls_in_flight", "must be >= 1")

    @property
    def pending_ttl_s(self) -> float:
        """Lifetime of an idempotency claim while its event is being published: outlives the publish timeout,
        so a claim held by a replica that died frees itself."""
        return self.publish_timeout_s * 2 + 5.0
