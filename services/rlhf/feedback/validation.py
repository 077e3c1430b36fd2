"""Validation of feedback events. Pure: a proto in, :class:`InvalidArgument` naming the field out.

Every rule here has a test in tests/unit/test_feedback_validation.py and an end-to-end one over gRPC.
"""
from __future__ import annotations

import dataclasses
import re

from rlhf.serving.errors import InvalidArgument
from rlhf.v1 import common_pb2, feedback_pb2

ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ID_RULE = "1..128 characters of [A-Za-z0-9._:-]"
KINDS = ("rating", "pairwise", "ranking", "demonstration", "edit")
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64
MAX_METADATA = 32


@dataclasses.dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 32 * 1024
    max_ranking_size: int = 16
    max_future_skew_s: float = 300.0


def _require_id(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, f"required ({ID_RULE})")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"{value[:40]!r} is not a valid id ({ID_RULE})")


def _require_text(value: str, field: str, limits: Limits) -> None:
    if not value.strip():
        raise InvalidArgument(field, "required (non-empty text)")
    size = len(value.encode("utf-8"))
    if size > limits.max_text_bytes:
        raise InvalidArgument(field, f"is {size} bytes; at most {limits.max_text_bytes} bytes allowed")


def _bounded(value: str, field: str, most: int) -> None:
    if not value:
        raise InvalidArgument(field, f"required (1..{most} characters)")
    if len(value) > most:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {most} allowed")


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


def validate_event(event: feedback_pb2.FeedbackEvent, limits: Limits, now_s: float, field: str = "event") -> None:
    """Raise :class:`InvalidArgument` for the first problem found in ``event``."""
    # 1. envelope
    _require_id(event.event_id, f"{field}.event_id")
    _bounded(event.product, f"{field}.product", 64)
    _bounded(event.annotator_id, f"{field}.annotator_id", 128)
    if event.prompt_id:
        _require_id(event.prompt_id, f"{field}.prompt_id")
    if not event.HasField("created_at") or (event.created_at.seconds == 0 and event.created_at.nanos == 0):
        raise InvalidArgument(f"{field}.created_at", "required (when the annotator gave the feedback)")
    if not 0 <= event.created_at.nanos < 1_000_000_000:
        raise InvalidArgument(f"{field}.created_at.nanos", "must be in [0, 1e9)")
    ahead = event.created_at.seconds + event.created_at.nanos / 1e9 - now_s
    if ahead > limits.max_future_skew_s:
        raise InvalidArgument(
            f"{field}.created_at",
            f"is {ahead:.0f}s in the future; at most {limits.max_future_skew_s:.0f}s of clock skew is allowed",
        )
    if len(event.metadata) > MAX_METADATA:
        raise InvalidArgument(f"{field}.metadata", f"has {len(event.metadata)} entries; at most {MAX_METADATA}")
    for key, value in event.metadata.items():
        if not 1 <= len(key.encode()) <= 64:
            raise InvalidArgument(f"{field}.metadata", f"key {key[:70]!r} must be 1..64 bytes")
        if len(value.encode()) > 1024:
            raise InvalidArgument(f"{field}.metadata[{key!r}]", "value is over 1024 bytes")

    # 2. the kind
    kind = event.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{field}.kind", f"required: set one of {', '.join(KINDS)}")
    _VALIDATORS[kind](getattr(event, kind), f"{field}.{kind}", limits)


def _rating(rating: feedback_pb2.Rating, field: str, limits: Limits) -> None:
    _require_id(rating.response_id, f"{field}.response_id")
    value = rating.WhichOneof("value")
    if value is None:
        raise InvalidArgument(f"{field}.value", "required: set thumb or scale")
    if value == "thumb":
        if rating.thumb == feedback_pb2.THUMB_UNSPECIFIED:
            raise InvalidArgument(f"{field}.thumb", "must be THUMB_UP or THUMB_DOWN")
        return
    scale = rating.scale
    if scale.min >= scale.max:
        raise InvalidArgument(f"{field}.scale.max", f"must be greater than min ({scale.min}), got {scale.max}")
    if scale.max - scale.min > 100:
        raise InvalidArgument(f"{field}.scale", f"range {scale.min}..{scale.max} is wider than 100 steps")
    if not scale.min <= scale.value <= scale.max:
        raise InvalidArgument(f"{field}.scale.value", f"{scale.value} is outside [{scale.min}, {scale.max}]")


def _pairwise(pair: feedback_pb2.PairwisePreference, field: str, limits: Limits) -> None:
    _require_id(pair.chosen_response_id, f"{field}.chosen_response_id")
    _require_id(pair.rejected_response_id, f"{field}.rejected_response_id")
    if pair.chosen_response_id == pair.rejected_response_id:
        raise InvalidArgument(f"{field}.rejected_response_id", "must differ from chosen_response_id")


def _ranking(ranking: feedback_pb2.Ranking, field: str, limits: Limits) -> None:
    ids = ranking.response_ids
    if len(ids) < 2:
        raise InvalidArgument(f"{field}.response_ids", f"has {len(ids)} item(s); a ranking needs at least 2")
    if len(ids) > limits.max_ranking_size:
        raise InvalidArgument(f"{field}.response_ids", f"has {len(ids)} items; at most {limits.max_ranking_size}")
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        _require_id(rid, f"{field}.response_ids[{i}]")
        if rid in seen:
            raise InvalidArgument(
                f"{field}.response_ids[{i}]", f"duplicates response_ids[{seen[rid]}]; rank distinct responses"
            )
        seen[rid] = i


def _demonstration(demo: feedback_pb2.Demonstration, field: str, limits: Limits) -> None:
    source = demo.WhichOneof("input")
    if source is None:
        raise InvalidArgument(f"{field}.prompt", "required: set prompt or messages")
    if source == "prompt":
        _require_text(demo.prompt, f"{field}.prompt", limits)
    else:
        validate_conversation(demo.messages, f"{field}.messages", limits)
    _require_text(demo.response, f"{field}.response", limits)


def _edit(edit: feedback_pb2.Edit, field: str, limits: Limits) -> None:
    _require_id(edit.response_id, f"{field}.response_id")
    _require_text(edit.edited_text, f"{field}.edited_text", limits)


_VALIDATORS = {
    "rating": _rating,
    "pairwise": _pairwise,
    "ranking": _ranking,
    "demonstration": _demonstration,
    "edit": _edit,
}
