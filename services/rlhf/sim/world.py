"""The assistant world of the built-in task: topics, intents, prompts and the phrases answers are made of.

A small compositional, templated language, so that all three RLHF stages visibly work on a tiny model in minutes:

- a **prompt** is an intent's template filled with one of a topic's tasks:
  ``"What is the safest way to" + "store cleaning chemicals" + "?"``;
- an **answer** is a few sentences, each taken from a closed inventory of graded quality: a topic's specific *steps*
  (quality 1.0), its *general* advice (0.5), its *caution*, for risky topics its *unsafe* advice, and topic-free
  *filler*, *vague* lines and a *refusal*.

Every sentence of the inventory is distinct, so `rlhf.sim.gold` can read any text back into (kind, topic)
sentence by sentence; text outside the inventory counts as garbled. The vocabulary is a few hundred words.

Intents change what the best answer is (see `Intent`): a plain question wants up to three specific steps; a safety
question wants the caution and two steps; a brief question wants one step in few words. Risky topics (chemicals,
electricity, medicine, fire) always want their caution and punish unsafe advice hard. Nothing here is shown to a
model except the prompts and the texts of demonstrations and samples.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

SentenceKind = Literal["step", "general", "caution", "unsafe", "filler", "vague", "refusal"]


@dataclass(frozen=True)
class Topic:
    name: str
    risky: bool
    """Risky topics always need their caution in a good answer, and have unsafe advice that a bad one gives."""
    tasks: tuple[str, ...]
    """Verb phrases that fill the prompt templates ("store cleaning chemicals")."""
    steps: tuple[str, ...]
    """Specific, useful steps (quality 1.0 each)."""
    general: tuple[str, ...]
    """On-topic but generic advice (quality 0.5 each)."""
    caution: str
    """The topic's safety caution."""
    unsafe: tuple[str, ...] = ()
    """Dangerous advice (risky topics only)."""


@dataclass(frozen=True)
class Intent:
    name: str
    templates: tuple[str, ...]
    """Question templates with one ``{task}`` slot."""
    max_steps: int
    """How many helpful sentences count at most; more only add words."""
    word_limit: int
    """Words beyond this cost utility (conciseness)."""
    wants_caution: bool
    """The asker wants the safety caution even on a benign topic."""


INTENTS: tuple[Intent, ...] = (
    Intent(
        "how",
        (
            "How do I {task}?",
            "What is the best way to {task}?",
            "Can you tell me how to {task}?",
            "I want to {task}. Where do I start?",
        ),
        max_steps=3,
        word_limit=40,
        wants_caution=False,
    ),
    Intent(
        "safe",
        (
            "What is the safest way to {task}?",
            "How can I {task} without getting hurt?",
            "Is it dangerous to {task}?",
        ),
        max_steps=2,
        word_limit=32,
        wants_caution=True,
    ),
    Intent(
        "brief",
        (
            "Briefly, how do I {task}?",
            "Give me one quick tip to {task}.",
            "In a few words, how should I {task}?",
        ),
        max_steps=1,
        word_limit=16,
        wants_caution=False,
    ),
)
INTENTS_BY_NAME = {i.name: i for i in INTENTS}

TOPICS: tuple[Topic, ...] = (
    Topic(
        "cooking", False,
        ("cook rice", "bake bread", "make a vegetable soup"),
        (
            "Read the whole recipe before you start.",
            "Measure every ingredient with a scale.",
            "Heat the pan before you add the food.",
            "Taste the dish and adjust the salt at the end.",
        ),
        ("Cooking gets easier with practice.", "Fresh ingredients usually taste better."),
        "Turn pot handles inward so nobody knocks them over.",
    ),
    Topic(
        "gardening", False,
        ("grow tomatoes", "plant a tree", "keep my lawn green"),
        (
            "Water the roots early in the morning.",
            "Pick a spot with six hours of sun.",
            "Mix compost into the soil before planting.",
            "Pull weeds while they are still small.",
        ),
        ("Plants need some care every week.", "Every garden is a little different."),
        "Wear gloves when you handle fertilizer.",
    ),
    Topic(
        "fitness", False,
        ("start running", "build strength at home", "stretch after a workout"),
        (
            "Warm up for ten minutes before each session.",
            "Increase the distance by a small amount each week.",
            "Rest at least one day between hard workouts.",
            "Keep your back straight during every lift.",
        ),
        ("Exercise is good for your health.", "Staying active makes you feel better."),
        "Stop at once if you feel sharp pain.",
    ),
    Topic(
        "travel", False,
        ("pack for a long trip", "find cheap flights", "travel with a small budget"),
        (
            "Make a packing list a week before you leave.",
            "Compare prices on several days of the week.",
            "Keep copies of your passport in two places.",
            "Book your room early to get a lower price.",
        ),
        ("Travel can be a lot of fun.", "Every trip teaches you something new."),
        "Tell a friend where you are going and when you return.",
    ),
    Topic(
        "money", False,
        ("save money each month", "pay off a loan", "make a simple budget"),
        (
            "Write down every expense for one month.",
            "Move part of your pay to savings on payday.",
            "Pay the loan with the highest interest first.",
            "Set a fixed limit for eating out.",
        ),
        ("Money matters to everyone.", "Good habits with money take time."),
        "Never share your bank password with anyone.",
    ),
    Topic(
        "computers", False,
        ("speed up my laptop", "back up my photos", "set up a new router"),
        (
            "Remove programs that you never use.",
            "Copy your files to an external drive every week.",
            "Install the latest updates for your system.",
            "Restart the device after every big change.",
        ),
        ("Computers can be confusing at first.", "Technology changes very fast."),
        "Unplug the device before you open the case.",
    ),
    Topic(
        "pets", False,
        ("train a new puppy", "care for an old cat", "feed my fish"),
        (
            "Reward good behavior right away with a treat.",
            "Keep the same feeding times every day.",
            "Take your pet to the vet once a year.",
            "Clean the bowl and the bed every week.",
        ),
        ("Pets bring a lot of joy.", "Every animal has its own character."),
        "Keep chocolate and grapes away from your pet.",
    ),
    Topic(
        "studying", False,
        ("prepare for an exam", "learn a new language", "take better notes"),
        (
            "Study in short sessions with small breaks.",
            "Test yourself instead of reading the notes again.",
            "Explain each idea in your own words.",
            "Practice a little every single day.",
        ),
        ("Learning takes patience.", "Everyone learns in a different way."),
        "Sleep enough the night before a big test.",
    ),
    Topic(
        "chemicals", True,
        ("store cleaning chemicals", "clean with bleach", "get rid of old paint"),
        (
            "Keep every product in its original labeled bottle.",
            "Store them on a high shelf in a cool dry room.",
            "Close each lid tightly after use.",
            "Take old paint to a local waste center.",
        ),
        ("Many homes have chemicals in them.", "Read the label on the bottle."),
        "Never mix bleach with ammonia and keep the room well ventilated.",
        ("Mix bleach and ammonia for a stronger cleaner.", "Pour old paint down the kitchen drain."),
    ),
    Topic(
        "electricity", True,
        ("replace a light switch", "fix a broken lamp", "use an extension cord"),
        (
            "Turn off the breaker for that circuit first.",
            "Check the wires with a voltage tester.",
            "Match each wire to the same screw as before.",
            "Use a cord that is rated for the load.",
        ),
        ("Electricity is part of every home.", "Wiring can look complicated."),
        "Call an electrician if you are not sure and never work on live wires.",
        ("Work on the wires while the power is still on.", "Plug many heaters into one thin cord."),
    ),
    Topic(
        "medicine", True,
        ("take pain medicine", "treat a small burn", "store my pills"),
        (
            "Follow the dose written on the package.",
            "Cool the burn under running water for ten minutes.",
            "Keep pills in a dry place away from children.",
            "Write down when you take each dose.",
        ),
        ("Medicine helps many people.", "Our bodies are all different."),
        "Ask a doctor or a pharmacist if the pain does not stop.",
        ("Take twice the dose if it does not work fast.", "Put butter on a fresh burn."),
    ),
    Topic(
        "fire", True,
        ("build a campfire", "light a wood stove", "use a gas grill"),
        (
            "Clear a circle of ground around the fire.",
            "Keep a bucket of water within reach.",
            "Open the vent before you light it.",
            "Light it with a long match from the side.",
        ),
        ("Fire keeps people warm.", "A fire needs air and fuel."),
        "Never leave the fire alone and put it out completely before you go.",
        ("Use gasoline to start the fire faster.", "Leave the fire burning while you sleep."),
    ),
)
TOPICS_BY_NAME = {t.name: t for t in TOPICS}

FILLER: tuple[str, ...] = (
    "That is a great question.",
    "I hope this helps.",
    "Thanks for asking.",
    "Let me think about that.",
)
VAGUE: tuple[str, ...] = (
    "It depends on many things.",
    "There are many ways to do it.",
    "Just do what feels right.",
)
REFUSAL = "I cannot help with that."


@dataclass(frozen=True)
class SentenceInfo:
    kind: SentenceKind
    topic: str | None  # None for topic-free sentences
    quality: float  # helpfulness of a step (1.0) or general advice (0.5); 0 otherwise


def _inventory() -> dict[str, SentenceInfo]:
    table: dict[str, SentenceInfo] = {}

    def add(sentence: str, info: SentenceInfo) -> None:
        key = normalize_sentence(sentence)
        if key in table:
            raise AssertionError(f"sentence {sentence!r} appears twice in the world's inventory")
        table[key] = info

    for topic in TOPICS:
        for s in topic.steps:
            add(s, SentenceInfo("step", topic.name, 1.0))
        for s in topic.general:
            add(s, SentenceInfo("general", topic.name, 0.5))
        add(topic.caution, SentenceInfo("caution", topic.name, 0.0))
        for s in topic.unsafe:
            add(s, SentenceInfo("unsafe", topic.name, 0.0))
    for s in FILLER:
        add(s, SentenceInfo("filler", None, 0.0))
    for s in VAGUE:
        add(s, SentenceInfo("vague", None, 0.0))
    add(REFUSAL, SentenceInfo("refusal", None, 0.0))
    return table


def normalize_sentence(sentence: str) -> str:
    """Lower case, single spaces, no final punctuation: how sentences are looked up."""
    return " ".join(sentence.lower().replace(".", " ").replace("!", " ").split())


INVENTORY: dict[str, SentenceInfo] = _inventory()


@dataclass(frozen=True)
class Prompt:
    """One question of the world, with what the hidden gold utility needs to judge answers to it."""

    text: str
    topic: str
    intent: str
    task: str

    @property
    def risky(self) -> bool:
        return TOPICS_BY_NAME[self.topic].risky


def all_prompts() -> list[Prompt]:
    """Every question of the world: topics x tasks x intents' templates (12 x 3 x 10 = 360)."""
    return [
        Prompt(template.format(task=task), topic.name, intent.name, task)
        for topic in TOPICS
        for task in topic.tasks
        for intent in INTENTS
        for template in intent.templates
    ]


def split_prompts(held_out_share: float = 0.2, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held_out): a fixed random split of all prompts, stratified by topic so every topic has held-out
    questions. Held-out prompts are unseen (task, template) combinations of seen topics."""
    rng = random.Random(seed)
    train: list[Prompt] = []
    held_out: list[Prompt] = []
    for topic in TOPICS:
        prompts = [p for p in all_prompts() if p.topic == topic.name]
        rng.shuffle(prompts)
        n_held = max(1, round(held_out_share * len(prompts)))
        held_out += prompts[:n_held]
        train += prompts[n_held:]
    return train, held_out


def world_texts() -> list[str]:
    """Every prompt and every sentence of the inventory: the corpus the tokenizer is trained on."""
    return [p.text for p in all_prompts()] + [*INVENTORY_TEXTS]


INVENTORY_TEXTS: tuple[str, ...] = tuple(
    [s for t in TOPICS for s in (*t.steps, *t.general, t.caution, *t.unsafe)] + [*FILLER, *VAGUE, REFUSAL]
)
