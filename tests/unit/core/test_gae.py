"""GAE: the vectorised function equals the plain backward loop, and masked positions count for nothing."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.advantages import compute_gae, compute_gae_reference, discount_matrix


def random_batch(seed: int, batch: int = 6, length: int = 11, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, length, generator=gen, dtype=dtype)
    rewards = torch.randn(batch, length, generator=gen, dtype=dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one full row
    lengths[1] = 1  # one single-token row
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return values, rewards, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.3)])
def test_vectorised_equals_reference_loop(seed, gamma, lam):
    values, rewards, mask = random_batch(seed)
    fast = compute_gae(values, rewards, mask, gamma, lam)
    slow = compute_gae_reference(values, rewards, mask, gamma, lam)
    torch.testing.assert_close(fast.advantages, slow.advantages, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.returns, slow.returns, rtol=1e-10, atol=1e-10)


def test_float32_agrees_with_float64():
    values, rewards, mask = random_batch(7, batch=4, length=64)
    fast = compute_gae(values.float(), rewards.float(), mask, 1.0, 0.95)
    slow = compute_gae_reference(values, rewards, mask, 1.0, 0.95)
    assert fast.advantages.dtype == torch.float32
    torch.testing.assert_close(fast.advantages.double(), slow.advantages, rtol=1e-5, atol=1e-5)


def test_hand_computed_example():
    # One 3-token response, score 1 at the end, gamma = lam = 1: returns are the reward-to-go (1, 1, 1),
    # advantages returns - values; the 4th position is padding.
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    gae = compute_gae(values, rewards, mask, gamma=1.0, lam=1.0)
    assert gae.returns.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    assert gae.advantages.tolist() == [[0.0, -1.0, -2.0, 0.0]]
    # lam = 0: one-step TD errors, r_t + V_{t+1} - V_t, with V = 0 after the last token.
    td = compute_gae(values, rewards, mask, gamma=1.0, lam=0.0)
    assert td.advantages.tolist() == [[1.0, 1.0, -2.0, 0.0]]


def test_positions_after_the_end_contribute_nothing():
    values, rewards, mask = random_batch(3)
    base = compute_gae(values, rewards, mask, 1.0, 0.95)
    noisy_values = torch.where(mask, values, torch.full_like(values, 1e6))
    noisy_rewards = torch.where(mask, rewards, torch.full_like(rewards, -1e6))
    noisy = compute_gae(noisy_values, noisy_rewards, mask, 1.0, 0.95)
    assert torch.equal(base.advantages, noisy.advantages)
    assert torch.equal(base.returns, noisy.returns)
    assert torch.all(base.advantages[~mask] == 0) and torch.all(base.returns[~mask] == 0)


def test_last_token_bootstraps_from_zero():
    values = torch.tensor([[0.5, 0.25, 7.0]])
    rewards = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    gae = compute_gae(values, rewards, mask, gamma=1.0, lam=1.0)
    assert gae.advantages[0, 1].item() == 2.0 - 0.25  # not 2 + V(next) = 2 + 7


def test_non_prefix_mask_is_rejected():
    values = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="prefix mask"):
        compute_gae(values, values, torch.tensor([[1, 0, 1]]), 1.0, 0.95)


def test_discount_matrix():
    d = discount_matrix(3, 0.5, torch.float64, "cpu")
    assert d.tolist() == [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]]
