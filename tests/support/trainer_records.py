"""Records as they appear on the platform's topics (served responses, feedback records), for the trainer's tests."""
from __future__ import annotations

import itertools

from rlhf.bus import topics
from rlhf.bus.base import Message
from rlhf.v1 import common_pb2, events_pb2, feedback_pb2

_offsets: dict[tuple[str, int], itertools.count] = {}


def served(response_id: str, prompt: str, text: str, messages=()) -> events_pb2.ServedResponse:
    record = events_pb2.ServedResponse(response_id=response_id, prompt=f"<formatted>{prompt}", text=text,
                                       input_prompt="" if messages else prompt, policy_version="p1")
    for role, content in messages:
        record.messages.messages.append(common_pb2.ChatMessage(role=role, content=content))
    return record


def event(event_id: str, **kind) -> feedback_pb2.FeedbackEvent:
    e = feedback_pb2.FeedbackEvent(event_id=event_id, product="test", annotator_id="a1", **kind)
    e.created_at.GetCurrentTime()
    return e


def ranking(event_id: str, *response_ids: str) -> feedback_pb2.FeedbackEvent:
    return event(event_id, ranking=feedback_pb2.Ranking(response_ids=list(response_ids)))


def pairwise(event_id: str, chosen: str, rejected: str, strength=0) -> feedback_pb2.FeedbackEvent:
    return event(event_id, pairwise=feedback_pb2.PairwisePreference(
        chosen_response_id=chosen, rejected_response_id=rejected, strength=strength))


def thumb(event_id: str, response_id: str, up: bool) -> feedback_pb2.FeedbackEvent:
    return event(event_id, rating=feedback_pb2.Rating(
        response_id=response_id, thumb=feedback_pb2.THUMB_UP if up else feedback_pb2.THUMB_DOWN))


def stars(event_id: str, response_id: str, value: int, low: int = 1, high: int = 5) -> feedback_pb2.FeedbackEvent:
    return event(event_id, rating=feedback_pb2.Rating(
        response_id=response_id, scale=feedback_pb2.ScaleRating(value=value, min=low, max=high)))


def demonstration(event_id: str, prompt: str, response: str) -> feedback_pb2.FeedbackEvent:
    return event(event_id, demonstration=feedback_pb2.Demonstration(prompt=prompt, response=response))


def edit(event_id: str, response_id: str, text: str) -> feedback_pb2.FeedbackEvent:
    return event(event_id, edit=feedback_pb2.Edit(response_id=response_id, edited_text=text))


def feedback_record(e: feedback_pb2.FeedbackEvent) -> events_pb2.FeedbackRecord:
    record = events_pb2.FeedbackRecord(event=e, replica_id="test")
    record.received_at.GetCurrentTime()
    return record


def message(topic: str, value: bytes, partition: int = 0) -> Message:
    """A consumed record with the next offset of its (topic, partition) in this test process."""
    offset = next(_offsets.setdefault((topic, partition), itertools.count()))
    return Message(topic, partition, offset, None, value)


def response_message(record: events_pb2.ServedResponse, partition: int = 0) -> Message:
    return message(topics.RESPONSES, record.SerializeToString(), partition)


def feedback_message(e: feedback_pb2.FeedbackEvent, partition: int = 0) -> Message:
    return message(topics.FEEDBACK, feedback_record(e).SerializeToString(), partition)


def consumption_mix(n: int, prefix: str = "") -> tuple[list[events_pb2.ServedResponse],
                                                       list[feedback_pb2.FeedbackEvent]]:
    """The consumption benchmarks' n records: a third served responses (two to a prompt), a sixth rankings of two
    of them, the rest demonstrations; ids start with ``prefix``."""
    third = n // 3
    responses = [served(f"{prefix}r{i}", f"prompt {i // 2}", f"answer {i}") for i in range(third)]
    events = [ranking(f"{prefix}k{i}", f"{prefix}r{2 * i}", f"{prefix}r{2 * i + 1}") for i in range(third // 2)]
    events += [demonstration(f"{prefix}d{i}", f"prompt {i}", f"the ideal answer {i}")
               for i in range(n - 2 * third + third // 2)]
    return responses, events


def split_prefix(stem: str, n: int, share: float, at_least: int) -> str:
    """A fresh ``stem-xxxxxx`` prefix whose ``n`` simulated ranking events (ids ``{prefix}-e{i}``, as
    :func:`simulated_rankings` names them) put at least ``at_least`` in the held-out split and at least ``at_least``
    in training. The split is a hash of the event id, so a random prefix alone leaves the held-out count binomial
    (40 events at 25%: below 5 about once in 60 runs); choosing the prefix makes a test's split certain."""
    import uuid

    from rlhf.trainer import convert

    for _ in range(10_000):
        prefix = f"{stem}-{uuid.uuid4().hex[:6]}"
        held = sum(convert.heldout([f"{prefix}-e{i}"], share) for i in range(n))
        if at_least <= held <= n - at_least:
            return prefix
    raise AssertionError(f"no prefix splits {n} events with {at_least} on each side at share {share}")


def simulated_rankings(n: int, k: int = 3, seed: int = 0, prefix: str = "sim"):
    """``n`` (prompt, served responses, ranking event) triples of the built-in task: K answers of mixed skill to a
    prompt, ranked by a simulated annotator. Returns (served records, feedback events)."""
    import random

    from rlhf.sim import AnnotatorPool, DemonstratorMix, all_prompts, write_answer

    rng = random.Random(seed)
    pool = AnnotatorPool()
    mix = DemonstratorMix()
    prompts = all_prompts()
    responses, events = [], []
    for i in range(n):
        prompt = prompts[rng.randrange(len(prompts))]
        texts: list[str] = []
        while len(texts) < k:
            text = write_answer(prompt, mix.sample(rng), rng)
            if text not in texts:
                texts.append(text)
        ids = [f"{prefix}-r{i}-{j}" for j in range(k)]
        responses += [served(rid, prompt.text, text) for rid, text in zip(ids, texts)]
        order = pool.annotate(prompt, texts, rng).ranking
        events.append(ranking(f"{prefix}-e{i}", *[ids[j] for j in order]))
    return responses, events
