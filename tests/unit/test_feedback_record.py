"""The feedback topic's record bytes, assembled from the event's bytes, parse to the message the proto API builds."""
from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.internal.encoder import _VarintBytes

from rlhf.feedback.record import record_bytes, shared_part, varint
from rlhf.v1 import events_pb2, feedback_pb2


def event(kind: str, text: str = "") -> feedback_pb2.FeedbackEvent:
    ev = feedback_pb2.FeedbackEvent(event_id="e-1", product="chat", annotator_id="a-1", prompt_id="p-1")
    ev.created_at.FromSeconds(1_700_000_000)
    ev.metadata["source"] = "ünïcode ✓"
    if kind == "rating":
        ev.rating.response_id = "r-1"
        ev.rating.scale.min, ev.rating.scale.max, ev.rating.scale.value = 1, 5, 4
    elif kind == "ranking":
        ev.ranking.response_ids.extend(["r-1", "r-2", "r-3"])
    else:
        ev.demonstration.prompt = "write"
        ev.demonstration.response = text
    return ev


@pytest.mark.parametrize("ev", [
    event("rating"), event("ranking"),
    event("demonstration", "x" * 200),  # a 2-byte length
    event("demonstration", "ü" * 20_000),  # a 3-byte length
], ids=["rating", "ranking", "2-byte-length", "3-byte-length"])
@pytest.mark.parametrize("unknown,unchecked", [((), False), (("r-1",), False), (("r-2", "ré-3"), False), ((), True)])
def test_record_bytes_parse_to_the_record_the_api_builds(
    ev: feedback_pb2.FeedbackEvent, unknown: tuple[str, ...], unchecked: bool
) -> None:
    received = timestamp_pb2.Timestamp(seconds=1_700_000_100, nanos=123)
    expected = events_pb2.FeedbackRecord(event=ev, received_at=received, unknown_response_ids=unknown,
                                         replica_id="feedback-0", responses_unchecked=unchecked)
    got = events_pb2.FeedbackRecord.FromString(
        record_bytes(ev.SerializeToString(), shared_part(received, "feedback-0"), unknown, unchecked))
    assert got == expected
    # Same bytes as the API's up to field order: re-serialising the parsed record gives the API's bytes.
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35 + 7])
def test_varint_matches_protobuf(n: int) -> None:
    assert varint(n) == _VarintBytes(n)
