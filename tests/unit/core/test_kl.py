"""KL estimators (http://joschu.net/blog/kl-approx.html) and the beta controllers."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3


def test_k2_k3_are_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=gen) * 5
    ref = torch.randn(1000, generator=gen) * 5
    assert torch.all(kl_k3(logp, ref) >= 0)
    assert torch.all(kl_k2(logp, ref) >= 0)
    assert torch.all(kl_k3(logp, logp) == 0) and torch.all(kl_k1(logp, logp) == 0)
    tiny = torch.tensor([1e-9, -1e-9, 1e-12])
    assert torch.all(kl_k3(tiny, torch.zeros(3)) >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased(seed):
    # Tokens sampled from pi; E_pi[k1] = E_pi[k3] = KL(pi || pi_ref) exactly.  Tolerance: 5 standard errors.
    gen = torch.Generator().manual_seed(seed)
    logits_p = torch.randn(6, generator=gen, dtype=torch.float64)
    logits_q = torch.randn(6, generator=gen, dtype=torch.float64)
    logp, logq = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    exact = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    for name in ("k1", "k3"):
        est = kl_estimate(logp[samples], logq[samples], name)
        stderr = est.std().item() / len(est) ** 0.5
        assert abs(est.mean().item() - exact) < 5 * stderr + 1e-12, name
    # k2 is biased in general (it equals the KL only to second order).
    k2 = kl_estimate(logp[samples], logq[samples], "k2").mean().item()
    assert k2 != pytest.approx(exact, rel=1e-3)


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="k1.*k3.*kl-approx"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_fixed_controller_keeps_beta():
    ctl = FixedKLController(0.1)
    assert ctl.update(100.0, 64) == 0.1 and ctl.value == 0.1


def test_adaptive_controller_moves_beta_towards_the_target():
    up = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    up.update(current_kl=7.0, n_steps=100)  # above target: raise beta
    assert up.value == pytest.approx(0.1 * (1 + (7 / 6 - 1) * 100 / 1000))
    down = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    down.update(current_kl=5.0, n_steps=100)  # below target: lower beta
    assert down.value < 0.1


def test_adaptive_controller_clips_the_error_at_0_2():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=1000.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=0.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))


def test_adaptive_controller_converges_on_a_kl_that_follows_beta():
    # A toy world where the policy drifts to KL = 1 / beta: beta must settle where KL = target.
    ctl = AdaptiveKLController(0.5, target=4.0, horizon=100)
    for _ in range(500):
        ctl.update(1.0 / ctl.value, n_steps=10)
    assert ctl.value == pytest.approx(0.25, rel=0.02)


def test_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(9.0, 64)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=10)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3
