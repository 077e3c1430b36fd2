"""Simulated annotators: they rank K responses by the hidden gold utility under Bradley–Terry noise, and a share of
them is biased towards longer answers.

An annotator perceives utility u(x) = gold(x) (+ ``length_bias`` * words(x) if biased) and ranks K responses by
sampling a Plackett–Luce order with strengths exp(u / temperature): the best is picked with probability
softmax(u / T), then the best of the rest, and so on (done exactly with the Gumbel trick). For K = 2 this is the
Bradley–Terry model:

    P(annotator prefers a over b) = sigmoid((u(a) - u(b)) / T)

The **temperature** T sets the noise in gold-utility units: two answers one unit apart (one more useful step) are
ordered right with probability sigmoid(1 / T) — 0.88 at the default T = 0.5 — and answers of equal utility at random.

The **accuracy ceiling** is the probability that an annotator drawn from the pool orders a pair of responses as the
gold utility does, averaged over pairs with different gold utilities. A reward model fitted to these annotators'
labels is measured against the same gold order on the same pairs; it can exceed the ceiling (it averages many noisy
labels), and the demo asks for at least 90% of it.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.core.data import Ranking
from rlhf.sim.gold import gold_utility
from rlhf.sim.world import Prompt


@dataclass(frozen=True)
class AnnotatorConfig:
    """The pool of simulated annotators."""

    temperature: float = 0.5
    """Bradley–Terry temperature in gold-utility units: P(a > b) = sigmoid((u_a - u_b) / T). Lower is less noisy."""
    biased_share: float = 0.2
    """Share of annotators biased towards longer answers."""
    length_bias: float = 0.08
    """What a biased annotator adds to an answer's utility per word (0.08: ten more words look 0.8 better)."""
    num_annotators: int = 20
    """Pool size; ``round(biased_share * num_annotators)`` of them are biased."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"AnnotatorConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.biased_share <= 1.0:
            raise ValueError(f"AnnotatorConfig.biased_share must be in [0, 1], got {self.biased_share}")
        if self.num_annotators < 1:
            raise ValueError("AnnotatorConfig.num_annotators must be >= 1")

    @property
    def num_biased(self) -> int:
        return round(self.biased_share * self.num_annotators)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Annotator:
    id: str
    temperature: float
    length_bias: float = 0.0
    """0 for an unbiased annotator."""

    def perceived_utility(self, prompt: Prompt, response: str) -> float:
        return gold_utility(prompt, response) + self.length_bias * len(response.split())

    def rank(self, prompt: Prompt, responses: Sequence[str], rng: random.Random) -> tuple[int, ...]:
        """Indices of ``responses`` best first, a Plackett–Luce sample: sorting u/T + Gumbel noise gives exactly it."""
        keys = []
        for i, response in enumerate(responses):
            gumbel = -math.log(-math.log(max(rng.random(), 1e-300)))
            keys.append((self.perceived_utility(prompt, response) / self.temperature + gumbel, i))
        return tuple(i for _, i in sorted(keys, reverse=True))

    def prefers_first_probability(self, prompt: Prompt, a: str, b: str) -> float:
        """P(this annotator ranks a above b): sigmoid((u(a) - u(b)) / T)."""
        return sigmoid((self.perceived_utility(prompt, a) - self.perceived_utility(prompt, b)) / self.temperature)


class AnnotatorPool:
    """The annotators; each ranking is done by one drawn uniformly at random."""

    def __init__(self, config: AnnotatorConfig | None = None) -> None:
        self.config = config or AnnotatorConfig()
        c = self.config
        self.annotators = [
            Annotator(f"annotator-{i:02d}", c.temperature, c.length_bias if i < c.num_biased else 0.0)
            for i in range(c.num_annotators)
        ]

    def annotate(self, prompt: Prompt, responses: Sequence[str], rng: random.Random) -> Ranking:
        """A ranking of ``responses`` by a random annotator (``Ranking.prompt`` is the prompt's text)."""
        annotator = rng.choice(self.annotators)
        return Ranking(prompt.text, tuple(responses), annotator.rank(prompt, responses, rng), annotator=annotator.id)

    def agreement_probability(self, prompt: Prompt, a: str, b: str) -> float | None:
        """P(a random annotator of the pool orders a and b as the gold utility does); None for a gold tie."""
        gold_a, gold_b = gold_utility(prompt, a), gold_utility(prompt, b)
        if gold_a == gold_b:
            return None
        p_a = sum(ann.prefers_first_probability(prompt, a, b) for ann in self.annotators) / len(self.annotators)
        return p_a if gold_a > gold_b else 1.0 - p_a

    def ceiling(self, pairs: Sequence[tuple[Prompt, str, str]]) -> float:
        """The annotators' accuracy ceiling on ``pairs``: mean agreement with the gold order over non-tied pairs."""
        probs = [p for prompt, a, b in pairs if (p := self.agreement_probability(prompt, a, b)) is not None]
        if not probs:
            raise ValueError("no pair with different gold utilities: the ceiling is undefined")
        return sum(probs) / len(probs)


def ranking_pairs(prompt: Prompt, responses: Sequence[str]) -> list[tuple[Prompt, str, str]]:
    """All C(K, 2) unordered pairs of K responses to one prompt (as (prompt, a, b))."""
    return [(prompt, responses[i], responses[j]) for i in range(len(responses)) for j in range(i + 1, len(responses))]
