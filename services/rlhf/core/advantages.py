"""Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

For a response of n tokens (an episode that ends after its last token, so the value after it is 0):

    delta_t = r_t + gamma * V_{t+1} - V_t                 (V_n = 0)
    A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}
    R_t     = A_t + V_t                                   (the value target, "returns")

``compute_gae`` evaluates the sum for the whole batch at once as a matrix product with the discount matrix
D[j, t] = (gamma * lam)^(j - t) for j >= t, so no Python loop runs over time; ``compute_gae_reference`` is the plain
backward loop that the tests hold it to.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["GAE", "compute_gae", "compute_gae_reference", "discount_matrix"]


class GAE(NamedTuple):
    advantages: torch.Tensor  # (B, T) A_t, 0 at masked positions
    returns: torch.Tensor  # (B, T) A_t + V_t, 0 at masked positions


def discount_matrix(length: int, factor: float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """(T, T) upper-triangular-in-time matrix D with D[j, t] = factor^(j - t) for j >= t, else 0."""
    idx = torch.arange(length, device=device)
    lag = idx[:, None] - idx[None, :]  # (T, T) j - t
    powers = torch.pow(torch.tensor(factor, dtype=torch.float64, device=device), lag.clamp(min=0).to(torch.float64))
    return torch.where(lag >= 0, powers, torch.zeros((), dtype=torch.float64, device=device)).to(dtype)


def _check_prefix_mask(action_mask: torch.Tensor) -> None:
    if action_mask.shape[1] > 1 and (action_mask[:, 1:].long() > action_mask[:, :-1].long()).any():
        raise ValueError(
            "action_mask must be a prefix mask per row (1s, then 0s after the response ended); "
            "build it with rlhf.core.masking.response_mask"
        )


def compute_gae(
    values: torch.Tensor,  # (B, T) V(s_t), the critic's value before token t
    rewards: torch.Tensor,  # (B, T) r_t
    action_mask: torch.Tensor,  # (B, T) 1 for response tokens, 0 after the response ended
    gamma: float,
    lam: float,
) -> GAE:
    """GAE(gamma, lam) advantages and returns for a batch of responses.  All tensors (B, T).

    Positions where ``action_mask`` is 0 (after a row's response ended) contribute nothing: their values and rewards are
    ignored, and their advantages and returns are 0.  The value after a row's last token is 0 (the episode ends
    there; no bootstrapping from a truncated continuation).  Nothing here carries gradient.
    """
    _check_prefix_mask(action_mask)
    compute_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    mask = action_mask.to(compute_dtype)
    values = values.detach().to(compute_dtype) * mask  # (B, T)
    rewards = rewards.detach().to(compute_dtype) * mask  # (B, T)
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # (B, T) V_{t+1}; 0 after the last token
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    discounts = discount_matrix(values.shape[1], gamma * lam, compute_dtype, values.device)  # (T, T)
    advantages = (deltas @ discounts) * mask  # (B, T)
    returns = (advantages + values) * mask  # (B, T)
    return GAE(advantages.to(rewards.dtype), returns.to(rewards.dtype))


def compute_gae_reference(
    values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float, lam: float
) -> GAE:
    """The textbook backward recursion, one row and one step at a time.  Slow; for tests."""
    advantages = torch.zeros_like(rewards, dtype=torch.float64)
    batch, length = rewards.shape
    for b in range(batch):
        n = int(action_mask[b].sum())  # a prefix mask: the response is positions 0 .. n-1
        last_gae = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last_gae = delta + gamma * lam * last_gae
            advantages[b, t] = last_gae
    mask = action_mask.to(torch.float64)
    returns = (advantages + values.to(torch.float64)) * mask
    return GAE(advantages.to(rewards.dtype), returns.to(rewards.dtype))
