"""Reward-hacking guards: signs in a PPO run's per-step statistics that the policy games the reward model.

The learner calls :meth:`RewardHackingGuards.observe` after every step with the step's mean score, mean KL to the
reference policy (nats per response) and mean response length; when a guard trips, the run pauses itself with the
trip's reason, and a human looks at its samples before resuming it (then :meth:`RewardHackingGuards.reset`).

The guards (``guard`` of :class:`GuardTrip`, stable names: they become a metric label):

* ``kl_budget``: KL above ``kl_budget`` for ``kl_patience`` consecutive steps. The KL penalty is what keeps the
  policy near the reference model that the reward model was trained on; a run that stays far above its budget has
  left the region where the reward model's scores mean anything (Gao et al., "Scaling Laws for Reward Model
  Overoptimization", https://arxiv.org/abs/2210.10760: the gold reward falls while the proxy keeps rising as KL
  grows).
* ``kl_slope``: over the last ``slope_window`` steps, the least-squares slope of the score is > 0 while the slope of
  KL is > ``max_kl_slope``: the reward rises while KL rises faster than a configured slope, the shape of
  over-optimisation in the same paper. Judged only once the window is full.
* ``length_drift``: mean response length outside ``[reference / f, reference * f]`` (f = ``length_factor``) for
  ``length_patience`` consecutive steps. Length is the best-known exploit of learned reward models (Singhal et al.,
  "A Long Way to Go: Investigating Length Correlations in RLHF", https://arxiv.org/abs/2310.03716). The reference
  is the length the caller gives, else the first step's (the run starts at the reference policy).
* ``non_finite``: a score, KL or length that is NaN or infinite trips at once, whatever the configuration (no
  guard can judge the step, and a diverged run must never pass silently). Such a step is not counted by the other
  guards and does not enter their windows.

Several guards may trip on one step; :meth:`~RewardHackingGuards.observe` returns the first in the order above and
keeps every guard's state up to date. A guard that tripped trips again on the next step it still holds for, until
:meth:`~RewardHackingGuards.reset`. "Consecutive" means consecutive calls of ``observe``: the learner calls it
after every step, and step numbers must increase.

Standard library only: the learner imports this next to torch, and its tests need nothing else.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

__all__ = ["GUARDS", "GuardConfig", "GuardTrip", "RewardHackingGuards", "least_squares_slope"]

GUARDS = ("kl_budget", "kl_slope", "length_drift", "non_finite")
"""Every value of :attr:`GuardTrip.guard`, in the order observe() reports them (e.g. to initialise a metric)."""

_STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """What the guards judge a run by; each guard has a setting that turns it off."""

    kl_budget: float = 10.0
    """Nats per response (the mean over the step's responses of their summed per-token KL). <= 0 disables the
    KL-budget guard. The default sits above TRL's adaptive-KL target of 6 nats (``PPOConfig.target``): a run that
    tracks its target never reaches it."""
    kl_patience: int = 3
    """k: consecutive steps over ``kl_budget`` that trip the guard (>= 1). Above 1, one noisy batch does not pause
    a run; KL that stays over budget does."""
    slope_window: int = 20
    """Steps the slopes of score and KL are fitted on (>= 2; 0 disables the slope guard). Longer windows see slower
    drifts and are less noisy, and need that many steps before they judge anything."""
    max_kl_slope: float = 0.25
    """Nats per response per step (>= 0): KL rising faster than this while the score rises trips the slope guard.
    The default is 5 nats over the default window, a run that would cross its budget within one window."""
    length_factor: float = 2.0
    """f > 1: a mean response length outside ``[reference / f, reference * f]`` counts as drift. <= 1 (0 too)
    disables the length guard."""
    length_patience: int = 5
    """Consecutive steps outside the length band that trip the guard (>= 1), so one odd batch does not."""

    def __post_init__(self) -> None:
        for name in ("kl_budget", "max_kl_slope", "length_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GuardConfig.{name} must be a finite number, got {value!r}")
        for name in ("kl_patience", "slope_window", "length_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GuardConfig.{name} must be an int, got {value!r}")  # noqa: TRY004
        if self.kl_patience < 1:
            raise ValueError(f"GuardConfig.kl_patience must be >= 1 (steps over budget that trip), got "
                             f"{self.kl_patience}; disable the guard with kl_budget <= 0 instead")
        if self.slope_window < 0 or self.slope_window == 1:
            raise ValueError(f"GuardConfig.slope_window must be 0 (off) or >= 2 (a slope needs two steps), got "
                             f"{self.slope_window}")
        if self.max_kl_slope < 0:
            raise ValueError(f"GuardConfig.max_kl_slope must be >= 0 nats per step, got {self.max_kl_slope}; "
                             "disable the guard with slope_window=0 instead")
        if self.length_factor < 0:
            raise ValueError(f"GuardConfig.length_factor must be > 1, or in [0, 1] to disable the guard, got "
                             f"{self.length_factor}")
        if self.length_patience < 1:
            raise ValueError(f"GuardConfig.length_patience must be >= 1 (steps outside the band that trip), got "
                             f"{self.length_patience}; disable the guard with length_factor <= 1 instead")

    @property
    def kl_budget_enabled(self) -> bool:
        return self.kl_budget > 0

    @property
    def slope_enabled(self) -> bool:
        return self.slope_window >= 2

    @property
    def length_enabled(self) -> bool:
        return self.length_factor > 1


@dataclasses.dataclass(frozen=True)
class GuardTrip:
    """A guard that tripped: the run pauses with ``reason``."""

    guard: str
    """Which one: a name of :data:`GUARDS` (``kl_budget``, ``kl_slope``, ``length_drift``, ``non_finite``)."""
    step: int
    """The step it tripped on (the last one observed)."""
    reason: str
    """A sentence with the numbers, for the run's status and the human who resumes it."""


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the ordinary least-squares line through (xs, ys): cov(x, y) / var(x); xs not all equal."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return sxy / sxx


def _n(x: float) -> str:
    """A number for a reason sentence: 4 significant digits, no exponent for everyday values."""
    return f"{x:.4g}"


def _steps(first: int, last: int) -> str:
    return f"step {last}" if first == last else f"steps {first}-{last}"


class RewardHackingGuards:
    """The guards of one run (see the module docstring). Not thread-safe: the learner's loop owns it."""

    def __init__(self, config: GuardConfig, reference_length: float | None = None) -> None:
        """``reference_length``: mean response length of the reference policy, in the unit ``observe`` gets
        (tokens); None takes the first observed step's."""
        if reference_length is not None and not (math.isfinite(reference_length) and reference_length > 0):
            raise ValueError(f"reference_length must be a finite number > 0 (or None: the first step's), got "
                             f"{reference_length!r}")
        self.config = config
        self.reference_length: float | None = None if reference_length is None else float(reference_length)
        self.reset()

    def reset(self) -> None:
        """Start every counter and window over (after a human resumed the run); the reference length stays."""
        self._last_step: int | None = None
        self._kl_over = 0  # consecutive steps over budget, ending at the last step
        self._kl_over_since = 0  # the first of them
        self._length_out = 0
        self._length_out_since = 0
        # (step, score, kl) of the last slope_window steps
        self._window: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=max(self.config.slope_window, 1))

    # -- observing

    def observe(self, step: int, score: float, kl: float, response_length: float) -> GuardTrip | None:
        """Judge one step's means: score (reward-model score), KL (nats per response), response length.
        The first guard that trips (module docstring), else None."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} observed after step {self._last_step}: steps must increase "
                             "(load_state_dict of the checkpoint the run resumed from, or reset())")
        self._last_step = step
        bad = [f"{name} is {value}" for name, value in (("score", score), ("KL", kl),
                                                         ("response length", response_length))
               if not math.isfinite(value)]
        if bad:
            return GuardTrip("non_finite", step, f"{', '.join(bad)} at step {step}: the step's statistics are not "
                                                 "finite (the run diverged or a bug); no guard can judge it")
        if response_length < 0:
            raise ValueError(f"response_length must be >= 0, got {response_length}")
        if self.reference_length is None:
            self.reference_length = float(response_length)
        trips = (self._observe_kl(step, kl), self._observe_slope(step, score, kl),
                 self._observe_length(step, response_length))
        return next((t for t in trips if t is not None), None)

    def _observe_kl(self, step: int, kl: float) -> GuardTrip | None:
        cfg = self.config
        if not cfg.kl_budget_enabled:
            return None
        if kl <= cfg.kl_budget:
            self._kl_over = 0
            return None
        if self._kl_over == 0:
            self._kl_over_since = step
        self._kl_over += 1
        if self._kl_over < cfg.kl_patience:
            return None
        return GuardTrip("kl_budget", step, (
            f"KL {_n(kl)} > budget {_n(cfg.kl_budget)} nats for {self._kl_over} consecutive steps "
            f"({_steps(self._kl_over_since, step)})"))

    def _observe_slope(self, step: int, score: float, kl: float) -> GuardTrip | None:
        cfg = self.config
        if not cfg.slope_enabled:
            return None
        window = self._window
        window.append((step, float(score), float(kl)))
        if len(window) < cfg.slope_window:
            return None
        steps = [float(s) for s, _, _ in window]
        score_slope = least_squares_slope(steps, [v for _, v, _ in window])
        kl_slope = least_squares_slope(steps, [v for _, _, v in window])
        if not (score_slope > 0 and kl_slope > cfg.max_kl_slope):
            return None
        return GuardTrip("kl_slope", step, (
            f"KL rose {_n(kl_slope)} nats/step (> max {_n(cfg.max_kl_slope)}) while the score rose "
            f"{_n(score_slope)}/step over the last {len(window)} steps ({_steps(window[0][0], step)})"))

    def _observe_length(self, step: int, length: float) -> GuardTrip | None:
        cfg = self.config
        if not cfg.length_enabled or self.reference_length is None:
            return None
        low, high = self.reference_length / cfg.length_factor, self.reference_length * cfg.length_factor
        if low <= length <= high:
            self._length_out = 0
            return None
        if self._length_out == 0:
            self._length_out_since = step
        self._length_out += 1
        if self._length_out < cfg.length_patience:
            return None
        return GuardTrip("length_drift", step, (
            f"mean response length {_n(length)} outside [{_n(low)}, {_n(high)}] (reference "
            f"{_n(self.reference_length)}, factor {_n(cfg.length_factor)}) for {self._length_out} consecutive "
            f"steps ({_steps(self._length_out_since, step)})"))

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue counting after a restart; JSON-able (no NaN: non-finite steps are never
        kept). The config is not part of it: a resumed run may change it."""
        return {
            "format": _STATE_FORMAT,
            "reference_length": self.reference_length,
            "last_step": self._last_step,
            "kl_over": self._kl_over,
            "kl_over_since": self._kl_over_since,
            "length_out": self._length_out,
            "length_out_since": self._length_out_since,
            "window": [list(entry) for entry in self._window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. A window longer than this config's keeps its newest steps."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"guard state of format {state.get('format')!r}; this version reads format "
                             f"{_STATE_FORMAT}")
        reference = state["reference_length"]
        self.reference_length = None if reference is None else float(reference)
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._kl_over, self._kl_over_since = int(state["kl_over"]), int(state["kl_over_since"])
        self._length_out, self._length_out_since = int(state["length_out"]), int(state["length_out_since"])
        self._window.clear()
        self._window.extend((int(s), float(v), float(k)) for s, v, k in state["window"])
