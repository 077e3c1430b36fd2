"""The bytes of a ``FeedbackRecord`` (the feedback topic's value), assembled on the ingestion hot path.

Building a ``FeedbackRecord`` message per event copies the event into it and serialises both again (about 5 us
per event). Protobuf's wire format makes that unnecessary: a serialised message is the concatenation of its
fields, in any order, so a record is

    field 1 (the event's own bytes) + the part every record of a batch shares (received_at, replica_id)
    + the event's own extras (unknown_response_ids, responses_unchecked)

Parsing it gives exactly the message the proto API would have built (tests/unit/test_feedback_record.py).
"""
from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from rlhf.v1 import events_pb2

# Wire tags: (field number << 3) | wire type; 2 = length-delimited, 0 = varint.
_EVENT = b"\x0a"  # 1: event
_UNKNOWN_RESPONSE_ID = b"\x1a"  # 3: unknown_response_ids (one per id)
_RESPONSES_UNCHECKED = b"\x28\x01"  # 5: responses_unchecked = true


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def shared_part(received_at: timestamp_pb2.Timestamp, replica_id: str) -> bytes:
    """The fields every record of one batch has in common."""
    return events_pb2.FeedbackRecord(received_at=received_at, replica_id=replica_id).SerializeToString()


def record_bytes(event_bytes: bytes, shared: bytes, unknown_response_ids: Sequence[str] = (),
                 responses_unchecked: bool = False) -> bytes:
    """A serialised ``FeedbackRecord`` of an event given as its serialised bytes (see the module docstring)."""
    parts = [_EVENT, varint(len(event_bytes)), event_bytes, shared]
    for rid in unknown_response_ids:
        encoded = rid.encode()
        parts += (_UNKNOWN_RESPONSE_ID, varint(len(encoded)), encoded)
    if responses_unchecked:
        parts.append(_RESPONSES_UNCHECKED)
    return b"".join(parts)
