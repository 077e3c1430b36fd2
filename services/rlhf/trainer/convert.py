"""From feedback events and the responses they name to training records (pure: no storage, no bus).

Conversion rules:

* ratings of responses to the same prompt become preference pairs, the higher rated response chosen (thumbs: up = 1,
  down = 0; a scale is mapped onto [0, 1]); ties are dropped;
* a pairwise preference is a pair (its strength, when given, a margin: slight 0, clear 0.5, strong 1);
* a K-wise ranking is kept whole, best first, as the core's reward trainer uses it;
* a demonstration is supervised data;
* an edit is a demonstration (the prompt of the edited response, the edited text) and a pair that prefers the edit
  over the response it edits (no pair when the edit changed nothing).

Responses "answer the same prompt" when their prompts are equal (the product's plain prompt, or its conversation).
Every derived record keeps the event ids it came from. An event that cannot be used is a :class:`Unusable` with the
reason that goes with it to the dead-letter topic.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from rlhf.v1 import events_pb2, feedback_pb2

STRENGTH_MARGIN = {
    feedback_pb2.PREFERENCE_STRENGTH_SLIGHT: 0.0,
    feedback_pb2.PREFERENCE_STRENGTH_CLEAR: 0.5,
    feedback_pb2.PREFERENCE_STRENGTH_STRONG: 1.0,
}


class Unusable(Exception):
    """The event cannot become training data; ``reason`` goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a response answered: the plain prompt as the product sent it, or the conversation."""

    text: str
    messages: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def key(self) -> str:
        """Equal for equal prompts (a plain prompt and a conversation never collide)."""
        return prompt_key(self.text, json.dumps(self.messages) if self.messages else "")


def prompt_key(text: str, messages_json: str = "") -> str:
    """:attr:`Prompt.key` from a prompt's stored form (its text, and its messages as JSON or "" when none)."""
    raw = "m" + messages_json if messages_json else "p" + text
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Response:
    """A served response, as stored from rlhf.responses.v1."""

    response_id: str
    prompt: Prompt
    text: str
    policy_version: str = ""

    @property
    def prompt_key(self) -> str:
        return self.prompt.key


class StoredResponse(NamedTuple):
    """A served response in its stored form (a row of the dataset's ``responses`` table, without dataclasses: the
    hot path of consumption builds one per record)."""

    prompt: str
    messages_json: str
    """The conversation as JSON, "[]" for a plain prompt."""
    prompt_key: str
    text: str
    policy_version: str

    def response(self, response_id: str) -> Response:
        return Response(response_id, Prompt(self.prompt, tuple(tuple(m) for m in json.loads(self.messages_json))),
                        self.text, self.policy_version)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Responses to one prompt, best first (two for a pair), and the events that said so."""

    prompt: Prompt
    responses: tuple[str, ...]
    sources: tuple[str, ...]
    margin: float | None = None

    @property
    def kind(self) -> str:
        return "pair" if len(self.responses) == 2 else "ranking"


@dataclasses.dataclass(frozen=True)
class Demonstration:
    prompt: Prompt
    response: str
    source: str


@dataclasses.dataclass(frozen=True)
class RatingValue:
    """A rating, normalised to [0, 1], of one response."""

    event_id: str
    response_id: str
    prompt_key: str
    value: float
    text: str
    """The rated response's text."""


@dataclasses.dataclass(frozen=True)
class Derived:
    """What one event became."""

    comparisons: tuple[Comparison, ...] = ()
    demonstrations: tuple[Demonstration, ...] = ()
    rating: RatingValue | None = None


KINDS = ("rating", "pairwise", "ranking", "demonstration", "edit")


def kind_of(event: feedback_pb2.FeedbackEvent) -> str:
    kind = event.WhichOneof("kind")
    if kind not in KINDS:
        raise Unusable("the event has no kind (rating, pairwise, ranking, demonstration or edit)")
    return kind


def demonstration_of(event: feedback_pb2.FeedbackEvent) -> Demonstration:
    """A demonstration event as supervised data."""
    demo = event.demonstration
    messages = tuple((m.role, m.content) for m in demo.messages.messages)
    return Demonstration(Prompt("" if messages else demo.prompt, messages), demo.response, event.event_id)


def response_of(served: events_pb2.ServedResponse) -> Response:
    """The stored form of a served response. A plain-prompt response without ``input_prompt`` (recorded before the
    field existed) keeps the formatted prompt as its text."""
    messages = tuple((m.role, m.content) for m in served.messages.messages)
    prompt = Prompt(served.input_prompt or ("" if messages else served.prompt), messages)
    return Response(served.response_id, prompt, served.text, served.policy_version)


def stored_response(served: events_pb2.ServedResponse) -> StoredResponse:
    """:func:`response_of` in its stored form (the same prompt, text and key)."""
    return StoredResponse._make(stored_response_fields(served))


def stored_response_fields(served: events_pb2.ServedResponse) -> tuple[str, str, str, str, str]:
    """:func:`stored_response` as a plain tuple (what crosses a pipe: a tuple pickles at a fourth of a
    NamedTuple's cost)."""
    messages = served.messages.messages
    if messages:
        messages_json = json.dumps([(m.role, m.content) for m in messages])
        text = served.input_prompt
    else:
        messages_json, text = "[]", served.input_prompt or served.prompt
    return (text, messages_json, prompt_key(text, "" if messages_json == "[]" else messages_json), served.text,
            served.policy_version)


def demonstration_row(event: feedback_pb2.FeedbackEvent) -> tuple[str, str, str, str]:
    """:func:`demonstration_of` in its stored form: (prompt text, messages as JSON, response, source event id)."""
    demo = event.demonstration
    messages = demo.messages.messages
    if messages:
        return "", json.dumps([(m.role, m.content) for m in messages]), demo.response, event.event_id
    return demo.prompt, "[]", demo.response, event.event_id


def preference(event: feedback_pb2.FeedbackEvent, kind: str, needed_ids: Sequence[str],
               responses: Sequence) -> tuple[Sequence[str], float | None]:
    """The texts, best first, and the margin of a pairwise preference or a ranking whose responses (in
    ``needed_ids`` order; anything with ``prompt_key`` and ``text``) are given. Raises :class:`Unusable` (the rules of
    :func:`convert`, which uses it)."""
    keys = {r.prompt_key for r in responses}
    what = "pair" if kind == "pairwise" else "ranking"
    if len(keys) != 1:
        raise Unusable(f"the {what}'s responses ({', '.join(needed_ids)}) answer different prompts")
    texts = tuple(r.text for r in responses)
    if kind == "pairwise":
        return texts, STRENGTH_MARGIN.get(event.pairwise.strength)
    if len(set(texts)) < len(texts):
        raise Unusable("the ranking orders responses with the same text")
    return texts, None


def needed_responses(event: feedback_pb2.FeedbackEvent, kind: str | None = None) -> tuple[str, ...]:
    """The response ids an event needs before it can be converted (``kind``: its ``WhichOneof("kind")``, when the
    caller has it; raises :class:`Unusable` when it is none of :data:`KINDS`)."""
    if kind is None or kind not in KINDS:
        kind = kind_of(event)
    if kind == "rating":
        return (event.rating.response_id,)
    if kind == "pairwise":
        return (event.pairwise.chosen_response_id, event.pairwise.rejected_response_id)
    if kind == "ranking":
        return tuple(event.ranking.response_ids)
    if kind == "edit":
        return (event.edit.response_id,)
    return ()


def _rating_value(rating: feedback_pb2.Rating) -> float:
    which = rating.WhichOneof("value")
    if which == "thumb":
        if rating.thumb == feedback_pb2.THUMB_UP:
            return 1.0
        if rating.thumb == feedback_pb2.THUMB_DOWN:
            return 0.0
        raise Unusable("rating.thumb is unspecified")
    if which == "scale":
        scale = rating.scale
        if scale.max <= scale.min or not scale.min <= scale.value <= scale.max:
            raise Unusable(f"rating.scale {scale.value} is not within [{scale.min}, {scale.max}]")
        return (scale.value - scale.min) / (scale.max - scale.min)
    raise Unusable("the rating has no value (thumb or scale)")


def convert(event: feedback_pb2.FeedbackEvent, responses: Mapping[str, Response],
            earlier_ratings: Sequence[RatingValue] = (), needed_ids: Sequence[str] | None = None) -> Derived:
    """What ``event`` becomes, given every response it needs (``needed_responses``, passed as ``needed_ids`` when
    known) and, for a rating, the earlier ratings of responses to the same prompt. Raises :class:`Unusable`."""
    kind = kind_of(event)
    needed = [responses[r] for r in (needed_responses(event) if needed_ids is None else needed_ids)]
    eid = event.event_id
    if kind == "rating":
        response = needed[0]
        mine = RatingValue(eid, response.response_id, response.prompt.key, _rating_value(event.rating), response.text)
        pairs = []
        for other in earlier_ratings:
            if other.response_id == mine.response_id or other.value == mine.value or other.prompt_key != mine.prompt_key:
                continue
            high, low = (mine, other) if mine.value > other.value else (other, mine)
            pairs.append(Comparison(response.prompt, (high.text, low.text), tuple(sorted((mine.event_id, other.event_id)))))
        return Derived(comparisons=tuple(pairs), rating=mine)
    if kind in ("pairwise", "ranking"):
        ids = needed_responses(event) if needed_ids is None else needed_ids
        texts, margin = preference(event, kind, ids, needed)
        return Derived(comparisons=(Comparison(needed[0].prompt, tuple(texts), (eid,), margin),))
    if kind == "demonstration":
        return Derived(demonstrations=(demonstration_of(event),))
    # edit
    original = needed[0]
    edited = event.edit.edited_text
    demonstrations = (Demonstration(original.prompt, edited, eid),)
    if edited.strip() == original.text.strip():
        return Derived(demonstrations=demonstrations)
    return Derived(comparisons=(Comparison(original.prompt, (edited, original.text), (eid,)),),
                   demonstrations=demonstrations)


def heldout(sources: Sequence[str], share: float) -> bool:
    """Whether a comparison from these source events is held out: fixed by a hash of the sorted event ids, so an
    event never moves between training and held-out data whatever else arrives (and a comparison from two rating
    events is held out or not as one)."""
    digest = hashlib.sha256("\x1f".join(sorted(sources)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share
