"""Losses of PPO and of reward-model training, one small unit each.

Hyperparameters go to the constructor, tensors to ``forward``; each loss returns a small named record.  How per-token
terms become one number is a separate choice, a *reduction* (``token_mean`` or ``sequence_mean``), passed in.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.core.masking import masked_mean, masked_sum

__all__ = [
    "REDUCTIONS",
    "PairwiseLoss",
    "PairwiseLossOutput",
    "PairwiseRankingLoss",
    "PlackettLuceLoss",
    "PolicyLoss",
    "PolicyLossOutput",
    "RankingLossOutput",
    "Reduction",
    "TruncatedImportanceWeights",
    "ValueLoss",
    "ValueLossOutput",
    "entropy_from_logits",
    "sequence_mean",
    "token_mean",
    "truncated_importance_weights",
]

# (B, T) per-token values, (B, T) mask -> () scalar
Reduction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every response token of the batch weighs the same: long responses count more."""
    return masked_mean(values, mask)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens within each response, then over responses: every response weighs the same."""
    per_sequence = masked_mean(values, mask, dim=-1)  # (B,)
    return per_sequence.mean()


REDUCTIONS: dict[str, Reduction] = {"token_mean": token_mean, "sequence_mean": sequence_mean}


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # () the clipped surrogate, to minimise
    clipfrac: torch.Tensor  # () detached; share of tokens whose ratio left [1 - eps, 1 + eps]
    approx_kl: torch.Tensor  # () detached; k3 estimate of KL(pi_old || pi_new) per token


class PolicyLoss(nn.Module):
    """PPO's clipped surrogate objective (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7), negated:

        L = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ],   ratio = pi(a|s) / pi_old(a|s)
    """

    def __init__(self, clip_eps: float = 0.2, reduction: Reduction = token_mean):
        super().__init__()
        self.clip_eps = clip_eps
        self.reduction = reduction

    def forward(
        self,
        logprobs: torch.Tensor,  # (B, T) log pi(a_t|s_t) under the current parameters (with grad)
        old_logprobs: torch.Tensor,  # (B, T) log pi_old(a_t|s_t) from the rollout
        advantages: torch.Tensor,  # (B, T)
        action_mask: torch.Tensor,  # (B, T) 1 for response tokens
        weights: torch.Tensor | None = None,  # (B, T) detached per-token weights (importance weights), or None
    ) -> PolicyLossOutput:
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - self.clip_eps, 1.0 + self.clip_eps)
        per_token = torch.maximum(unclipped, clipped)
        if weights is not None:
            per_token = per_token * weights
        loss = self.reduction(per_token, action_mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1.0).abs() > self.clip_eps).to(ratio.dtype), action_mask)
            # http://joschu.net/blog/kl-approx.html: k3 with r = pi_new / pi_old under samples of pi_old.
            approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, action_mask)
        return PolicyLossOutput(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


@dataclass(frozen=True)
class TruncatedImportanceWeights:
    weights: torch.Tensor  # (B, T) min(pi_old / pi_behaviour, cap), 0 where masked; detached
    clipfrac: torch.Tensor  # () share of response tokens whose weight was capped
    mean_ratio: torch.Tensor  # () mean uncapped ratio over response tokens


def truncated_importance_weights(
    logprobs: torch.Tensor,  # (B, T) log pi_old(a_t|s_t): the learner's policy before this update
    behaviour_logprobs: torch.Tensor,  # (B, T) log mu(a_t|s_t): the (older) policy the rollout was sampled from
    action_mask: torch.Tensor,  # (B, T)
    cap: float,
) -> TruncatedImportanceWeights:
    """Truncated importance sampling of a rollout sampled from a stale policy mu (Espeholt et al. 2018's truncated
    weights; the "TIS" rollout correction of veRL and TRL): the PPO loss of each token is weighted by
    min(pi_old / mu, cap), detached.  The PPO ratio stays pi / pi_old, so clipping keeps bounding the step from the
    learner's own policy while the weight corrects for the lag between the rollout and it; the cap bounds the
    variance that a large lag would add."""
    with torch.no_grad():
        mask = action_mask.bool()
        ratio = torch.exp((logprobs - behaviour_logprobs).float())
        weights = torch.where(mask, ratio.clamp(max=cap), torch.zeros((), device=ratio.device))
        clipfrac = masked_mean((ratio > cap).float(), mask)
        mean_ratio = masked_mean(ratio, mask)
    return TruncatedImportanceWeights(weights=weights, clipfrac=clipfrac, mean_ratio=mean_ratio)


@dataclass(frozen=True)
class ValueLossOutput:
    loss: torch.Tensor  # ()
    clipfrac: torch.Tensor  # () detached; share of tokens where the clipped error was the larger one


class ValueLoss(nn.Module):
    """Clipped value loss (as in OpenAI baselines' PPO2):

        L = 0.5 * E[ max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) ]

    With ``clip_eps=None`` it is the plain 0.5 * E[(V - R)^2].
    """

    def __init__(self, clip_eps: float | None = 0.2, reduction: Reduction = token_mean):
        super().__init__()
        self.clip_eps = clip_eps
        self.reduction = reduction

    def forward(
        self,
        values: torch.Tensor,  # (B, T) V(s_t) under the current parameters (with grad)
        old_values: torch.Tensor,  # (B, T) V_old(s_t) from the rollout
        returns: torch.Tensor,  # (B, T) value targets
        action_mask: torch.Tensor,  # (B, T)
    ) -> ValueLossOutput:
        unclipped = (values - returns) ** 2
        if self.clip_eps is None:
            loss = 0.5 * self.reduction(unclipped, action_mask)
            return ValueLossOutput(loss=loss, clipfrac=torch.zeros((), device=values.device))
        values_clipped = old_values + torch.clamp(values - old_values, -self.clip_eps, self.clip_eps)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * self.reduction(torch.maximum(unclipped, clipped), action_mask)
        with torch.no_grad():
            clipfrac = masked_mean((clipped > unclipped).to(values.dtype), action_mask)
        return ValueLossOutput(loss=loss, clipfrac=clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) entropy of softmax(logits): logsumexp(z) - sum_v p_v z_v.  Reduce it with a mask."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


@dataclass(frozen=True)
class PairwiseLossOutput:
    loss: torch.Tensor  # () mean over pairs
    accuracy: torch.Tensor  # () detached; share of pairs with r_chosen > r_rejected


class PairwiseLoss(nn.Module):
    """Bradley–Terry preference loss: -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs.

    The optional per-pair ``margin`` (Llama 2, https://arxiv.org/abs/2307.09288, eq. 2) asks for a larger gap where the
    annotator's preference was stronger.
    """

    def forward(
        self,
        chosen_rewards: torch.Tensor,  # (N,)
        rejected_rewards: torch.Tensor,  # (N,)
        margin: torch.Tensor | None = None,  # (N,) or None
    ) -> PairwiseLossOutput:
        diff = chosen_rewards - rejected_rewards
        if margin is not None:
            diff = diff - margin
        loss = -F.logsigmoid(diff).mean()
        with torch.no_grad():
            accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
        return PairwiseLossOutput(loss=loss, accuracy=accuracy)


@dataclass(frozen=True)
class RankingLossOutput:
    loss: torch.Tensor  # () mean over rankings; each ranking counts once
    accuracy: torch.Tensor  # () detached; share of the rankings' ordered pairs that the rewards order correctly


def _ranking_mask(rewards: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("ranking mask must mark the first K_n entries of each row (best to worst, then padding)")
    if (valid.sum(dim=1) < 2).any():
        raise ValueError("every ranking needs at least 2 ranked responses")
    return valid


def _ordered_pairs(valid: torch.Tensor) -> torch.Tensor:
    """(N, K) valid -> (N, K, K): True where i is ranked above j and both are real."""
    k = valid.shape[1]
    better = torch.ones(k, k, dtype=torch.bool, device=valid.device).triu(diagonal=1)  # (K, K) i < j
    return better[None] & valid[:, :, None] & valid[:, None, :]


def _pair_accuracy(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    pairs = _ordered_pairs(valid)
    correct = (rewards[:, :, None] > rewards[:, None, :]).to(rewards.dtype)  # (N, K, K)
    return masked_sum(correct, pairs) / pairs.sum()


class PairwiseRankingLoss(nn.Module):
    """InstructGPT's K-wise loss (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1): every one of a ranking's
    C(K, 2) ordered pairs is a Bradley–Terry comparison, and the pairs of one ranking are averaged first, so that a
    ranking is one unit (its pairs are correlated; counting each as a sample overfits, as the paper reports).

        loss = -mean_n [ 1 / C(K_n, 2) * sum_{i < j < K_n} log sigmoid(r_{n,i} - r_{n,j}) ]
    """

    def forward(
        self,
        rewards: torch.Tensor,  # (N, K) rewards of each ranking's responses, best first
        valid: torch.Tensor | None = None,  # (N, K) which entries are real, for rankings shorter than K
    ) -> RankingLossOutput:
        valid = _ranking_mask(rewards, valid)
        diff = rewards[:, :, None] - rewards[:, None, :]  # (N, K, K) r_i - r_j
        pairs = _ordered_pairs(valid)  # (N, K, K)
        per_ranking = -masked_sum(F.logsigmoid(diff), pairs, dim=(1, 2)) / pairs.sum(dim=(1, 2))  # (N,)
        with torch.no_grad():
            accuracy = _pair_accuracy(rewards, valid)
        return RankingLossOutput(loss=per_ranking.mean(), accuracy=accuracy)


class PlackettLuceLoss(nn.Module):
    """Negative log-likelihood of the whole ranking under the Plackett–Luce model (the best is chosen from all,
    the second from the rest, ...):

        -log P(ranking) = -sum_{i < K_n - 1} [ r_i - logsumexp(r_i, ..., r_{K_n - 1}) ]

    averaged over rankings.  For K = 2 it is the Bradley–Terry loss.
    """

    def forward(
        self,
        rewards: torch.Tensor,  # (N, K) best first
        valid: torch.Tensor | None = None,  # (N, K)
    ) -> RankingLossOutput:
        valid = _ranking_mask(rewards, valid)
        # The most negative finite number, not -inf: exp() of it is 0 all the same, and the gradient stays finite.
        masked = rewards.masked_fill(~valid, torch.finfo(rewards.dtype).min)
        # (N, K) logsumexp over positions i..K-1: a reversed cumulative logsumexp.
        tail_lse = torch.logcumsumexp(masked.flip(dims=(1,)), dim=1).flip(dims=(1,))
        last = valid.long().sum(dim=1, keepdim=True) - 1  # (N, 1)
        positions = torch.arange(rewards.shape[1], device=rewards.device)[None, :]
        terms = valid & (positions < last)  # the final choice (from one item) has probability 1
        nll = -masked_sum(masked - tail_lse, terms, dim=1)  # (N,)
        with torch.no_grad():
            accuracy = _pair_accuracy(rewards, valid)
        return RankingLossOutput(loss=nll.mean(), accuracy=accuracy)
