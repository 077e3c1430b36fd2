"""Reward-hacking guards (rlhf.trainer.guards): each trips on the step it should and not one earlier, disabled
guards never trip, a checkpointed state continues counting, a healthy noisy run never trips."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import subprocess
import sys

import pytest

from rlhf.trainer.guards import GUARDS, GuardConfig, GuardTrip, RewardHackingGuards, least_squares_slope

OFF = GuardConfig(kl_budget=0.0, kl_patience=1, slope_window=0, max_kl_slope=0.0, length_factor=0.0,
                  length_patience=1)
"""Every guard disabled; the tests turn on the one they test."""


def only(**fields) -> GuardConfig:
    return dataclasses.replace(OFF, **fields)


def run(guards: RewardHackingGuards, steps, first_step: int = 1) -> list[GuardTrip | None]:
    """Observe (score, kl, length) per step from ``first_step``; the outcome of each."""
    return [guards.observe(first_step + i, *values) for i, values in enumerate(steps)]


def first_trip(outcomes: list[GuardTrip | None]) -> int | None:
    """Index of the first trip, None when none."""
    return next((i for i, t in enumerate(outcomes) if t is not None), None)


# --------------------------------------------------------------------------------------------- KL budget


def test_kl_budget_trips_after_k_consecutive_steps_over_budget_not_earlier():
    guards = RewardHackingGuards(only(kl_budget=8.0, kl_patience=3))
    outcomes = run(guards, [(0.0, 7.0, 10), (0.0, 9.0, 10), (0.0, 14.2, 10), (0.0, 9.5, 10)], first_step=41)
    assert outcomes[:3] == [None, None, None]
    trip = outcomes[3]
    assert trip == GuardTrip("kl_budget", 44, "KL 9.5 > budget 8 nats for 3 consecutive steps (steps 42-44)")


def test_kl_at_the_budget_is_not_over_it():
    guards = RewardHackingGuards(only(kl_budget=8.0, kl_patience=1))
    assert guards.observe(1, 0.0, 8.0, 10) is None
    assert guards.observe(2, 0.0, 8.0001, 10).guard == "kl_budget"


def test_a_step_under_budget_restarts_the_count():
    guards = RewardHackingGuards(only(kl_budget=8.0, kl_patience=3))
    outcomes = run(guards, [(0, 9, 10), (0, 9, 10), (0, 7.9, 10), (0, 9, 10), (0, 9, 10), (0, 9, 10)])
    assert first_trip(outcomes) == 5
    assert "steps 4-6" in outcomes[5].reason


def test_kl_patience_one_trips_on_the_first_step_over():
    guards = RewardHackingGuards(only(kl_budget=1.0, kl_patience=1))
    trip = guards.observe(7, 0.0, 1.5, 10)
    assert trip is not None and trip.step == 7 and "(step 7)" in trip.reason


def test_a_tripped_guard_trips_again_until_reset():
    guards = RewardHackingGuards(only(kl_budget=1.0, kl_patience=2))
    outcomes = run(guards, [(0, 2, 10)] * 4)
    assert [t is not None for t in outcomes] == [False, True, True, True]
    assert "for 4 consecutive steps" in outcomes[3].reason


# --------------------------------------------------------------------------------------------- slope


def rising(n: int, score_slope: float, kl_slope: float, kl0: float = 1.0):
    return [(0.5 + score_slope * i, kl0 + kl_slope * i, 10) for i in range(n)]


def test_slope_trips_once_the_window_is_full_not_a_step_earlier():
    # Binary-exact slopes (0.5 nats/step vs a max of 0.25): the boundary below is not a rounding question.
    guards = RewardHackingGuards(only(slope_window=5, max_kl_slope=0.25))
    outcomes = run(guards, rising(6, score_slope=0.125, kl_slope=0.5), first_step=20)
    assert outcomes[:4] == [None] * 4
    trip = outcomes[4]
    assert trip is not None and trip.guard == "kl_slope" and trip.step == 24
    assert trip.reason == ("KL rose 0.5 nats/step (> max 0.25) while the score rose 0.125/step over the last 5 steps "
                           "(steps 20-24)")


def test_kl_slope_at_the_maximum_does_not_trip():
    guards = RewardHackingGuards(only(slope_window=4, max_kl_slope=0.5))
    assert first_trip(run(guards, rising(10, score_slope=0.25, kl_slope=0.5))) is None


def test_kl_rising_fast_while_the_score_falls_or_stays_does_not_trip():
    for score_slope in (-0.25, 0.0):
        guards = RewardHackingGuards(only(slope_window=4, max_kl_slope=0.1))
        assert first_trip(run(guards, rising(10, score_slope=score_slope, kl_slope=2.0))) is None


def test_the_window_slides_old_steps_do_not_dilute_a_new_rise():
    guards = RewardHackingGuards(only(slope_window=4, max_kl_slope=0.5))
    flat = [(1.0, 2.0, 10)] * 6
    rise = [(1.0 + 0.25 * i, 2.0 + 1.0 * i, 10) for i in range(1, 5)]
    outcomes = run(guards, flat + rise)
    # KL of the window [2, 2, 2, 3] has slope 0.3; [2, 2, 3, 4] has 0.7 (a fit over all 8 steps: about 0.24)
    assert first_trip(outcomes) == 7
    assert "over the last 4 steps (steps 5-8)" in outcomes[7].reason


def test_least_squares_slope_equals_statistics_linear_regression():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 30)
        xs = sorted(rng.sample(range(1000), n))
        ys = [rng.gauss(0, 5) for _ in xs]
        expected = statistics.linear_regression(xs, ys).slope
        assert least_squares_slope([float(x) for x in xs], ys) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------------------------- length drift


def test_length_drift_from_the_first_steps_length_trips_after_patience():
    guards = RewardHackingGuards(only(length_factor=2.0, length_patience=3))
    outcomes = run(guards, [(0, 0, 100), (0, 0, 200), (0, 0, 201), (0, 0, 250), (0, 0, 300)], first_step=1)
    assert guards.reference_length == 100
    assert outcomes[:4] == [None] * 4  # 200 is on the band's edge; 201 and 250 are 2 of 3
    assert outcomes[4] == GuardTrip("length_drift", 5, (
        "mean response length 300 outside [50, 200] (reference 100, factor 2) for 3 consecutive steps (steps 3-5)"))


def test_length_drift_below_the_band_trips_too():
    guards = RewardHackingGuards(only(length_factor=2.0, length_patience=2), reference_length=100.0)
    outcomes = run(guards, [(0, 0, 50), (0, 0, 49), (0, 0, 10)])
    assert first_trip(outcomes) == 2


def test_length_back_inside_the_band_restarts_the_count():
    guards = RewardHackingGuards(only(length_factor=1.5, length_patience=2), reference_length=100.0)
    outcomes = run(guards, [(0, 0, 200), (0, 0, 100), (0, 0, 200), (0, 0, 200)])
    assert first_trip(outcomes) == 3


def test_a_given_reference_length_is_not_replaced_by_the_first_step():
    guards = RewardHackingGuards(only(length_factor=2.0, length_patience=1), reference_length=10.0)
    assert guards.observe(1, 0, 0, 100).guard == "length_drift"
    assert guards.reference_length == 10.0


# --------------------------------------------------------------------------------------------- disabled, NaN


def test_disabled_guards_never_trip():
    guards = RewardHackingGuards(OFF)
    outcomes = run(guards, [(i * 10.0, i * 100.0, 10.0 * 3 ** (i % 5)) for i in range(200)])
    assert first_trip(outcomes) is None


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.0])
def test_length_factor_at_most_one_disables_the_length_guard(factor):
    guards = RewardHackingGuards(only(length_factor=factor, length_patience=1), reference_length=10.0)
    assert first_trip(run(guards, [(0, 0, 1000), (0, 0, 0.001)])) is None


@pytest.mark.parametrize("budget", [0.0, -1.0])
def test_kl_budget_at_most_zero_disables_the_kl_guard(budget):
    guards = RewardHackingGuards(only(kl_budget=budget, kl_patience=1))
    assert first_trip(run(guards, [(0, 1e6, 10)] * 5)) is None


@pytest.mark.parametrize("which", ["score", "kl", "length"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_trip_even_with_every_guard_disabled(which, value):
    guards = RewardHackingGuards(OFF)
    values = {"score": 1.0, "kl": 1.0, "length": 10.0, which: value}
    trip = guards.observe(12, values["score"], values["kl"], values["length"])
    assert trip is not None and trip.guard == "non_finite" and trip.step == 12
    assert f"is {value}" in trip.reason and "step 12" in trip.reason


def test_a_non_finite_step_enters_no_window_and_sets_no_reference():
    guards = RewardHackingGuards(GuardConfig(slope_window=2, max_kl_slope=0.0, length_factor=2.0, length_patience=1))
    assert guards.observe(1, math.nan, math.nan, math.nan).guard == "non_finite"
    assert guards.reference_length is None
    assert guards.observe(2, 1.0, 1.0, 10.0) is None  # a window of one step: no slope yet
    assert guards.reference_length == 10.0
    json.dumps(guards.state_dict(), allow_nan=False)


def test_several_guards_at_once_report_the_first_in_order():
    guards = RewardHackingGuards(GuardConfig(kl_budget=1.0, kl_patience=1, slope_window=2, max_kl_slope=0.1,
                                             length_factor=2.0, length_patience=1), reference_length=10.0)
    assert guards.observe(1, 0.0, 0.5, 10) is None
    assert guards.observe(2, 1.0, 5.0, 100).guard == "kl_budget"
    assert list(GUARDS) == ["kl_budget", "kl_slope", "length_drift", "non_finite"]


def test_steps_must_increase():
    guards = RewardHackingGuards(GuardConfig())
    guards.observe(5, 0, 0, 10)
    with pytest.raises(ValueError, match="step 5 observed after step 5"):
        guards.observe(5, 0, 0, 10)


# --------------------------------------------------------------------------------------------- a healthy run


def test_a_noisy_but_healthy_run_never_trips():
    """A random walk within the budget, its length wandering inside the band, the score slowly rising while KL
    creeps up far slower than the maximum slope: 2000 steps, no trip."""
    config = GuardConfig(kl_budget=8.0, kl_patience=3, slope_window=20, max_kl_slope=0.25, length_factor=2.0,
                         length_patience=5)
    for seed in range(5):
        rng = random.Random(seed)
        guards = RewardHackingGuards(config, reference_length=100.0)  # the band is [50, 200]
        kl, length, score = 2.0, 100.0, 0.0
        for step in range(2000):
            kl = min(7.5, max(0.0, kl + rng.gauss(0, 0.3)))
            length = min(190.0, max(55.0, length + rng.gauss(0, 5)))
            score += rng.gauss(0.002, 0.05)
            noisy_kl = min(7.9, max(0.0, kl + rng.gauss(0, 0.2)))
            assert guards.observe(step, score, noisy_kl, length) is None, (seed, step)


# --------------------------------------------------------------------------------------------- state, reset


def test_state_dict_round_trip_through_json_continues_counting():
    config = GuardConfig(kl_budget=8.0, kl_patience=3, slope_window=4, max_kl_slope=0.25, length_factor=2.0,
                         length_patience=3)
    steps = [(0.5 + 0.125 * i, 9.0 + 0.5 * i if i >= 3 else 1.0, 100 if i == 0 else 300) for i in range(8)]
    reference = RewardHackingGuards(config)
    expected = run(reference, steps)
    for cut in range(1, len(steps)):
        first = RewardHackingGuards(config)
        before = run(first, steps[:cut])
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        second = RewardHackingGuards(config)
        second.load_state_dict(state)
        after = run(second, steps[cut:], first_step=cut + 1)
        assert before + after == expected, cut
        assert second.state_dict() == reference.state_dict()
    assert first_trip(expected) is not None


def test_load_state_dict_refuses_an_unknown_format():
    guards = RewardHackingGuards(GuardConfig())
    with pytest.raises(ValueError, match="format"):
        guards.load_state_dict({"format": 99})


def test_reset_starts_counters_and_windows_over_and_keeps_the_reference():
    config = GuardConfig(kl_budget=1.0, kl_patience=2, slope_window=3, max_kl_slope=0.1, length_factor=2.0,
                         length_patience=2)
    guards = RewardHackingGuards(config)
    outcomes = run(guards, [(0, 2.0, 100), (0.1, 2.5, 300)])
    assert outcomes[1].guard == "kl_budget"
    guards.reset()
    assert guards.reference_length == 100
    # one step over budget, one out of the band, a window of one: nothing trips until the counts fill up again
    assert guards.observe(3, 0.2, 3.0, 300) is None
    assert guards.observe(4, 0.3, 3.5, 300).guard == "kl_budget"
    fresh = RewardHackingGuards(config, reference_length=100)
    run(fresh, [(0.2, 3.0, 300), (0.3, 3.5, 300)], first_step=3)
    assert guards.state_dict() == fresh.state_dict()


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, name", [
    ({"kl_budget": math.nan}, "kl_budget"),
    ({"kl_budget": math.inf}, "kl_budget"),
    ({"kl_patience": 0}, "kl_patience"),
    ({"kl_patience": 1.5}, "kl_patience"),
    ({"slope_window": 1}, "slope_window"),
    ({"slope_window": -2}, "slope_window"),
    ({"max_kl_slope": -0.1}, "max_kl_slope"),
    ({"max_kl_slope": math.nan}, "max_kl_slope"),
    ({"length_factor": -1.0}, "length_factor"),
    ({"length_factor": "2"}, "length_factor"),
    ({"length_patience": 0}, "length_patience"),
])
def test_config_errors_name_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^GuardConfig\.{name} "):
        GuardConfig(**fields)


@pytest.mark.parametrize("reference", [0.0, -5.0, math.nan, math.inf])
def test_reference_length_must_be_positive_and_finite(reference):
    with pytest.raises(ValueError, match="reference_length"):
        RewardHackingGuards(GuardConfig(), reference_length=reference)


def test_defaults_and_off_switches_are_valid():
    GuardConfig()
    assert not (OFF.kl_budget_enabled or OFF.slope_enabled or OFF.length_enabled)
    assert GuardConfig().kl_budget_enabled and GuardConfig().slope_enabled and GuardConfig().length_enabled


def test_importing_the_guards_pulls_in_nothing_heavy():
    code = ("import sys, rlhf.trainer.guards; "
            "print(sorted(m for m in ('torch', 'grpc', 'kafka', 'redis', 'numpy', 'google.protobuf') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
