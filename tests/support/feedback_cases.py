"""Feedback events shared by the unit and the integration tests: valid events of every kind, and one invalid
event per validation rule with the field its error must name."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from rlhf.v1 import common_pb2, feedback_pb2

# Limits the cases are written against; the integration service is configured with the same.
LIMITS_FOR_CASES = dict(max_text_bytes=100, max_ranking_size=4, max_future_skew_s=60)


def base_event(now: float, **kind) -> feedback_pb2.FeedbackEvent:
    ev = feedback_pb2.FeedbackEvent(event_id=f"ev-{uuid.uuid4().hex}", product="chat", annotator_id="a1", **kind)
    ev.created_at.FromSeconds(int(now) - 10)
    return ev


def thumbs_up(now: float, rid: str = "r1") -> feedback_pb2.FeedbackEvent:
    return base_event(now, rating=feedback_pb2.Rating(response_id=rid, thumb=feedback_pb2.THUMB_UP))


def valid_events(now: float | None = None) -> list[feedback_pb2.FeedbackEvent]:
    now = time.time() if now is None else now
    user_hi = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role="user", content="Hi")])
    return [
        thumbs_up(now),
        base_event(now, rating=feedback_pb2.Rating(response_id="r1", scale=feedback_pb2.ScaleRating(value=5, min=1, max=5))),
        base_event(now, pairwise=feedback_pb2.PairwisePreference(chosen_response_id="r1", rejected_response_id="r2")),
        base_event(now, ranking=feedback_pb2.Ranking(response_ids=["r1", "r2", "r3", "r4"])),
        base_event(now, demonstration=feedback_pb2.Demonstration(prompt="How?", response="Like so.")),
        base_event(now, demonstration=feedback_pb2.Demonstration(messages=user_hi, response="Hello.")),
        base_event(now, edit=feedback_pb2.Edit(response_id="r1", edited_text="Better.")),
    ]


def invalid_events(now: float | None = None) -> dict[str, tuple[feedback_pb2.FeedbackEvent, str]]:
    """{rule: (event breaking only that rule, the field path its error names)}."""
    now = time.time() if now is None else now

    def mutate(fn: Callable[[feedback_pb2.FeedbackEvent], object]) -> feedback_pb2.FeedbackEvent:
        ev = thumbs_up(now)
        fn(ev)
        return ev

    def kind(**k) -> feedback_pb2.FeedbackEvent:
        return base_event(now, **k)

    Rating, Scale = feedback_pb2.Rating, feedback_pb2.ScaleRating
    Pair, Ranking = feedback_pb2.PairwisePreference, feedback_pb2.Ranking
    Demo, Edit = feedback_pb2.Demonstration, feedback_pb2.Edit
    robot = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role="robot", content="x")])
    return {
        "missing event_id": (mutate(lambda e: setattr(e, "event_id", "")), "event.event_id"),
        "bad event_id": (mutate(lambda e: setattr(e, "event_id", "has space")), "event.event_id"),
        "long event_id": (mutate(lambda e: setattr(e, "event_id", "x" * 129)), "event.event_id"),
        "missing product": (mutate(lambda e: setattr(e, "product", "")), "event.product"),
        "missing annotator": (mutate(lambda e: setattr(e, "annotator_id", "")), "event.annotator_id"),
        "missing timestamp": (mutate(lambda e: e.ClearField("created_at")), "event.created_at"),
        "future timestamp": (mutate(lambda e: e.created_at.FromSeconds(int(now) + 3600)), "event.created_at"),
        "missing kind": (mutate(lambda e: e.ClearField("rating")), "event.kind"),
        "bad prompt_id": (mutate(lambda e: setattr(e, "prompt_id", "a/b")), "event.prompt_id"),
        "too much metadata": (mutate(lambda e: e.metadata.update({f"k{i}": "v" for i in range(33)})),
                              "event.metadata"),
        "rating without response": (kind(rating=Rating(thumb=feedback_pb2.THUMB_UP)), "event.rating.response_id"),
        "rating without value": (kind(rating=Rating(response_id="r1")), "event.rating.value"),
        "unspecified thumb": (kind(rating=Rating(response_id="r1", thumb=0)), "event.rating.thumb"),
        "scale above max": (kind(rating=Rating(response_id="r1", scale=Scale(value=6, min=1, max=5))),
                            "event.rating.scale.value"),
        "scale below min": (kind(rating=Rating(response_id="r1", scale=Scale(value=0, min=1, max=5))),
                            "event.rating.scale.value"),
        "scale min >= max": (kind(rating=Rating(response_id="r1", scale=Scale(value=1, min=5, max=5))),
                             "event.rating.scale.max"),
        "pairwise empty chosen": (kind(pairwise=Pair(rejected_response_id="r2")),
                                  "event.pairwise.chosen_response_id"),
        "pairwise same ids": (kind(pairwise=Pair(chosen_response_id="r1", rejected_response_id="r1")),
                              "event.pairwise.rejected_response_id"),
        "ranking of one": (kind(ranking=Ranking(response_ids=["r1"])), "event.ranking.response_ids"),
        "ranking too long": (kind(ranking=Ranking(response_ids=[f"r{i}" for i in range(5)])),
                             "event.ranking.response_ids"),
        "ranking duplicate": (kind(ranking=Ranking(response_ids=["r1", "r2", "r1"])),
                              "event.ranking.response_ids[2]"),
        "ranking empty id": (kind(ranking=Ranking(response_ids=["r1", ""])), "event.ranking.response_ids[1]"),
        "demonstration without prompt": (kind(demonstration=Demo(response="x")), "event.demonstration.prompt"),
        "demonstration empty response": (kind(demonstration=Demo(prompt="p", response=" ")),
                                         "event.demonstration.response"),
        "demonstration oversized": (kind(demonstration=Demo(prompt="p", response="x" * 101)),
                                    "event.demonstration.response"),
        "demonstration bad role": (kind(demonstration=Demo(messages=robot, response="y")),
                                   "event.demonstration.messages.messages[0].role"),
        "edit oversized": (kind(edit=Edit(response_id="r1", edited_text="é" * 51)), "event.edit.edited_text"),
        "edit without response": (kind(edit=Edit(edited_text="x")), "event.edit.response_id"),
    }


def stream_submit(stub, events, per_message: int = 100, timeout: float = 120.0, requests=None):
    """SubmitStream ``events`` in messages of ``per_message``; the acknowledgements flattened, by sequence.
    ``requests`` (an iterator of SubmitStreamRequest) replaces the batching when given."""
    if requests is None:
        requests = (feedback_pb2.SubmitStreamRequest(events=events[i:i + per_message])
                    for i in range(0, len(events), per_message))
    acks = [ack for reply in stub.SubmitStream(requests, timeout=timeout) for ack in reply.acks]
    return sorted(acks, key=lambda a: a.sequence)
