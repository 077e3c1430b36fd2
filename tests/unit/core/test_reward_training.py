"""Reward-model training: rankings used whole, margins, a tiny run that changes every parameter and lowers the loss."""
from __future__ import annotations

import random

import pytest
import torch

from rlhf.core.models import ModelSize, build_causal_lm, build_reward_model
from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig, pair_accuracy, ranking_accuracy
from rlhf.sim import PreferencePair, Ranking, split_prompts, world_texts, write_answer
from rlhf.sim.gold import gold_utility
from rlhf.core.tokenizer import train_tokenizer

MICRO = ModelSize(n_layer=1, n_embd=32, n_head=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_texts())


def _gold_rankings(n: int, k: int, seed: int = 0) -> list[Ranking]:
    """Rankings of an expert, an average and a poor answer (and more), ordered by the gold utility (no noise)."""
    train, _ = split_prompts()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.choice(train)
        responses = [write_answer(p, skill, rng) for skill in ("expert", "average", "poor", "expert")[:k]]
        order = sorted(range(k), key=lambda i: -gold_utility(p, responses[i]))
        out.append(Ranking(p.text, tuple(responses), tuple(order)))
    return out


@pytest.mark.parametrize("loss", ["pairwise", "plackett_luce"])
def test_tiny_run_changes_every_parameter_and_lowers_loss(tokenizer, loss):
    torch.manual_seed(0)
    rm = build_reward_model(build_causal_lm(tokenizer, MICRO), tokenizer)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    rankings = _gold_rankings(48, 3)
    config = RewardTrainingConfig(loss=loss, num_epochs=6, batch_size=8, learning_rate=3e-3)
    trainer = RewardTrainer(rm, config)
    with torch.no_grad():
        initial_loss = trainer.loss(rankings)[0].item()
    result = trainer.train(rankings, progress=False)
    assert len(result.losses) == config.num_steps(len(rankings)) == 36
    unchanged = [n for n, p in rm.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    with torch.no_grad():
        final_loss = trainer.loss(rankings)[0].item()
    assert final_loss < 0.7 * initial_loss
    assert ranking_accuracy(rm, rankings) > 0.75


def test_a_ranking_is_one_unit_and_pairs_take_their_margin(tokenizer):
    rm = build_reward_model(build_causal_lm(tokenizer, MICRO), tokenizer)
    with torch.no_grad():
        rm.model.score.weight.normal_()
    trainer = RewardTrainer(rm, RewardTrainingConfig())
    ranking = _gold_rankings(1, 3)[0]
    pairs = [Ranking(ranking.prompt, (a, b), (0, 1)) for a, b in ranking.pairs()]
    with torch.no_grad():
        whole, _ = trainer.loss([ranking])
        split, _ = trainer.loss(pairs)
        # One ranking of 3 = the mean of its 3 pairs.
        assert whole.item() == pytest.approx(split.item(), rel=1e-5)
        a, b = pairs[0].responses
        plain, _ = trainer.loss([PreferencePair(ranking.prompt, a, b).as_ranking()])
        with_margin, _ = trainer.loss([PreferencePair(ranking.prompt, a, b, margin=1.0).as_ranking()])
        assert with_margin.item() > plain.item()  # asking for a gap of 1 costs more
        no_margin, _ = RewardTrainer(rm, RewardTrainingConfig(margin_scale=0.0)).loss(
            [PreferencePair(ranking.prompt, a, b, margin=1.0).as_ranking()]
        )
        assert no_margin.item() == pytest.approx(plain.item())


def test_mixed_sizes_in_one_batch(tokenizer):
    rm = build_reward_model(build_causal_lm(tokenizer, MICRO), tokenizer)
    rankings = _gold_rankings(2, 3) + [_gold_rankings(1, 2, seed=1)[0]]
    loss, accuracy = RewardTrainer(rm, RewardTrainingConfig()).loss(rankings)
    assert loss.item() == pytest.approx(0.6931, abs=1e-3)  # zero head: every reward 0, log 2 per pair
    assert 0.0 <= accuracy <= 1.0


def test_pair_accuracy(tokenizer):
    rm = build_reward_model(build_causal_lm(tokenizer, MICRO), tokenizer)
    with pytest.raises(ValueError, match="no pairs"):
        pair_accuracy(rm, [], [], [])
