"""Validation of feedback events. Pure: a proto in, :class:`InvalidArgument` naming the field out.

Besides the rules of each field, an event must fit the bus once published: the FeedbackRecord it becomes (the
event and the fields the service adds, rlhf.feedback.record) is at most ``Limits.max_record_bytes``, which
FeedbackConfig keeps below the bus's largest record.

Every rule here has a test in tests/unit/test_feedback_validation.py and an end-to-end one over gRPC.
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from google.protobuf import timestamp_pb2

from rlhf.feedback import record
from rlhf.serving.errors import InvalidArgument
from rlhf.v1 import common_pb2, feedback_pb2

ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ID_RULE = "1..128 characters of [A-Za-z0-9._:-]"
_ID_FULLMATCH = ID_PATTERN.fullmatch
KINDS = ("rating", "pairwise", "ranking", "demonstration", "edit")
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64
MAX_METADATA = 32
_THUMB_UNSPECIFIED = feedback_pb2.THUMB_UNSPECIFIED  # read once: enum attributes are slow to look up
# Upper bounds of record_size_bound's parts, for a check that is cheap on the hot path (the exact bound takes 1-2 us
# and is computed only for events near the limit): the event's tag and length (a varint of <= 5 bytes below 32 GiB)
# plus responses_unchecked; per response id, its tag, length (2 bytes of varint: an id is <= 128 bytes) and bytes.
_MAX_FRAMING_BYTES = 1 + 5 + 2
_MAX_ID_FIELD_BYTES = 1 + 2 + 128
# The largest received_at a record carries until the year 3058 (seconds below 2**35: a 5-byte varint).
_LATEST = timestamp_pb2.Timestamp(seconds=2**35 - 1, nanos=999_999_999)


def shared_record_bytes(replica_id: str) -> int:
    """Most bytes of the part every record of a replica shares (``record.shared_part``: received_at, replica_id)."""
    return len(record.shared_part(_LATEST, replica_id))


@dataclasses.dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 32 * 1024
    max_ranking_size: int = 16
    max_future_skew_s: float = 300.0
    max_record_bytes: int = 1024 * 1024 - 4 * 1024
    """Largest serialized FeedbackRecord of a valid event (FeedbackConfig.record_limit_bytes, below the bus's
    largest record, so that a valid event is never one the bus refuses; the default is its value on a 1 MiB bus)."""
    shared_record_bytes: int = shared_record_bytes("x" * 64)
    """Bytes of the fields every record of this replica carries beside the event (:func:`shared_record_bytes` of
    its replica id); the default covers a replica id of up to 64 bytes (the longest Linux host name)."""


def record_size_bound(event_size: int, response_ids: list[str], shared_bytes: int) -> int:
    """The largest serialized FeedbackRecord an event of ``event_size`` bytes that names ``response_ids`` can
    become (rlhf.feedback.record): the event as field 1, the shared part, and either every response id marked
    unknown or ``responses_unchecked`` set (never both: unknown ids need a lookup that worked)."""
    ids = sum(1 + len(record.varint(len(rid))) + len(rid) for rid in (r.encode() for r in response_ids))
    return 1 + len(record.varint(event_size)) + event_size + shared_bytes + max(ids, 2)


def _mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB"


def _require_id(value: str, field: str, name: str, index: int | None = None) -> None:
    """``value`` is a valid id; the error names ``field.name`` (``field.name[index]``). Field names are built only
    for an error: this runs several times per event on the ingestion hot path."""
    if value and _ID_FULLMATCH(value):
        return
    where = f"{field}.{name}" if index is None else f"{field}.{name}[{index}]"
    if not value:
        raise InvalidArgument(where, f"required ({ID_RULE})")
    raise InvalidArgument(where, f"{value[:40]!r} is not a valid id ({ID_RULE})")


def _require_text(value: str, field: str, limits: Limits) -> None:
    if not value.strip():
        raise InvalidArgument(field, "required (non-empty text)")
    size = len(value.encode("utf-8"))
    if size > limits.max_text_bytes:
        raise InvalidArgument(field, f"is {size} bytes; at most {limits.max_text_bytes} bytes allowed")


def _bounded(value: str, field: str, name: str, most: int) -> None:
    if value and len(value) <= most:
        return
    if not value:
        raise InvalidArgument(f"{field}.{name}", f"required (1..{most} characters)")
    raise InvalidArgument(f"{field}.{name}", f"is {len(value)} characters; at most {most} allowed")


def validate_conversation(conv: common_pb2.Conversation, field: str, limits: Limits) -> None:
    if not conv.messages:
        raise InvalidArgument(f"{field}.messages", "required (at least one message)")
    if len(conv.messages) > MAX_MESSAGES:
        raise InvalidArgument(f"{field}.messages", f"has {len(conv.messages)} messages; at most {MAX_MESSAGES}")
    for i, msg in enumerate(conv.messages):
        if msg.role not in ROLES:
            raise InvalidArgument(f"{field}.messages[{i}].role", f"{msg.role!r} is not one of {', '.join(ROLES)}")
        _require_text(msg.content, f"{field}.messages[{i}].content", limits)


def response_ids(event: feedback_pb2.FeedbackEvent) -> list[str]:
    """The served responses an event refers to, in order."""
    kind = event.WhichOneof("kind")
    if kind == "rating":
        return [event.rating.response_id]
    if kind == "pairwise":
        return [event.pairwise.chosen_response_id, event.pairwise.rejected_response_id]
    if kind == "ranking":
        return list(event.ranking.response_ids)
    if kind == "edit":
        return [event.edit.response_id]
    return []


class Checked(NamedTuple):
    """What validation learnt about a valid event, so that the ingestion path does not read it again."""

    kind: str
    """The kind set (``rating``, ``pairwise``, ...)."""
    response_ids: list[str]
    """The served responses it refers to, in order (as :func:`response_ids`)."""


def validate_event(
    event: feedback_pb2.FeedbackEvent, limits: Limits, now_s: float, field: str = "event"
) -> Checked:
    """Raise :class:`InvalidArgument` for the first problem found in ``event``; else its kind and response ids."""
    # 1. envelope
    _require_id(event.event_id, field, "event_id")
    _bounded(event.product, field, "product", 64)
    _bounded(event.annotator_id, field, "annotator_id", 128)
    prompt_id = event.prompt_id
    if prompt_id:
        _require_id(prompt_id, field, "prompt_id")
    created = event.created_at
    seconds, nanos = created.seconds, created.nanos
    if (seconds == 0 and nanos == 0) or not event.HasField("created_at"):
        raise InvalidArgument(f"{field}.created_at", "required (when the annotator gave the feedback)")
    if not 0 <= nanos < 1_000_000_000:
        raise InvalidArgument(f"{field}.created_at.nanos", "must be in [0, 1e9)")
    ahead = seconds + nanos / 1e9 - now_s
    if ahead > limits.max_future_skew_s:
        raise InvalidArgument(
            f"{field}.created_at",
            f"is {ahead:.0f}s in the future; at most {limits.max_future_skew_s:.0f}s of clock skew is allowed",
        )
    metadata = event.metadata
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(f"{field}.metadata", f"has {len(metadata)} entries; at most {MAX_METADATA}")
    for key, value in metadata.items() if metadata else ():
        if not 1 <= len(key.encode()) <= 64:
            raise InvalidArgument(f"{field}.metadata", f"key {key[:70]!r} must be 1..64 bytes")
        if len(value.encode()) > 1024:
            raise InvalidArgument(f"{field}.metadata[{key!r}]", "value is over 1024 bytes")

    # 2. the kind
    kind = event.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{field}.kind", f"required: set one of {', '.join(KINDS)}")
    ids = _VALIDATORS[kind](getattr(event, kind), field, limits)

    # 3. the size of the record it becomes: the bus takes records up to a size; a valid event must fit one, or it
    #    would fail to publish on every retry
    size = event.ByteSize()
    most = size + limits.shared_record_bytes + _MAX_FRAMING_BYTES + _MAX_ID_FIELD_BYTES * len(ids)
    if most > limits.max_record_bytes:
        bound = record_size_bound(size, ids, limits.shared_record_bytes)
        if bound > limits.max_record_bytes:
            raise InvalidArgument(
                field, f"serialized size {_mib(bound)} ({bound} bytes on the bus) exceeds the limit of "
                f"{_mib(limits.max_record_bytes)} ({limits.max_record_bytes} bytes): send shorter texts or fewer "
                "messages")
    return Checked(kind, ids)


# Each takes (message of the kind, the event's field name, limits), names errors ``<event field>.<kind>.<...>``
# and returns the response ids the message names.

def _rating(rating: feedback_pb2.Rating, parent: str, limits: Limits) -> list[str]:
    response_id = rating.response_id
    _require_id(response_id, parent, "rating.response_id")
    value = rating.WhichOneof("value")
    if value == "thumb":
        if rating.thumb == _THUMB_UNSPECIFIED:
            raise InvalidArgument(f"{parent}.rating.thumb", "must be THUMB_UP or THUMB_DOWN")
        return [response_id]
    if value is None:
        raise InvalidArgument(f"{parent}.rating.value", "required: set thumb or scale")
    scale = rating.scale
    if scale.min >= scale.max:
        raise InvalidArgument(f"{parent}.rating.scale.max",
                              f"must be greater than min ({scale.min}), got {scale.max}")
    if scale.max - scale.min > 100:
        raise InvalidArgument(f"{parent}.rating.scale", f"range {scale.min}..{scale.max} is wider than 100 steps")
    if not scale.min <= scale.value <= scale.max:
        raise InvalidArgument(f"{parent}.rating.scale.value", f"{scale.value} is outside [{scale.min}, {scale.max}]")
    return [response_id]


def _pairwise(pair: feedback_pb2.PairwisePreference, parent: str, limits: Limits) -> list[str]:
    chosen, rejected = pair.chosen_response_id, pair.rejected_response_id
    _require_id(chosen, parent, "pairwise.chosen_response_id")
    _require_id(rejected, parent, "pairwise.rejected_response_id")
    if chosen == rejected:
        raise InvalidArgument(f"{parent}.pairwise.rejected_response_id", "must differ from chosen_response_id")
    return [chosen, rejected]


def _ranking(ranking: feedback_pb2.Ranking, parent: str, limits: Limits) -> list[str]:
    ids = list(ranking.response_ids)
    n = len(ids)
    if n < 2:
        raise InvalidArgument(f"{parent}.ranking.response_ids", f"has {n} item(s); a ranking needs at least 2")
    if n > limits.max_ranking_size:
        raise InvalidArgument(f"{parent}.ranking.response_ids", f"has {n} items; at most {limits.max_ranking_size}")
    for i, rid in enumerate(ids):
        _require_id(rid, parent, "ranking.response_ids", i)
    if len(set(ids)) != n:
        seen: dict[str, int] = {}
        for i, rid in enumerate(ids):
            if rid in seen:
                raise InvalidArgument(
                    f"{parent}.ranking.response_ids[{i}]",
                    f"duplicates response_ids[{seen[rid]}]; rank distinct responses",
                )
            seen[rid] = i
    return ids


def _demonstration(demo: feedback_pb2.Demonstration, parent: str, limits: Limits) -> list[str]:
    field = f"{parent}.demonstration"
    source = demo.WhichOneof("input")
    if source is None:
        raise InvalidArgument(f"{field}.prompt", "required: set prompt or messages")
    if source == "prompt":
        _require_text(demo.prompt, f"{field}.prompt", limits)
    else:
        validate_conversation(demo.messages, f"{field}.messages", limits)
    _require_text(demo.response, f"{field}.response", limits)
    return []


def _edit(edit: feedback_pb2.Edit, parent: str, limits: Limits) -> list[str]:
    response_id = edit.response_id
    _require_id(response_id, parent, "edit.response_id")
    _require_text(edit.edited_text, f"{parent}.edit.edited_text", limits)
    return [response_id]


_VALIDATORS = {
    "rating": _rating,
    "pairwise": _pairwise,
    "ranking": _ranking,
    "demonstration": _demonstration,
    "edit": _edit,
}
