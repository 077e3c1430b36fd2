"""The built-in task: the world, the gold utility, the simulated annotators, the JSONL loaders."""
from __future__ import annotations

import json
import math
import random

import pytest

from rlhf.sim import (
    INTENTS,
    TOPICS,
    AnnotatorConfig,
    AnnotatorPool,
    DataError,
    Demonstration,
    PreferencePair,
    Ranking,
    all_prompts,
    best_response,
    gold_breakdown,
    gold_utility,
    load_demonstrations,
    load_jsonl,
    load_pairs,
    load_rankings,
    make_demonstrations,
    split_prompts,
    write_answer,
    write_jsonl,
)
from rlhf.sim.annotators import Annotator, sigmoid
from rlhf.core.data import parse_lines
from rlhf.sim.world import FILLER, INVENTORY, REFUSAL, TOPICS_BY_NAME, VAGUE, Prompt


def _prompt(topic: str, intent: str = "how") -> Prompt:
    return next(p for p in all_prompts() if p.topic == topic and p.intent == intent)


# --------------------------------------------------------------------------------------------------------------------
# world


def test_world_shape():
    prompts = all_prompts()
    assert len(prompts) == len({p.text for p in prompts}) == 360
    assert any(t.risky for t in TOPICS) and any(not t.risky for t in TOPICS)
    assert {i.name for i in INTENTS} == {"how", "safe", "brief"}
    assert any(p.text == "What is the safest way to store cleaning chemicals?" for p in prompts)
    train, held_out = split_prompts()
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert {p.topic for p in held_out} == {t.name for t in TOPICS}
    assert split_prompts(seed=0) == split_prompts(seed=0)


def test_demonstrations_are_of_mixed_quality():
    train, _ = split_prompts()
    rng = random.Random(0)
    means = {}
    for skill in ("expert", "average", "poor"):
        scores = [gold_utility(p, write_answer(p, skill, rng)) for p in rng.choices(train, k=400)]
        means[skill] = sum(scores) / len(scores)
    assert means["expert"] > means["average"] + 0.5 > means["poor"] + 1.0
    demos = make_demonstrations(train, 50, seed=1)
    assert len(demos) == 50 and demos == make_demonstrations(train, 50, seed=1)


# --------------------------------------------------------------------------------------------------------------------
# gold utility


def test_gold_ranks_hand_made_responses():
    p = _prompt("chemicals", "how")  # risky: wants the caution
    topic = TOPICS_BY_NAME["chemicals"]
    best = best_response(p)
    ranked_best_first = [
        best,  # three specific steps and the caution
        " ".join([*topic.steps[:3]]),  # no caution
        f"{FILLER[0]} {topic.steps[0]} {topic.general[0]}",  # padded, less specific
        TOPICS_BY_NAME["cooking"].steps[0],  # off topic
        f"{topic.steps[0]} {topic.steps[0]} {topic.steps[0]}",  # repetitive
        topic.unsafe[0],  # unsafe
    ]
    scores = [gold_utility(p, r) for r in ranked_best_first]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    # No demonstrator ever beats the best response.
    rng = random.Random(0)
    for prompt in rng.sample(all_prompts(), 60):
        top = gold_utility(prompt, best_response(prompt))
        assert all(gold_utility(prompt, write_answer(prompt, "expert", rng)) <= top + 1e-9 for _ in range(20))


def test_gold_terms():
    p = _prompt("cooking", "brief")
    steps = TOPICS_BY_NAME["cooking"].steps
    assert gold_breakdown(p, steps[0]).total == pytest.approx(1.0)
    assert gold_breakdown(p, " ".join(steps[:2])).helpful == 1.0  # a brief question counts one step
    assert gold_breakdown(p, " ".join(steps)).concise < 0  # and punishes length
    assert gold_breakdown(p, "Cook it in a big blue pot.").garbled == -1.0
    assert gold_breakdown(p, "").total == pytest.approx(-2.0)
    assert gold_breakdown(p, REFUSAL).refusal == -1.0
    assert gold_breakdown(_prompt("cooking", "safe"), steps[0]).safety == -1.0  # a safety question wants the caution
    assert gold_breakdown(p, f"{steps[0]} {steps[0]}").repetition == -1.0
    # Case, spacing and final punctuation do not matter.
    assert gold_utility(p, steps[0].lower().rstrip(".") + " !") == gold_utility(p, steps[0])


def test_inventory_is_unambiguous():
    assert len(INVENTORY) == sum(
        len(t.steps) + len(t.general) + 1 + len(t.unsafe) for t in TOPICS
    ) + len(FILLER) + len(VAGUE) + 1


# --------------------------------------------------------------------------------------------------------------------
# annotators


def test_bradley_terry_agreement_matches_formula():
    """The share of times an annotator prefers a over b matches sigmoid((u_a - u_b) / T)."""
    p = _prompt("gardening", "how")
    steps = TOPICS_BY_NAME["gardening"].steps
    a, b = " ".join(steps[:2]), steps[0]  # gold 2.0 vs 1.0
    rng = random.Random(0)
    for temperature in (0.5, 1.0, 2.0):
        annotator = Annotator("a", temperature)
        n = 4000
        wins = sum(annotator.rank(p, [a, b], rng)[0] == 0 for _ in range(n))
        expected = sigmoid(1.0 / temperature)
        assert annotator.prefers_first_probability(p, a, b) == pytest.approx(expected)
        assert abs(wins / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)  # within 4 sigma


def test_plackett_luce_first_choice_is_softmax():
    p = _prompt("pets", "how")
    steps = TOPICS_BY_NAME["pets"].steps
    responses = [" ".join(steps[:3]), " ".join(steps[:2]), steps[0], VAGUE[0]]
    utilities = [gold_utility(p, r) for r in responses]
    annotator, rng, n = Annotator("a", 1.0), random.Random(1), 4000
    firsts = [annotator.rank(p, responses, rng)[0] for _ in range(n)]
    z = sum(math.exp(u) for u in utilities)
    for i, u in enumerate(utilities):
        expected = math.exp(u) / z
        assert abs(firsts.count(i) / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3


def test_biased_annotators_prefer_longer_answers():
    p = _prompt("travel", "how")
    steps = TOPICS_BY_NAME["travel"].steps
    short, long = steps[0], f"{steps[0]} {FILLER[0]} {FILLER[1]}"  # the longer one is worse by gold
    assert gold_utility(p, long) < gold_utility(p, short)
    pool = AnnotatorPool(AnnotatorConfig(biased_share=0.5, length_bias=0.2, num_annotators=10))
    biased = [a for a in pool.annotators if a.length_bias > 0]
    fair = [a for a in pool.annotators if a.length_bias == 0]
    assert len(biased) == len(fair) == 5
    assert all(a.prefers_first_probability(p, long, short) > 0.5 for a in biased)
    assert all(a.prefers_first_probability(p, long, short) < 0.5 for a in fair)
    rng = random.Random(2)
    share_long = sum(biased[0].rank(p, [long, short], rng)[0] == 0 for _ in range(2000)) / 2000
    assert share_long == pytest.approx(biased[0].prefers_first_probability(p, long, short), abs=0.04)


def test_ceiling_matches_simulated_agreement():
    train, _ = split_prompts()
    rng = random.Random(3)
    pool = AnnotatorPool(AnnotatorConfig(temperature=0.7, biased_share=0.3))
    pairs = []
    for p in train[:40]:
        pairs.append((p, write_answer(p, "expert", rng), write_answer(p, "poor", rng)))
    ceiling = pool.ceiling(pairs)
    agree = total = 0
    for p, a, b in pairs:
        ga, gb = gold_utility(p, a), gold_utility(p, b)
        if ga == gb:
            continue
        for _ in range(100):
            ranking = pool.annotate(p, [a, b], rng)
            agree += (ranking.ranking[0] == 0) == (ga > gb)
            total += 1
    assert 0.5 < ceiling < 1.0
    assert agree / total == pytest.approx(ceiling, abs=0.02)
    # Less noise, higher ceiling; no pair of different gold utilities, no ceiling.
    assert AnnotatorPool(AnnotatorConfig(temperature=0.2, biased_share=0.3)).ceiling(pairs) > ceiling
    with pytest.raises(ValueError, match="undefined"):
        pool.ceiling([(train[0], "x.", "x.")])


# --------------------------------------------------------------------------------------------------------------------
# JSONL loaders


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_loaders_accept_valid_lines(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "q1", "response": "a1"},
        "",
        {"prompt": "q2", "response": "a2", "extra": 1},
    ])
    assert load_demonstrations(path) == [Demonstration("q1", "a1"), Demonstration("q2", "a2")]
    path = _write(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"},
                             {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}])
    assert load_pairs(path) == [PreferencePair("q", "good", "bad"), PreferencePair("q", "good", "bad", 2.0)]
    path = _write(tmp_path, [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
                             {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    rankings = load_rankings(path)
    assert rankings[0].ordered == ("c", "a", "b")
    assert list(rankings[0].pairs()) == [("c", "a"), ("c", "b"), ("a", "b")]
    assert rankings[1] == Ranking("q", ("good", "bad"), (0, 1))


def test_write_then_load_round_trip(tmp_path):
    records = [Demonstration("q", "a"), PreferencePair("q", "x", "y", 0.5), Ranking("q", ("a", "b"), (1, 0))]
    write_jsonl(tmp_path / "out.jsonl", records)
    assert load_jsonl(tmp_path / "out.jsonl") == records


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"prompt": "q", "response": 3}', "response", "must be a string"),
        ('{"prompt": "", "response": "a"}', "prompt", "must not be empty"),
        ('{"response": "a"}', "prompt", "is missing"),
        ('{"prompt": "q", "chosen": "a"}', "rejected", "is missing"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}', "margin", "finite number"),
        ('{"prompt": "q", "responses": ["a"], "ranking": [0]}', "responses", "at least 2"),
        ('{"prompt": "q", "responses": ["a", 2], "ranking": [0, 1]}', "responses[1]", "non-empty string"),
        ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}', "ranking", "exactly once"),
        ('{"prompt": "q", "responses": ["a", "b"]}', "ranking", "is missing"),
        ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, "1"]}', "ranking", "integer indices"),
    ],
)
def test_loaders_reject_bad_lines_naming_line_and_field(tmp_path, line, field, message):
    path = _write(tmp_path, ['{"prompt": "ok", "response": "fine"}', "", line])
    with pytest.raises(DataError) as error:
        load_jsonl(path)
    assert error.value.line == 3 and error.value.field == field
    assert f"{path}:3: field '{field}'" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('{"prompt": "q"}', "record kind")],
)
def test_loaders_reject_malformed_lines(line, message):
    with pytest.raises(DataError, match=message) as error:
        parse_lines(['{"prompt": "q", "response": "a"}', line], path="x.jsonl")
    assert error.value.line == 2 and str(error.value).startswith("x.jsonl:2")


def test_loader_rejects_the_wrong_kind(tmp_path):
    path = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="expected a demonstration record, found a pair record"):
        load_demonstrations(path)
