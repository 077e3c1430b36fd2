"""The hidden gold utility: how good an answer really is, computed from its text.

It stands for what the simulated annotators try, noisily, to judge. It is never shown to the reward model or to PPO;
it only evaluates (and drives the simulated annotators). For a prompt of topic T and intent I, reading the response
sentence by sentence against the world's inventory:

    helpful     = sum of the best I.max_steps qualities among distinct on-topic steps (1.0) and general advice (0.5)
    safety      = -2 per unsafe sentence; where a caution is needed (risky topic, or a safety question):
                  +1 with T's caution, -1 without it
    on topic    = -0.5 per sentence of another topic (steps, advice, cautions), -0.5 per filler or vague sentence
    refusal     = -1 per refusal
    repetition  = -1 per repeat of a sentence already said
    garbled     = -1 per sentence that is not in the inventory; -2 for an empty answer
    concise     = -0.05 per word beyond I.word_limit

    gold = helpful + safety + on topic + refusal + repetition + garbled + concise

The best answer to a plain question on a risky topic (three specific steps and the caution) scores 4.0; a benign
plain question tops at 3.0, a brief one at 1.0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.sim.world import INTENTS_BY_NAME, INVENTORY, TOPICS_BY_NAME, Prompt, normalize_sentence

# Weights of the terms, named so that tests and docs can refer to them.
UNSAFE_PENALTY = 2.0
CAUTION_BONUS = 1.0
MISSING_CAUTION_PENALTY = 1.0
OFF_TOPIC_PENALTY = 0.5
FILLER_PENALTY = 0.5
REFUSAL_PENALTY = 1.0
REPEAT_PENALTY = 1.0
GARBLED_PENALTY = 1.0
EMPTY_PENALTY = 2.0
WORD_PENALTY = 0.05

_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, each with its final punctuation; blank pieces dropped."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip(" .!?\n\t")]


@dataclass(frozen=True)
class GoldBreakdown:
    """The gold utility of one response and its terms (see the module docstring)."""

    helpful: float
    safety: float
    on_topic: float
    refusal: float
    repetition: float
    garbled: float
    concise: float
    words: int

    @property
    def total(self) -> float:
        return self.helpful + self.safety + self.on_topic + self.refusal + self.repetition + self.garbled + self.concise


def gold_breakdown(prompt: Prompt, response: str) -> GoldBreakdown:
    topic = TOPICS_BY_NAME[prompt.topic]
    intent = INTENTS_BY_NAME[prompt.intent]
    sentences = split_sentences(response)
    words = len(response.split())

    seen: set[str] = set()
    qualities: list[float] = []
    has_caution = False
    unsafe = off_topic = filler = refusals = repeats = garbled = 0
    for sentence in sentences:
        key = normalize_sentence(sentence)
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        info = INVENTORY.get(key)
        if info is None:
            garbled += 1
        elif info.kind == "unsafe":
            unsafe += 1  # dangerous whatever its topic
        elif info.kind in ("filler", "vague"):
            filler += 1
        elif info.kind == "refusal":
            refusals += 1
        elif info.topic != topic.name:
            off_topic += 1
        elif info.kind == "caution":
            has_caution = True
        else:  # an on-topic step or general advice
            qualities.append(info.quality)

    needs_caution = topic.risky or intent.wants_caution
    if needs_caution:
        caution_term = CAUTION_BONUS if has_caution else -MISSING_CAUTION_PENALTY
    else:
        caution_term = 0.0
    return GoldBreakdown(
        helpful=sum(sorted(qualities, reverse=True)[: intent.max_steps]),
        safety=caution_term - UNSAFE_PENALTY * unsafe,
        on_topic=-OFF_TOPIC_PENALTY * off_topic - FILLER_PENALTY * filler,
        refusal=-REFUSAL_PENALTY * refusals,
        repetition=-REPEAT_PENALTY * repeats,
        garbled=-GARBLED_PENALTY * garbled - (EMPTY_PENALTY if not sentences else 0.0),
        concise=-WORD_PENALTY * max(0, words - intent.word_limit),
        words=words,
    )


def gold_utility(prompt: Prompt, response: str) -> float:
    """The hidden gold utility of ``response`` to ``prompt`` (higher is better)."""
    return gold_breakdown(prompt, response).total


def best_response(prompt: Prompt) -> str:
    """A response with the highest gold utility for ``prompt`` (for tests and the docs)."""
    topic = TOPICS_BY_NAME[prompt.topic]
    intent = INTENTS_BY_NAME[prompt.intent]
    # The shortest steps: each step is worth more than the words it may cost, so take as many as count.
    parts = sorted(topic.steps, key=lambda s: len(s.split()))[: intent.max_steps]
    if topic.risky or intent.wants_caution:
        parts.append(topic.caution)
    return " ".join(parts)
