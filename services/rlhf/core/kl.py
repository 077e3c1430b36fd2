"""Per-token KL estimators and the KL coefficient (beta) controllers.

The estimators approximate KL(pi || pi_ref) from tokens sampled from pi, one number per token, from the two
log-probabilities of that token only (no sum over the vocabulary).  With log r = log pi_ref(x) - log pi(x):

    k1 = -log r                      unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2               biased (low for close distributions), low variance, >= 0
    k3 = (r - 1) - log r             unbiased, low variance, >= 0 (since log r <= r - 1)

Source: John Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "KLEstimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "KLController",
    "FixedKLController",
    "AdaptiveKLController",
]

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, T) log pi - log pi_ref."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, T) (log pi_ref - log pi)^2 / 2."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, T) (r - 1) - log r with r = pi_ref / pi.  ``expm1`` keeps it accurate (and >= 0) when r is near 1."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """(B, T) per-token KL estimate by name; see the module docstring for the choices."""
    try:
        fn = _ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; choose one of {sorted(_ESTIMATORS)} "
            "(see http://joschu.net/blog/kl-approx.html)"
        ) from None
    return fn(logprobs, ref_logprobs)


class KLController:
    """Holds beta, the weight of the per-token KL penalty in the reward; ``update`` is called once per PPO step."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(KLController):
    """Beta steered towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593, section 2.2):

        e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta  *= 1 + K_beta * e_t,    K_beta = n_steps / horizon

    KL above the target raises beta (a stronger pull back to the reference), below lowers it.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=} {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta given the mean KL (per sequence) of the batch just seen and its number of samples."""
        if not math.isfinite(current_kl):
            return self.value
        proportional_error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
