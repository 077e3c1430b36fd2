"""Every validation rule of feedback events, on the pure function (the gRPC path is tested in integration), and the
size limit of the record an event becomes, derived from the bus's."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.bus import InMemoryBus, KafkaConfig, topics
from rlhf.cache.memory import InMemoryCache
from rlhf.feedback import record
from rlhf.feedback.config import MEMORY_BUS_RECORD_BYTES, RECORD_HEADROOM_BYTES, FeedbackConfig
from rlhf.feedback.ingest import ACCEPTED, REJECTED, FeedbackIngestor
from rlhf.feedback.validation import (
    MAX_MESSAGES, Limits, record_size_bound, response_ids, shared_record_bytes, validate_event,
)
from rlhf.serving.config import ConfigError
from rlhf.serving.errors import InvalidArgument
from rlhf.v1 import common_pb2, events_pb2, feedback_pb2
from support.feedback_cases import LIMITS_FOR_CASES, base_event, invalid_events, thumbs_up, valid_events
from unit.test_memory_bus import poll_until

NOW = 1_800_000_000.0
LIMITS = Limits(**LIMITS_FOR_CASES)
INVALID = invalid_events(NOW)


@pytest.mark.parametrize("ev", valid_events(NOW), ids=lambda e: e.WhichOneof("kind"))
def test_valid_events_pass(ev):
    validate_event(ev, LIMITS, NOW)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_events_name_the_field(name):
    ev, field = INVALID[name]
    with pytest.raises(InvalidArgument) as err:
        validate_event(ev, LIMITS, NOW)
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(field + ": ")


def test_small_clock_skew_is_allowed():
    ev = thumbs_up(NOW)
    ev.created_at.FromSeconds(int(NOW) + 30)
    validate_event(ev, LIMITS, NOW)


def test_real_clock_now_is_valid():
    ev = thumbs_up(time.time())
    ev.created_at.GetCurrentTime()
    validate_event(ev, LIMITS, time.time())


# --------------------------------------------------------------------------------------------- the record's size
# A valid event becomes a FeedbackRecord on the bus, which takes records up to a size: an event whose record would
# not fit is INVALID_ARGUMENT here, not FAILED "retry" on every attempt to publish it.

BIG_TEXTS = Limits(max_text_bytes=4 * 1024 * 1024)
"""Texts as long as a test needs: only the record size limits them."""


def demonstration(response_bytes: int, now: float = NOW) -> feedback_pb2.FeedbackEvent:
    return base_event(now, demonstration=feedback_pb2.Demonstration(prompt="How?", response="x" * response_bytes))


def published_sizes(event: feedback_pb2.FeedbackEvent, ids: list[str], replica: str) -> list[int]:
    """Sizes of the records the ingestor can publish for ``event``: every id unknown, or the lookup impossible."""
    shared = record.shared_part(Timestamp(seconds=2**35 - 1, nanos=999_999_999), replica)
    raw = event.SerializeToString()
    return [len(record.record_bytes(raw, shared, ids)), len(record.record_bytes(raw, shared, (), True))]


@pytest.mark.parametrize("replica", ["", "replica-1", "r" * 200])
@pytest.mark.parametrize("ev", valid_events(NOW) + [demonstration(300_000)], ids=lambda e: e.WhichOneof("kind"))
def test_record_size_bound_is_the_largest_record_the_event_can_become(ev, replica):
    ids = response_ids(ev)
    bound = record_size_bound(ev.ByteSize(), ids, shared_record_bytes(replica))
    assert bound == max(published_sizes(ev, ids, replica))


def test_an_event_whose_record_is_at_the_limit_passes_one_byte_more_is_invalid():
    limit = record_size_bound(demonstration(500_000).ByteSize(), [], BIG_TEXTS.shared_record_bytes)
    limits = dataclasses.replace(BIG_TEXTS, max_record_bytes=limit)
    validate_event(demonstration(500_000), limits, NOW)
    with pytest.raises(InvalidArgument) as err:
        validate_event(demonstration(500_001), limits, NOW)
    assert err.value.field == "event"
    assert str(err.value) == (f"event: serialized size 0.477 MiB ({limit + 1} bytes on the bus) exceeds the limit "
                              f"of 0.477 MiB ({limit} bytes): send shorter texts or fewer messages")


def test_the_response_ids_a_record_may_carry_count():
    """A ranking's ids may all come back as unknown_response_ids: 16 ids of 128 bytes add over 2 KiB."""
    ids = [f"{i:02d}" + "r" * 126 for i in range(16)]
    ranking = base_event(NOW, ranking=feedback_pb2.Ranking(response_ids=ids))
    event_only = 1 + 2 + ranking.ByteSize() + LIMITS.shared_record_bytes
    limits = dataclasses.replace(LIMITS, max_ranking_size=16, max_record_bytes=event_only + 16 * 131 - 1)
    with pytest.raises(InvalidArgument, match=r"^event: serialized size"):
        validate_event(ranking, limits, NOW)
    validate_event(ranking, dataclasses.replace(limits, max_record_bytes=event_only + 16 * 131), NOW)


def test_the_default_limits_refuse_what_the_bus_refuses_and_name_the_event():
    """64 messages of max_text_bytes each are valid text by text, but 2 MiB: over the bus's 1 MiB."""
    limits = Limits()
    assert limits.max_record_bytes == FeedbackConfig(bus_url="memory://").record_limit_bytes
    conv = common_pb2.Conversation(messages=[
        common_pb2.ChatMessage(role="user" if i % 2 == 0 else "assistant", content="x" * limits.max_text_bytes)
        for i in range(MAX_MESSAGES)])
    huge = base_event(NOW, demonstration=feedback_pb2.Demonstration(messages=conv, response="ok"))
    with pytest.raises(InvalidArgument) as err:
        validate_event(huge, limits, NOW)
    assert err.value.field == "event" and "serialized size 2 MiB" in str(err.value)
    assert "exceeds the limit of 0.996 MiB (1044480 bytes)" in str(err.value)


def test_record_limit_is_derived_from_the_bus_and_checked_against_it():
    assert MEMORY_BUS_RECORD_BYTES == InMemoryBus().max_record_bytes  # what memory:// builds
    assert FeedbackConfig(bus_url="memory://").record_limit_bytes == MEMORY_BUS_RECORD_BYTES - RECORD_HEADROOM_BYTES
    kafka = FeedbackConfig(bus_url="kafka://127.0.0.1:9092")
    assert kafka.record_limit_bytes == KafkaConfig().max_request_size_bytes - RECORD_HEADROOM_BYTES
    bigger = FeedbackConfig(bus_url="kafka://127.0.0.1:9092?max_request_size_bytes=4194304")
    assert bigger.record_limit_bytes == 4 * 1024 * 1024 - RECORD_HEADROOM_BYTES
    assert FeedbackConfig(bus_url="memory://", max_record_bytes=100_000).record_limit_bytes == 100_000
    assert "record_limit_bytes" not in {f.name for f in dataclasses.fields(FeedbackConfig)}  # derived, not stored

    with pytest.raises(ConfigError) as err:
        FeedbackConfig(bus_url="kafka://127.0.0.1:9092", max_record_bytes=1024 * 1024)
    assert str(err.value).startswith("max_record_bytes is 1048576, more than the bus takes: its records are at most "
                                     "1048576 bytes")
    assert "at most 1044480" in str(err.value) and str(err.value).endswith("(flag --max-record-bytes)")
    with pytest.raises(ConfigError, match=r"^max_record_bytes must be 0 \(derived from the bus\) or >= 1024"):
        FeedbackConfig(bus_url="memory://", max_record_bytes=10)
    with pytest.raises(ConfigError, match=r"^bus_url takes records of at most 2048 bytes"):
        FeedbackConfig(bus_url="kafka://127.0.0.1:9092?max_request_size_bytes=2048")
    with pytest.raises(ConfigError, match=r"^bus_url: unknown bus URL 'nats://x'"):
        FeedbackConfig(bus_url="nats://x")


def test_the_largest_valid_event_reaches_the_in_process_bus_one_byte_more_is_rejected():
    """Through the ingestor: the limit the config derives leaves room for the record's key on a real bus."""
    config = FeedbackConfig(bus_url="memory://", cache_url="memory://", max_text_bytes=2 * 1024 * 1024,
                            replica_id="replica-" + "x" * 56)
    bus = InMemoryBus()
    ingestor = FeedbackIngestor(bus, InMemoryCache(), config)
    limit, shared = config.record_limit_bytes, ingestor.limits.shared_record_bytes
    now = time.time()

    def event(size: int, event_id: str) -> feedback_pb2.FeedbackEvent:
        ev = demonstration(size, now)
        ev.event_id = event_id  # 128 bytes: the longest key a record can have is its event_id
        return ev

    n = limit - record_size_bound(event(0, "e" * 128).ByteSize(), [], shared)
    while record_size_bound(event(n, "e" * 128).ByteSize(), [], shared) > limit:
        n -= 1  # the event's length varint grew
    largest, over = event(n, "e" * 128), event(n + 1, "f" * 128)
    outcomes = asyncio.run(ingestor.submit_batch([largest, over]))
    assert [o.status for o in outcomes] == [ACCEPTED, REJECTED], outcomes
    assert outcomes[1].error.field == "event"
    with bus.consumer([topics.FEEDBACK], "check") as consumer:
        [message] = poll_until(consumer, 1)
    assert message.key == largest.event_id.encode()
    assert events_pb2.FeedbackRecord.FromString(message.value).event == largest
    assert limit - 8 <= len(message.value) <= limit
