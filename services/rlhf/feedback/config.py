"""Configuration of the feedback service (flags, ``RLHF_FEEDBACK_*`` or ``RLHF_*`` environment, defaults)."""
from __future__ import annotations

import dataclasses
import typing
import urllib.parse

from rlhf.serving.config import ConfigError, ServiceConfig, _check, field

RECORD_HEADROOM_BYTES = 4 * 1024
"""What a bus record holds besides its value, the FeedbackRecord: its key (an id of at most 128 bytes), the producer's
per-record framing (36 bytes counted by rlhf.bus.kafka_batch) and the broker's record-batch header (61 bytes; the
broker's ``message.max.bytes`` of 1 MiB + 12 bytes must take the whole batch), with room to spare."""

MEMORY_BUS_RECORD_BYTES = 1024 * 1024
"""Largest record of a ``memory://`` bus: the default ``max_record_bytes`` of rlhf.bus.memory.InMemoryBus, which is
what ``bus_from_url`` builds (tests/unit/test_feedback_validation.py keeps the two equal)."""


def bus_record_bytes(bus_url: str) -> int:
    """Largest record (key + value + framing) the bus ``bus_url`` names takes: ``max_request_size_bytes`` of a
    ``kafka://`` URL (Kafka's default ``max.request.size``, 1 MiB, unless the URL sets it), 1 MiB for ``memory://``.
    ValueError for a URL ``rlhf.bus.bus_from_url`` would refuse."""
    scheme = urllib.parse.urlsplit(bus_url).scheme
    if scheme == "kafka":
        # kafka-python is imported only here, where the service is on Kafka anyway
        from rlhf.bus.kafka import KafkaConfig

        return KafkaConfig.from_url(bus_url).max_request_size_bytes
    if scheme == "memory":
        return MEMORY_BUS_RECORD_BYTES
    raise ValueError(f"unknown bus URL {bus_url!r}: expected kafka://host:port[,host:port] or memory://[name]")


@dataclasses.dataclass(frozen=True)
class FeedbackConfig(ServiceConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_FEEDBACK_"

    port: int = field(50053, "gRPC port of the feedback service; 0 picks a free one.")
    metrics_port: int = field(9103, "Port of /metrics; 0 picks a free one; -1 disables it.")
    max_text_bytes: int = field(32 * 1024, "Largest text of a demonstration or edit, in UTF-8 bytes.")
    max_ranking_size: int = field(16, "Most responses one ranking may order.")
    max_record_bytes: int = field(
        0, "Largest serialized record an event may become (the FeedbackRecord the service publishes: the event and "
        "the fields the service adds), in bytes; a larger event is INVALID_ARGUMENT naming it, instead of failing "
        "on the bus and being retried forever. 0 = the bus's largest record (max_request_size_bytes of a kafka:// "
        f"bus_url, default 1 MiB; 1 MiB for memory://) less {RECORD_HEADROOM_BYTES // 1024} KiB for the key and the "
        "framing. Up to that; lower keeps records small.")
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
        # The record limit: what the bus takes, less the headroom; checked here, derived by record_limit_bytes.
        try:
            bus_limit = bus_record_bytes(self.bus_url)
        except ValueError as exc:
            raise ConfigError(f"bus_url: {exc} (flag --bus-url)") from None
        most = bus_limit - RECORD_HEADROOM_BYTES
        _check(most >= 1024, "bus_url", f"takes records of at most {bus_limit} bytes; feedback needs at least "
               f"{1024 + RECORD_HEADROOM_BYTES} (raise max_request_size_bytes)")
        _check(self.max_record_bytes == 0 or self.max_record_bytes >= 1024, "max_record_bytes",
               "must be 0 (derived from the bus) or >= 1024")
        _check(self.max_record_bytes <= most, "max_record_bytes",
               f"is {self.max_record_bytes}, more than the bus takes: its records are at most {bus_limit} bytes "
               f"(bus_url's max_request_size_bytes; 1 MiB for memory://) and {RECORD_HEADROOM_BYTES} of them are kept "
               f"for the key and framing, so at most {most}; 0 derives it")
        _check(self.max_future_skew_s >= 0, "max_future_skew_s", "must be >= 0")
        _check(self.idempotency_ttl_s > 0, "idempotency_ttl_s", "must be > 0")
        _check(self.publish_timeout_s > 0, "publish_timeout_s", "must be > 0")
        _check(self.max_events_per_message >= 1, "max_events_per_message", "must be >= 1")
        _check(self.max_in_flight >= self.max_events_per_message, "max_in_flight", "must be >= max_events_per_message")
        _check(self.cache_calls_in_flight >= 1, "cache_calls_in_flight", "must be >= 1")
        _check(self.publish_calls_in_flight >= 1, "publish_calls_in_flight", "must be >= 1")

    @property
    def record_limit_bytes(self) -> int:
        """Largest FeedbackRecord accepted, in bytes: ``max_record_bytes``, or the one derived from the bus (0)."""
        return self.max_record_bytes or bus_record_bytes(self.bus_url) - RECORD_HEADROOM_BYTES

    @property
    def pending_ttl_s(self) -> float:
        """Lifetime of an idempotency claim while its event is being published: outlives the publish timeout,
        so a claim held by a replica that died frees itself."""
        return self.publish_timeout_s * 2 + 5.0
