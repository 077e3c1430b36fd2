"""Each loss against a hand-computed example; reductions; no gradient from masked tokens."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.losses import (
    PairwiseLoss,
    PairwiseRankingLoss,
    PlackettLuceLoss,
    PolicyLoss,
    ValueLoss,
    entropy_from_logits,
    sequence_mean,
    token_mean,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1 and eps 0.2:
    #   max(-1.5, -1.2) = -1.2 ; max(-0.5, -0.8) = -0.5 ; max(0.5, 0.8) = 0.8 ; max(1.5, 1.2) = 1.5
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])
    old = torch.zeros(1, 5)
    logprobs = ratios.log()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = PolicyLoss(clip_eps=0.2)(logprobs, old, advantages, mask)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert out.clipfrac.item() == 1.0
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)) / 4
    assert out.approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage_and_its_gradient():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = PolicyLoss()(logprobs, logprobs.detach(), advantages, mask)
    assert out.loss.item() == pytest.approx(-(1 - 2 + 3 + 0.5 + 0.5) / 5)
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0
    out.loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A / n_tokens; zero where masked.
    expected = torch.where(mask.bool(), -advantages / 5, torch.zeros(()))
    torch.testing.assert_close(logprobs.grad, expected)


def test_value_loss_by_hand():
    old = torch.zeros(1, 3)
    values = torch.tensor([[0.5, -0.1, 4.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # clipped values 0.2, -0.1: squared errors unclipped 0.25, 1.21; clipped 0.64, 1.21 -> max 0.64, 1.21
    out = ValueLoss(clip_eps=0.2)(values, old, returns, mask)
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert out.clipfrac.item() == 0.5
    plain = ValueLoss(clip_eps=None)(values, old, returns, mask)
    assert plain.loss.item() == pytest.approx(0.5 * (0.25 + 1.21) / 2)


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(7)))
    logits = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    peaked = torch.tensor([[[1000.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_pairwise_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    out = PairwiseLoss()(chosen, rejected)
    assert out.loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2)
    assert out.accuracy.item() == 0.5
    with_margin = PairwiseLoss()(chosen, rejected, margin=torch.tensor([0.0, 0.5]))
    assert with_margin.loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(-1.5)) / 2)


def test_pairwise_ranking_loss_by_hand():
    # Ranking 1 (K = 3, best first) has rewards 3, 1, 2: pairs (3 > 1), (3 > 2), (1 > 2).
    # Ranking 2 (K = 2, padded) has rewards 0.5, 0: one pair.  Each ranking counts once.
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.0, 99.0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    first = -(log_sigmoid(2.0) + log_sigmoid(1.0) + log_sigmoid(-1.0)) / 3
    second = -log_sigmoid(0.5)
    out = PairwiseRankingLoss()(rewards, valid)
    assert out.loss.item() == pytest.approx((first + second) / 2)
    assert out.accuracy.item() == pytest.approx(3 / 4)


def test_pairwise_ranking_loss_weighs_each_ranking_as_one_unit():
    loss = PairwiseRankingLoss()
    long = torch.tensor([[4.0, 3.0, 1.0, 2.0]])
    short = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    both = loss(torch.cat([long, short]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])).loss
    alone = (loss(long).loss + loss(short[:, :2]).loss) / 2
    assert both.item() == pytest.approx(alone.item())
    # For K = 2 it is the pairwise (Bradley-Terry) loss.
    pair = torch.tensor([[1.3, -0.2], [0.1, 0.4]])
    assert loss(pair).loss.item() == pytest.approx(PairwiseLoss()(pair[:, 0], pair[:, 1]).loss.item())


def test_plackett_luce_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = -((3.0 - lse(3.0, 1.0, 2.0)) + (1.0 - lse(1.0, 2.0)))
    assert PlackettLuceLoss()(rewards).loss.item() == pytest.approx(expected)
    pair = torch.tensor([[1.3, -0.2]])
    assert PlackettLuceLoss()(pair).loss.item() == pytest.approx(-log_sigmoid(1.5))


def test_plackett_luce_with_padding_has_finite_gradients():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.0, 7.0]], requires_grad=True)
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = PlackettLuceLoss()(rewards, valid)
    first = -((3.0 - math.log(math.exp(3) + math.exp(1) + math.exp(2))) + (1.0 - math.log(math.exp(1) + math.exp(2))))
    expected = (first - log_sigmoid(0.5)) / 2
    assert out.loss.item() == pytest.approx(expected)
    out.loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2] == 0


def test_ranking_mask_must_be_a_prefix():
    with pytest.raises(ValueError, match="first K_n"):
        PairwiseRankingLoss()(torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="at least 2"):
        PlackettLuceLoss()(torch.zeros(1, 3), torch.tensor([[1, 0, 0]]))


# --- reductions ------------------------------------------------------------------------------------------------------


def test_token_and_sequence_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert token_mean(values, mask).item() == pytest.approx(16 / 4)
    assert sequence_mean(values, mask).item() == pytest.approx((2 + 10) / 2)


def test_token_and_sequence_mean_agree_when_lengths_are_equal():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 9, generator=gen)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[:, :6] = True  # every response 6 tokens long
    torch.testing.assert_close(token_mean(values, mask), sequence_mean(values, mask))


def test_sharded_reductions_recombine_to_the_global_one():
    # token_mean: shards weighted by their token counts; sequence_mean: equal-sized shards averaged.
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(8, 7, generator=gen)
    mask = torch.arange(7)[None, :] < torch.randint(1, 8, (8, 1), generator=gen)
    shards = [(values[i : i + 2], mask[i : i + 2]) for i in range(0, 8, 2)]
    tokens = [m.sum() for _, m in shards]
    recombined = sum(token_mean(v, m) * n for (v, m), n in zip(shards, tokens)) / sum(tokens)
    torch.testing.assert_close(recombined, token_mean(values, mask))
    recombined_seq = sum(sequence_mean(v, m) for v, m in shards) / len(shards)
    torch.testing.assert_close(recombined_seq, sequence_mean(values, mask))


@pytest.mark.parametrize("reduction", [token_mean, sequence_mean])
def test_no_gradient_from_masked_tokens(reduction):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=gen, requires_grad=True)
    values = torch.randn(3, 5, generator=gen, requires_grad=True)
    old_logprobs = torch.randn(3, 5, generator=gen)
    old_values = torch.randn(3, 5, generator=gen)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    advantages = torch.randn(3, 5, generator=gen)
    loss = (
        PolicyLoss(0.2, reduction)(logprobs, old_logprobs, advantages, mask).loss
        + ValueLoss(0.2, reduction)(values, old_values, advantages, mask).loss
        - 0.01 * reduction(entropy_from_logits(logits), mask)
    )
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0) and torch.all(values.grad[~mask] == 0)
    assert logits.grad[mask].abs().sum() > 0
