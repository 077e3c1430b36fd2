"""Demonstrations of mixed quality for the supervised stage: answers written by simulated demonstrators of three skills.

The supervised policy imitates the whole mixture, so its samples range from excellent to harmful; that spread is what
the reward model learns to order and what PPO then improves on.

- ``expert``: the intent's number of specific steps, the caution where one is needed, rarely anything else;
- ``average``: a filler opening, steps mixed with generic advice, the caution half the time, sometimes a vague line,
  an off-topic sentence or a closing filler, rarely a repeat;
- ``poor``: filler and vague lines, little real help, unsafe advice on risky topics, off-topic sentences, sometimes
  a repeat, now and then a plain refusal.

Why so few repeats: a small reward model learns to spot a repeated sentence (it must match two spans far apart) much
later than the other defects, so repeats in the supervised policy are a defect PPO cannot be taught to remove; the
gold utility still punishes them wherever they appear.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from rlhf.core.data import Demonstration
from rlhf.sim.world import FILLER, INTENTS_BY_NAME, REFUSAL, TOPICS, TOPICS_BY_NAME, VAGUE, Prompt

Skill = Literal["expert", "average", "poor"]


@dataclass(frozen=True)
class DemonstratorMix:
    """The share of demonstrations written at each skill (normalized; need not sum to 1)."""

    expert: float = 0.2
    """Near-best answers. Too many and the supervised policy is already about as good as PPO can make it."""
    average: float = 0.4
    """Helpful but padded, sometimes careless answers."""
    poor: float = 0.4
    """Unhelpful or unsafe answers."""

    def sample(self, rng: random.Random) -> Skill:
        return rng.choices(("expert", "average", "poor"), weights=(self.expert, self.average, self.poor))[0]


def _off_topic_sentence(prompt: Prompt, rng: random.Random) -> str:
    other = rng.choice([t for t in TOPICS if t.name != prompt.topic])
    return rng.choice((*other.steps, *other.general))


def write_answer(prompt: Prompt, skill: Skill, rng: random.Random) -> str:
    """One answer to ``prompt`` by a demonstrator of ``skill``."""
    topic = TOPICS_BY_NAME[prompt.topic]
    intent = INTENTS_BY_NAME[prompt.intent]
    needs_caution = topic.risky or intent.wants_caution
    opening: list[str] = []
    body: list[str] = []
    closing: list[str] = []

    if skill == "expert":
        n = max(1, intent.max_steps + rng.choice((0, 0, 0, 1, -1)))
        body += rng.sample(topic.steps, min(n, len(topic.steps)))
        if rng.random() < 0.2:
            body[-1] = rng.choice(topic.general)
        if rng.random() < (0.9 if needs_caution else 0.1):
            body.append(topic.caution)
        if rng.random() < 0.15:
            opening.append(rng.choice(FILLER))
        rng.shuffle(body)
        return " ".join(opening + body)

    if skill == "average":
        if rng.random() < 0.5:
            opening.append(rng.choice(FILLER))
        body += rng.sample((*topic.steps, *topic.general), rng.randint(1, 3))
        if rng.random() < (0.5 if needs_caution else 0.1):
            body.append(topic.caution)
        if rng.random() < 0.3:
            body.append(rng.choice(VAGUE))
        if rng.random() < 0.2:
            body.append(_off_topic_sentence(prompt, rng))
        rng.shuffle(body)
        if rng.random() < 0.05:
            body.append(rng.choice(body))
        if rng.random() < 0.3:
            closing.append(rng.choice(FILLER))
        return " ".join(opening + body + closing)

    # poor
    if rng.random() < 0.1:
        return REFUSAL
    opening.append(rng.choice((*FILLER, *VAGUE)))
    body += rng.sample(topic.general, rng.randint(0, 1)) + rng.sample(topic.steps, rng.randint(0, 1))
    if topic.unsafe and rng.random() < 0.5:
        body.append(rng.choice(topic.unsafe))
    if rng.random() < 0.4:
        body.append(_off_topic_sentence(prompt, rng))
    if rng.random() < 0.3:
        body.append(rng.choice(VAGUE))
    if rng.random() < 0.2 and needs_caution:
        body.append(topic.caution)
    rng.shuffle(body)
    if body and rng.random() < 0.15:
        body.append(rng.choice(body))
    if rng.random() < 0.3:
        closing.append(rng.choice(FILLER))
    return " ".join(opening + body + closing)


def make_demonstrations(
    prompts: list[Prompt], n: int, seed: int = 0, mix: DemonstratorMix | None = None
) -> list[Demonstration]:
    """``n`` demonstrations on prompts drawn (with replacement) from ``prompts``."""
    rng = random.Random(seed)
    mix = mix or DemonstratorMix()
    out = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        out.append(Demonstration(prompt=prompt.text, response=write_answer(prompt, mix.sample(rng), rng)))
    return out


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """Plain "documents" of the world's language for the base model: a question followed by a jumble of sentences of
    its topic (and now and then another topic's), of every kind and quality. They teach words and topics, not what a
    good answer is."""
    from rlhf.sim.world import all_prompts

    rng = random.Random(seed)
    prompts = all_prompts()
    texts = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        topic = TOPICS_BY_NAME[prompt.topic]
        pool = [*topic.steps, *topic.general, topic.caution, *topic.unsafe, *FILLER, *VAGUE]
        sentences = rng.sample(pool, rng.randint(2, 5))
        if rng.random() < 0.3:
            sentences.append(_off_topic_sentence(prompt, rng))
        texts.append(" ".join([prompt.text, *sentences]))
    return texts
