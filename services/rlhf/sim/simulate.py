"""``rlhf simulate``: a product played against a running platform, with the built-in task's users and annotators.

    rlhf simulate --target 127.0.0.1:50051 --minutes 10

Against any platform that serves the ``rlhf.v1`` API: ``rlhf up`` (every service on one port) or the distributed
services (``--feedback-target``, ``--reward-target``, ``--trainer-target`` name the others). It

    1. asks ``PolicyService.Generate`` for answers to the built-in task's prompts, as simulated users (one routing
       key each, so canary routing is sticky): ``--eval-share`` of the requests use held-out prompts, under the
       product ``rlhf-simulate-eval`` and never get feedback (the trainer leaves that product's traffic out of
       training); the rest use train prompts under ``rlhf-simulate``;
    2. has a simulated annotator (`rlhf.sim.annotators`) judge each train request's samples and streams the judgement
       to ``FeedbackService.SubmitStream``: one sample is rated (thumbs or 1..5), two are a pairwise preference,
       ``FeedbackMix.ranking_k`` a ranking;
    3. measures every served response by the hidden gold utility (`rlhf.sim.gold`) and, when a reward service
       answers, by ``RewardService.Score``;
    4. prints one line every ``--report-every`` seconds over the last ``--window-s`` seconds: served versions and their
       shares, the canary's traffic share (``GetPolicy``), gold utility on held-out and train prompts, reward,
       feedback sent / accepted, Generate failures, and the trainer's PPO step and KL when ``TrainerService.GetStatus``
       reports them;
    5. writes ``simulate.json`` (one record per window of ``--window-s`` and a summary) and ``simulate.png`` (gold,
       reward and KL over time, the first response of each new policy version marked) under ``--out``.

Generate failures (a canary swap, a restart) are counted and shown, never fatal; Ctrl-C writes what was collected.
The pure parts (request plans, judgements, feedback events, windows, report lines, the summary) are free functions
and small records, tested in tests/unit/test_sim_simulate.py; `Simulation` holds the threads and the gRPC calls.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc

from rlhf.core.plot import Marker, Panel, Series, render_panels
from rlhf.sim.annotators import Annotator, AnnotatorPool
from rlhf.sim.gold import gold_utility
from rlhf.sim.world import Prompt, split_prompts
from rlhf.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

PRODUCT = "rlhf-simulate"
EVAL_PRODUCT = "rlhf-simulate-eval"
"""The product of held-out requests: they never get feedback, and the trainer leaves their traffic out of training."""
HELD_OUT_SHARE_OF_WORLD = 0.2
"""`split_prompts`' share, the same as `rlhf demo`'s: its held-out prompts are the ones its policy never trained on."""


# ----------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class FeedbackMix:
    """What a train request asks for, and so what feedback it gets; the rest are two samples and a preference."""

    rating_share: float = 0.2
    """Requests of one sample, which the annotator rates."""
    ranking_share: float = 0.1
    """Requests of ``ranking_k`` samples, which the annotator ranks (K-wise feedback)."""
    ranking_k: int = 3
    """Samples of a ranking request (3..16; the policy service allows 8 by default)."""
    scale_share: float = 0.5
    """Ratings given on a 1..5 scale; the rest are thumbs."""

    def __post_init__(self) -> None:
        for name in ("rating_share", "ranking_share", "scale_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FeedbackMix.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.rating_share + self.ranking_share > 1.0:
            raise ValueError("FeedbackMix.rating_share + ranking_share must be at most 1")
        if not 3 <= self.ranking_k <= 16:
            raise ValueError(f"FeedbackMix.ranking_k must be in 3..16, got {self.ranking_k}")


@dataclass(frozen=True)
class SimulateConfig:
    """One simulation; `from_args` builds it from the command line. Errors name the option to change."""

    target: str
    """HOST:PORT of the policy service (all services with ``rlhf up``)."""
    minutes: float
    """How long to play; > 0."""
    feedback_target: str = ""
    """HOST:PORT of the feedback service; empty: ``target``."""
    reward_target: str = ""
    """HOST:PORT of the reward service; empty: ``target`` (and a missing one only leaves the reward panel empty)."""
    trainer_target: str = ""
    """HOST:PORT of the trainer service; empty: ``target`` (a missing one leaves PPO step and KL out)."""
    token: str = field(default="", repr=False)
    """The product bearer token (``authorization: Bearer <token>``); empty when the platform has auth off."""
    concurrency: int = 2
    """Product calls in flight at once (one thread each). Two keep a CPU-only embedded policy busy without queueing."""
    report_every_s: float = 5.0
    """Seconds between report lines."""
    window_s: float = 30.0
    """The window every report line and every record of simulate.json averages over, in seconds."""
    eval_share: float = 0.3
    """Share of requests on held-out prompts (product ``rlhf-simulate-eval``, no feedback): the measurement."""
    seed: int = 0
    """Seeds the users' choices, the annotators and the sampling seeds sent with each request."""
    out: str = os.path.join("out", "simulate")
    """Where simulate.json and simulate.png go."""
    max_new_tokens: int = 48
    """Tokens per response at most: `rlhf demo`'s PPO response length, so served answers look like trained ones."""
    num_users: int = 50
    """Simulated users, each its own routing key ``user-<n>``: a canary at p% serves about p% of them."""
    rpc_timeout_s: float = 30.0
    """Deadline of one Generate (and Score) call."""
    probe_timeout_s: float = 5.0
    """Deadline of the start-up calls that check each target answers."""
    feedback: FeedbackMix = field(default_factory=FeedbackMix)
    """What train requests ask for and the feedback they get."""
    head_to_head: int = 4
    """Samples per held-out prompt of the head-to-head: before the run, every held-out prompt is answered by the
    stable version served then (pinned); after it, by the stable version served at the end, with the same sampling
    seeds; the share of pairs the end version wins by gold utility (ties half) is reported. 0 skips it. Four give 288
    pairs (a standard error of about 2.6 points on a 70% win rate; one sample each, 72 pairs, about 5.4)."""

    def __post_init__(self) -> None:
        for option, value in (("--target", self.target), ("--feedback-target", self.feedback_target),
                              ("--reward-target", self.reward_target), ("--trainer-target", self.trainer_target)):
            if value:
                parse_target(value, option)
        checks = (
            (self.minutes > 0 and math.isfinite(self.minutes), "--minutes", f"must be > 0, got {self.minutes}"),
            (self.concurrency >= 1, "--concurrency", f"must be >= 1, got {self.concurrency}"),
            (self.report_every_s > 0, "--report-every", f"must be > 0 seconds, got {self.report_every_s}"),
            (self.window_s > 0, "--window-s", f"must be > 0 seconds, got {self.window_s}"),
            (0.0 <= self.eval_share <= 1.0, "--eval-share", f"must be in [0, 1], got {self.eval_share}"),
            (self.max_new_tokens >= 1, "--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}"),
            (self.num_users >= 1, "num_users", f"must be >= 1, got {self.num_users}"),
            (self.head_to_head >= 0, "--head-to-head", f"must be >= 0, got {self.head_to_head}"),
        )
        for ok, option, message in checks:
            if not ok:
                raise ValueError(f"{option} {message}")

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    def address(self, service: Literal["policy", "feedback", "reward", "trainer"]) -> str:
        """HOST:PORT of one service (its own option, else ``target``)."""
        own = {"policy": self.target, "feedback": self.feedback_target, "reward": self.reward_target,
               "trainer": self.trainer_target}[service]
        return parse_target(own or self.target, "--target")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulateConfig:
        token = args.token if args.token is not None else os.environ.get("RLHF_AUTH_TOKEN", "")
        return cls(
            target=args.target, minutes=args.minutes, feedback_target=args.feedback_target or "",
            reward_target=args.reward_target or "", trainer_target=args.trainer_target or "", token=token,
            concurrency=args.concurrency, report_every_s=args.report_every, window_s=args.window_s,
            eval_share=args.eval_share, seed=args.seed, out=args.out, max_new_tokens=args.max_new_tokens,
            head_to_head=args.head_to_head,
        )


def parse_target(value: str, option: str = "--target") -> str:
    """``HOST:PORT`` (a ``grpc://`` prefix is dropped); ValueError naming ``option`` otherwise."""
    rest = value.removeprefix("grpc://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{option} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:50051 (where `rlhf up` listens)")
    return rest


# ----------------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class RequestPlan:
    """One product call: which prompt, for whom, and how many samples (which sets the feedback it gets)."""

    prompt: Prompt
    held_out: bool
    num_samples: int
    routing_key: str
    seed: int
    """The request's sampling seed (reproducible runs against the same platform state)."""

    @property
    def product(self) -> str:
        return EVAL_PRODUCT if self.held_out else PRODUCT


@dataclass(frozen=True)
class Served:
    """One served response, measured."""

    t: float
    """Seconds since the simulation started, when the reply arrived."""
    version: str
    held_out: bool
    gold: float
    reward: float | None = None
    """Its RewardService score; None when no reward service scored it (or the response was empty)."""


@dataclass(frozen=True)
class Judgement:
    """What one annotator thought of the samples of one request (indices into the samples)."""

    kind: Literal["rating", "pairwise", "ranking"]
    order: tuple[int, ...] = ()
    """Best first (pairwise, ranking)."""
    thumb_up: bool | None = None
    """A thumbs rating."""
    scale: int | None = None
    """A rating on the scale 1..5."""
    strength: Literal["slight", "clear", "strong"] | None = None
    """How much the preferred sample looked better (pairwise)."""


@dataclass(frozen=True)
class Snapshot:
    """What the platform said at one report tick."""

    t: float
    canary_percent: int | None = None
    """The candidate's traffic_percent; 0 without a candidate; None when GetPolicy did not answer."""
    candidate: str = ""
    stable: str = ""
    ppo_step: int | None = None
    """The trainer's PPO step, when it runs PPO (GetStatus.step > 0 or a "kl" metric)."""
    kl: float | None = None
    trainer_policy_version: str = ""
    feedback_consumed: int | None = None
    """TrainerStatus.feedback_events_consumed; None when no trainer answered."""


@dataclass
class Timeline:
    """Everything a simulation saw, stamped with seconds since its start. Windows and report lines are read off it."""

    served: list[Served] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    """(t, status code name) of each failed Generate."""
    feedback_sent: list[float] = field(default_factory=list)
    """When each event was first sent (retries are not counted again)."""
    feedback_accepted: list[float] = field(default_factory=list)
    """When each event was acknowledged ACCEPTED or DUPLICATE (an earlier copy was)."""
    feedback_rejected: list[float] = field(default_factory=list)
    feedback_failed: list[float] = field(default_factory=list)
    """Events given up on (FAILED after the retries, or a stream that failed for good)."""
    snapshots: list[Snapshot] = field(default_factory=list)
    requests: int = 0

    def copy(self) -> Timeline:
        return Timeline(list(self.served), list(self.errors), list(self.feedback_sent), list(self.feedback_accepted),
                        list(self.feedback_rejected), list(self.feedback_failed), list(self.snapshots), self.requests)


@dataclass(frozen=True)
class WindowStats:
    """A span [start_s, end_s) of a timeline, summarised."""

    start_s: float
    end_s: float
    responses: int
    versions: dict[str, float]
    """Served version -> share of the span's responses (largest first)."""
    gold_held_out: float | None
    n_held_out: int
    gold_train: float | None
    n_train: int
    reward: float | None
    n_reward: int
    feedback_sent: int
    feedback_accepted: int
    generate_errors: dict[str, int]
    """Status code name -> failed Generate calls in the span."""
    canary_percent: int | None
    candidate: str
    ppo_step: int | None
    kl: float | None
    trainer_policy_version: str
    feedback_consumed: int | None


# ----------------------------------------------------------------------------------------------------------------------
# pure logic: plans, judgements, feedback events


def plan_request(rng: random.Random, train: Sequence[Prompt], held_out: Sequence[Prompt],
                 config: SimulateConfig) -> RequestPlan:
    """One request: a random user; a held-out prompt with probability ``eval_share`` (one sample, no
    feedback), else a train prompt with the samples its feedback needs (`FeedbackMix`)."""
    user = f"user-{rng.randrange(config.num_users)}"
    seed = rng.getrandbits(48)
    if held_out and (rng.random() < config.eval_share or not train):
        return RequestPlan(rng.choice(held_out), True, 1, user, seed)
    mix, u = config.feedback, rng.random()
    num_samples = 1 if u < mix.rating_share else mix.ranking_k if u < mix.rating_share + mix.ranking_share else 2
    return RequestPlan(rng.choice(train), False, num_samples, user, seed)


def paired_win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """P(ours > theirs) over pairs (the same prompt and sampling seed), ties counting half: `rlhf demo`'s win rate."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need the same number (> 0) of pairs, got {len(ours)} and {len(theirs)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)) / len(ours)


@dataclass(frozen=True)
class HeadToHead:
    """The stable version at the end against the one at the start, on every held-out prompt (`SimulateConfig.
    head_to_head`)."""

    start_version: str
    end_version: str
    pairs: int
    win_rate: float
    """Share of pairs in which the end version's response has the higher gold utility (ties half)."""
    start_gold: float
    end_gold: float
    trainer_kl: float | None
    """The trainer's KL to the reference at its last step (its "kl" metric), when a trainer answered."""


def _logistic(rng: random.Random) -> float:
    u = min(max(rng.random(), 1e-12), 1 - 1e-12)
    return math.log(u / (1 - u))


def judge(annotator: Annotator, prompt: Prompt, texts: Sequence[str], rng: random.Random,
          scale_share: float = 0.5) -> Judgement:
    """The annotator's feedback on one request's samples: a rating of one, a preference between two, a ranking of
    more. Orders are the annotator's Plackett–Luce sample (`Annotator.rank`, Bradley–Terry for two); a rating is the
    perceived utility plus logistic noise of the annotator's temperature: thumbs up above 0 (an answer of some use),
    on 1..5 as 3 + that value, rounded and clipped."""
    if not texts:
        raise ValueError("judge: no samples to judge")
    if len(texts) == 1:
        value = annotator.perceived_utility(prompt, texts[0]) + annotator.temperature * _logistic(rng)
        if rng.random() < scale_share:
            return Judgement("rating", scale=int(min(5, max(1, round(3 + value)))))
        return Judgement("rating", thumb_up=value > 0)
    order = annotator.rank(prompt, texts, rng)
    if len(texts) > 2:
        return Judgement("ranking", order=order)
    best, second = (annotator.perceived_utility(prompt, texts[i]) for i in order[:2])
    gap = abs(best - second)
    return Judgement("pairwise", order=order, strength="slight" if gap < 0.5 else "clear" if gap < 1.5 else "strong")


def feedback_event(judgement: Judgement, response_ids: Sequence[str], *, event_id: str, annotator_id: str,
                   prompt_id: str, created_at_s: float, metadata: dict[str, str] | None = None):
    """The FeedbackEvent of a judgement of the samples ``response_ids`` (as the policy service returned them)."""
    event = feedback_pb2.FeedbackEvent(event_id=event_id, product=PRODUCT, annotator_id=annotator_id,
                                       prompt_id=prompt_id, metadata=metadata or {})
    event.created_at.FromNanoseconds(int(created_at_s * 1e9))
    if judgement.kind == "rating":
        rating = event.rating
        rating.response_id = response_ids[0]
        if judgement.scale is not None:
            rating.scale.CopyFrom(feedback_pb2.ScaleRating(value=judgement.scale, min=1, max=5))
        else:
            rating.thumb = feedback_pb2.THUMB_UP if judgement.thumb_up else feedback_pb2.THUMB_DOWN
    elif judgement.kind == "pairwise":
        strength = {"slight": feedback_pb2.PREFERENCE_STRENGTH_SLIGHT, "clear": feedback_pb2.PREFERENCE_STRENGTH_CLEAR,
                    "strong": feedback_pb2.PREFERENCE_STRENGTH_STRONG}.get(judgement.strength or "", 0)
        event.pairwise.CopyFrom(feedback_pb2.PairwisePreference(
            chosen_response_id=response_ids[judgement.order[0]],
            rejected_response_id=response_ids[judgement.order[1]], strength=strength))
    else:
        event.ranking.response_ids.extend(response_ids[i] for i in judgement.order)
    return event


# ----------------------------------------------------------------------------------------------------------------------
# pure logic: windows, report lines, summary


def window_bounds(elapsed_s: float, window_s: float) -> list[tuple[float, float]]:
    """Consecutive windows [k w, (k + 1) w) up to ``elapsed_s``; a last piece shorter than half a window joins the
    one before it (a 0.3 s tail averages too little to plot)."""
    if elapsed_s <= 0:
        return []
    bounds: list[tuple[float, float]] = []
    start = 0.0
    while start < elapsed_s:
        bounds.append((start, min(start + window_s, elapsed_s)))
        start += window_s
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < window_s / 2:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _count_in(times: Iterable[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def summarize(timeline: Timeline, start_s: float, end_s: float) -> WindowStats:
    """The span [start_s, end_s) of ``timeline``. Platform state (canary, trainer) is the last snapshot before
    ``end_s``: a state, not an average."""
    served = [s for s in timeline.served if start_s <= s.t < end_s]
    versions = Counter(s.version for s in served)
    held = [s.gold for s in served if s.held_out]
    train = [s.gold for s in served if not s.held_out]
    rewards = [s.reward for s in served if s.reward is not None]
    errors = Counter(code for t, code in timeline.errors if start_s <= t < end_s)
    snap = next((s for s in reversed(timeline.snapshots) if s.t < end_s), Snapshot(start_s))
    return WindowStats(
        start_s=start_s, end_s=end_s, responses=len(served),
        versions={v: n / len(served) for v, n in versions.most_common()},
        gold_held_out=_mean(held), n_held_out=len(held), gold_train=_mean(train), n_train=len(train),
        reward=_mean(rewards), n_reward=len(rewards),
        feedback_sent=_count_in(timeline.feedback_sent, start_s, end_s),
        feedback_accepted=_count_in(timeline.feedback_accepted, start_s, end_s),
        generate_errors=dict(errors.most_common()),
        canary_percent=snap.canary_percent, candidate=snap.candidate, ppo_step=snap.ppo_step, kl=snap.kl,
        trainer_policy_version=snap.trainer_policy_version, feedback_consumed=snap.feedback_consumed,
    )


def progress_bar(fraction: float, width: int = 20) -> str:
    """``[#####...............]`` for ``fraction`` of ``width`` cells (clipped to [0, 1])."""
    done = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * done + "." * (width - done) + "]"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def format_report(elapsed_s: float, duration_s: float, window: WindowStats, totals: WindowStats) -> str:
    """One report line: ``window`` is the last ``--window-s`` seconds, ``totals`` the whole run so far."""
    served = ", ".join(f"{v} {share:.0%}" for v, share in window.versions.items()) or "nothing yet"
    if window.canary_percent is None:
        canary = "canary ?"
    elif window.candidate:
        canary = f"canary {window.canary_percent}% ({window.candidate})"
    else:
        canary = "canary 0%"
    fraction = min(elapsed_s / duration_s, 1.0) if duration_s > 0 else 1.0
    parts = [
        f"{_clock(elapsed_s)} {progress_bar(fraction)} {fraction:4.0%}",
        f"served {served}",
        canary,
        (f"gold held-out {_num(window.gold_held_out)} (n={window.n_held_out}) "
         f"train {_num(window.gold_train)} (n={window.n_train})"),
    ]
    if window.reward is not None:
        parts.append(f"reward {_num(window.reward, 3)}")
    parts.append(f"feedback {totals.feedback_sent} sent, {totals.feedback_accepted} accepted")
    failed = sum(totals.generate_errors.values())
    parts.append(f"generate errors {failed}" + (
        " (" + ", ".join(f"{code} {n}" for code, n in totals.generate_errors.items()) + ")" if failed else ""))
    if window.ppo_step is not None:
        ppo = f"ppo step {window.ppo_step}"
        if window.kl is not None:
            ppo += f" kl {window.kl:.3f}"
        if window.trainer_policy_version:
            ppo += f" ({window.trainer_policy_version})"
        parts.append(ppo)
    return " | ".join(parts)


@dataclass(frozen=True)
class VersionChange:
    """The versions that serve traffic changed between two report ticks (by GetPolicy)."""

    t: float
    """The tick that first saw the new versions."""
    serving: tuple[str, ...]
    """The stable version, then the candidate when it gets traffic."""
    added: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def label(self) -> str:
        """``+new -old``: what the figure writes beside the marker."""
        return " ".join([f"+{v}" for v in self.added] + [f"-{v}" for v in self.removed])


def serving_versions(snap: Snapshot) -> tuple[str, ...] | None:
    """The versions that get traffic at a snapshot (a candidate at 0% serves pinned requests only); None when
    GetPolicy did not answer."""
    if snap.canary_percent is None:
        return None
    return tuple(v for v in (snap.stable, snap.candidate if snap.canary_percent > 0 else "") if v)


def version_changes(snapshots: Sequence[Snapshot]) -> list[VersionChange]:
    """Every tick at which the versions that serve traffic differ from the tick before that answered: a canary
    starting (``+candidate``), a promotion (``+new -old``), a rollback. The platform's split, not the responses
    sampled: a canary at 5% is marked when it starts, whether or not a response of it came back at once."""
    changes: list[VersionChange] = []
    before: tuple[str, ...] | None = None
    for snap in sorted(snapshots, key=lambda s: s.t):
        now = serving_versions(snap)
        if now is None:
            continue
        if before is not None and now != before:
            changes.append(VersionChange(snap.t, now, tuple(v for v in now if v not in before),
                                         tuple(v for v in before if v not in now)))
        before = now
    return changes


def window_record(w: WindowStats) -> dict[str, object]:
    """A window as simulate.json stores it."""
    record = dataclasses.asdict(w)
    for key in ("start_s", "end_s"):
        record[key] = round(record[key], 3)
    return record


def summarize_run(timeline: Timeline, windows: Sequence[WindowStats], elapsed_s: float,
                  interrupted: bool) -> dict[str, object]:
    """simulate.json's summary: held-out gold of the first and the last window that had any, versions seen."""
    with_gold = [w for w in windows if w.gold_held_out is not None]
    first = with_gold[0].gold_held_out if with_gold else None
    last = with_gold[-1].gold_held_out if with_gold else None
    totals = summarize(timeline, 0.0, math.inf)
    return {
        "duration_s": round(elapsed_s, 3),
        "interrupted": interrupted,
        "requests": timeline.requests,
        "responses": totals.responses,
        "generate_errors": totals.generate_errors,
        "first_window_gold_held_out": first,
        "last_window_gold_held_out": last,
        "gold_held_out_change": None if first is None or last is None else last - first,
        "gold_held_out_all": totals.gold_held_out,
        "gold_train_all": totals.gold_train,
        "versions_seen": dict(Counter(s.version for s in timeline.served).most_common()),
        "version_changes": [{"t": round(c.t, 3), "serving": list(c.serving), "added": list(c.added),
                             "removed": list(c.removed)} for c in version_changes(timeline.snapshots)],
        "feedback_sent": len(timeline.feedback_sent),
        "feedback_accepted": len(timeline.feedback_accepted),
        "feedback_rejected": len(timeline.feedback_rejected),
        "feedback_failed": len(timeline.feedback_failed),
    }


def format_head_to_head(h: HeadToHead) -> str:
    kl = f"; the trainer's KL at its last step {h.trainer_kl:.2f}" if h.trainer_kl is not None else ""
    return (f"rlhf simulate: head-to-head on {h.pairs} held-out answers: {h.end_version} wins {h.win_rate:.1%} "
            f"against {h.start_version} by gold utility ({h.start_gold:+.2f} -> {h.end_gold:+.2f}){kl}")


def format_summary(summary: dict[str, object], windows: int, out_dir: str) -> str:
    """The final line."""
    first, last = summary["first_window_gold_held_out"], summary["last_window_gold_held_out"]
    gold = (f"held-out gold {first:+.2f} -> {last:+.2f} ({summary['gold_held_out_change']:+.2f}) over {windows} "
            f"window(s)" if isinstance(first, float) and isinstance(last, float) else "no held-out responses")
    errors = sum(summary["generate_errors"].values())  # type: ignore[union-attr]
    versions = ", ".join(summary["versions_seen"]) or "none"  # type: ignore[arg-type]
    return (f"rlhf simulate: {summary['duration_s']:.0f}s{' (interrupted)' if summary['interrupted'] else ''}, "
            f"{summary['requests']} requests ({errors} failed), {summary['responses']} responses; {gold}; "
            f"versions seen: {versions}; feedback {summary['feedback_sent']} sent, {summary['feedback_accepted']} "
            f"accepted; wrote {os.path.join(out_dir, 'simulate.json')} and simulate.png")


def render_plot(windows: Sequence[WindowStats], changes: Sequence[VersionChange]) -> bytes:
    """simulate.png: held-out (and train) gold, reward and KL per window over time, version changes marked."""

    x = [(w.start_s + w.end_s) / 2 for w in windows]

    def values(name: str) -> list[float]:
        return [math.nan if getattr(w, name) is None else float(getattr(w, name)) for w in windows]

    def panel(title: str, *series: Series) -> Panel:
        drawn = [s for s in series if any(math.isfinite(v) for v in s.y)]
        return Panel(title if drawn else f"{title} - none reported", drawn,
                     markers=[Marker(c.t, c.label) for c in changes])

    return render_panels([
        panel("served gold utility (held-out)", Series("held-out", x, values("gold_held_out")),
              Series("train", x, values("gold_train"))),
        panel("reward (mean score of served responses)", Series("reward", x, values("reward"))),
        panel("KL (trainer)", Series("kl", x, values("kl"))),
    ], x_label="seconds")


# ----------------------------------------------------------------------------------------------------------------------
# the platform: probes, threads, calls


class SimulateError(Exception):
    """Bad input or an unusable platform: the message says what to do."""


def _reachable(channel: grpc.Channel, timeout_s: float = 0.5) -> bool:
    """Whether ``channel`` connects: tells a server that answered UNAVAILABLE (not ready) from one not there."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        return False
    return True


@dataclass(frozen=True)
class ProbeResult:
    """What a start-up call to one service found."""

    usable: bool
    """Calls to it make sense (it answered, or it is there but not ready yet)."""
    note: str = ""
    """What to tell the user; empty when all is well."""


def probe_outcome(code: grpc.StatusCode | None, details: str, reachable: bool, address: str, service: str,
                  option: str, required: bool) -> ProbeResult:
    """What a start-up call's status means: SimulateError (what to do) when the simulation cannot go on, else whether
    to use the service and a note. ``required`` services (policy, feedback, and any the user named) must be there;
    the others only leave their part of the report empty."""
    if code is None or code == grpc.StatusCode.OK:
        return ProbeResult(True)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        raise SimulateError(f"{address} refused the {service} call ({details}): pass --token or set "
                            "RLHF_AUTH_TOKEN to a product token of the platform")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not reachable:
        if required:
            raise SimulateError(f"cannot reach {address}: start the platform with `rlhf up`, or pass {option} "
                                f"HOST:PORT of a running {service} ({code.name}: {details})")
        return ProbeResult(False, f"cannot reach a {service} at {address}: its part of the report stays empty; "
                                  f"pass {option} HOST:PORT")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        if required:
            raise SimulateError(f"{address} answers but serves no rlhf.v1.{service}: pass {option} the address of "
                                f"the {service} (with `rlhf up` every service is on one port)")
        return ProbeResult(False, f"no {service} at {address}: its part of the report stays empty; pass {option} "
                                  "HOST:PORT")
    # There, but not ready (no model loaded yet, draining, ...): calls fail and are counted until it is.
    return ProbeResult(True, f"the {service} at {address} is not ready ({code.name}: {details}); its calls fail "
                             "(counted) until it is")


class FeedbackSender:
    """Sends queued events on ``FeedbackService.SubmitStream``, one stream per batch of what is ready (a message of up
    to ``batch`` events), and counts the acknowledgements on the timeline. A FAILED event or a failed stream is
    retried with the same event_id (the service deduplicates); REJECTED is not (the event is wrong)."""

    RETRIES = 3
    TERMINAL = ("UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT")

    def __init__(self, sim: Simulation, batch: int = 100) -> None:
        self.sim = sim
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(sim.channel("feedback"))
        self.batch = batch
        self.queue: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, name="feedback-sender", daemon=True)

    def put(self, event) -> None:  # a generated message type
        self.sim.stamp(self.sim.timeline.feedback_sent)
        self.queue.put((event, 0))

    def _take(self) -> list[tuple[object, int]]:
        try:
            items = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(items) < self.batch:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while not (self.stopping.is_set() and self.queue.empty()):
            items = self._take()
            if items:
                self._send(items)

    def _send(self, items: list[tuple[object, int]]) -> None:
        request = feedback_pb2.SubmitStreamRequest(events=[event for event, _ in items])
        try:
            replies = list(self.stub.SubmitStream(iter([request]), timeout=self.sim.config.rpc_timeout_s,
                                                  metadata=self.sim.metadata))
        except grpc.RpcError as e:
            code = e.code().name  # type: ignore[attr-defined]
            self.last_error = f"{code}: {e.details()}"  # type: ignore[attr-defined]
            self._retry(items, give_up=code in self.TERMINAL)
            if not self.stopping.is_set():
                time.sleep(0.5)
            return
        acks = [ack for reply in replies for ack in reply.acks]
        retry = []
        for (event, attempts), ack in zip(items, acks, strict=False):
            if ack.status in (feedback_pb2.SUBMIT_STATUS_ACCEPTED, feedback_pb2.SUBMIT_STATUS_DUPLICATE):
                self.sim.stamp(self.sim.timeline.feedback_accepted)
            elif ack.status == feedback_pb2.SUBMIT_STATUS_REJECTED:
                self.last_error = f"REJECTED: {ack.error_message}"
                self.sim.stamp(self.sim.timeline.feedback_rejected)
            else:
                self.last_error = f"FAILED: {ack.error_message}"
                retry.append((event, attempts))
        self._retry(retry + items[len(acks):], give_up=False)

    def _retry(self, items: list[tuple[object, int]], give_up: bool) -> None:
        for event, attempts in items:
            if give_up or attempts + 1 >= self.RETRIES or self.stopping.is_set():
                self.sim.stamp(self.sim.timeline.feedback_failed)
            else:
                self.queue.put((event, attempts + 1))

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout_s: float) -> None:
        """Send what is queued (one more try each), then stop."""
        self.stopping.set()
        self.thread.join(timeout_s)


class Simulation:
    """A running simulation: channels to the platform, the product threads, the feedback sender and the timeline."""

    def __init__(self, config: SimulateConfig) -> None:
        self.config = config
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        self._channels: dict[str, grpc.Channel] = {}
        self.timeline = Timeline()
        self.lock = threading.Lock()
        self.start_time = time.monotonic()
        self.stop = threading.Event()
        self.train_prompts, self.held_out_prompts = split_prompts(HELD_OUT_SHARE_OF_WORLD, seed=0)
        self.pool = AnnotatorPool()
        self.run_id = uuid.uuid4().hex[:12]
        self.score = False
        self.trainer = False
        self.events = 0
        self.sender: FeedbackSender | None = None
        self.workers: list[threading.Thread] = []
        self.ended_s: float | None = None
        """When the product stopped (the head-to-head after it is not part of the timeline)."""

    # -- plumbing
    def channel(self, service: Literal["policy", "feedback", "reward", "trainer"]):
        address = self.config.address(service)
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address)
        return self._channels[address]

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def stamp(self, times: list[float]) -> None:
        with self.lock:
            times.append(self.elapsed())

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # -- 1. probes: every target answers (or what to do)
    def probe(self) -> list[str]:
        """Check every target answers (SimulateError saying what to do otherwise); notes for the user."""
        c = self.config
        probes = (
            ("policy", "PolicyService", "--target", True,
             policy_pb2_grpc.PolicyServiceStub(self.channel("policy")).GetPolicy, policy_pb2.GetPolicyRequest()),
            # An empty stream: nothing is submitted; a feedback service answers it with OK.
            ("feedback", "FeedbackService", "--feedback-target", True,
             feedback_pb2_grpc.FeedbackServiceStub(self.channel("feedback")).SubmitStream, iter(())),
            ("reward", "RewardService", "--reward-target", bool(c.reward_target),
             reward_pb2_grpc.RewardServiceStub(self.channel("reward")).GetRewardModel,
             reward_pb2.GetRewardModelRequest()),
            ("trainer", "TrainerService", "--trainer-target", bool(c.trainer_target),
             trainer_pb2_grpc.TrainerServiceStub(self.channel("trainer")).GetStatus, trainer_pb2.GetStatusRequest()),
        )
        notes, usable = [], {}
        for name, service, option, required, method, request in probes:
            code, details = None, ""
            try:
                reply = method(request, timeout=c.probe_timeout_s, metadata=self.metadata)
                if name == "feedback":
                    list(reply)  # the stream's end carries its status
                elif name == "policy" and not reply.policies:
                    notes.append(f"no policy version is loaded at {c.address(name)} yet: requests fail (counted) "
                                 "until one is")
            except grpc.RpcError as e:
                code, details = e.code(), e.details()  # type: ignore[attr-defined]
            reachable = code is None or _reachable(self.channel(name))
            result = probe_outcome(code, details, reachable, c.address(name), service, option, required)
            usable[name] = result.usable
            if result.note:
                notes.append(result.note)
        self.score, self.trainer = usable["reward"], usable["trainer"]
        return notes

    # -- 2. the product threads
    def start(self) -> None:
        self.start_time = time.monotonic()
        self.sender = FeedbackSender(self)
        self.sender.start()
        self.workers = [threading.Thread(target=self._worker, args=(i,), name=f"product-{i}", daemon=True)
                        for i in range(self.config.concurrency)]
        for w in self.workers:
            w.start()

    def _event_id(self) -> str:
        with self.lock:
            self.events += 1
            return f"sim-{self.run_id}-{self.events}"

    def _worker(self, index: int) -> None:
        policy = policy_pb2_grpc.PolicyServiceStub(self.channel("policy"))
        reward = reward_pb2_grpc.RewardServiceStub(self.channel("reward")) if self.score else None
        rng = random.Random(self.config.seed * 1_000_003 + index)
        backoff = 0.2
        while not self.stop.is_set() and self.elapsed() < self.config.duration_s:
            plan = plan_request(rng, self.train_prompts, self.held_out_prompts, self.config)
            with self.lock:
                self.timeline.requests += 1
            try:
                reply = self._generate(policy, plan)
            except grpc.RpcError as e:  # a canary swap, a restart, overload: counted, shown, never fatal
                self._failed(e.code().name)  # type: ignore[attr-defined]
                self.stop.wait(backoff)  # a platform that is down is not hammered
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            try:
                self._measure(plan, reply, reward)
                if not plan.held_out and reply.samples:
                    self._feedback(plan, reply, rng)
            except Exception as e:  # noqa: BLE001 - a reply this code cannot use must not stop the product
                self._failed(type(e).__name__)

    def _failed(self, code: str) -> None:
        with self.lock:
            self.timeline.errors.append((self.elapsed(), code))

    def _generate(self, policy, plan: RequestPlan):
        request = policy_pb2.GenerateRequest(
            prompt=plan.prompt.text, num_samples=plan.num_samples, routing_key=plan.routing_key, product=plan.product,
            sampling=common_pb2.SamplingParams(max_new_tokens=self.config.max_new_tokens, seed=plan.seed))
        return policy.Generate(request, timeout=self.config.rpc_timeout_s, metadata=self.metadata)

    def _scores(self, reward, plan: RequestPlan, texts: Sequence[str]) -> list[float | None]:
        """RewardService scores of ``texts`` (None for an empty one, which the service refuses, or on failure)."""
        sent = [i for i, text in enumerate(texts) if text.strip()]
        out: list[float | None] = [None] * len(texts)
        if reward is None or not sent:
            return out
        items = [reward_pb2.ScoreItem(prompt=plan.prompt.text, response=texts[i]) for i in sent]
        try:
            reply = reward.Score(reward_pb2.ScoreRequest(items=items), timeout=self.config.rpc_timeout_s,
                                 metadata=self.metadata)
        except grpc.RpcError:
            return out  # no reward model loaded yet, or swapping: this response goes unscored
        for i, score in zip(sent, reply.scores, strict=False):
            out[i] = float(score)
        return out

    def _measure(self, plan: RequestPlan, reply, reward) -> None:
        texts = [s.text for s in reply.samples]
        scores = self._scores(reward, plan, texts)
        t = self.elapsed()
        served = [Served(t, reply.policy_version, plan.held_out, gold_utility(plan.prompt, text), score)
                  for text, score in zip(texts, scores, strict=True)]
        with self.lock:
            self.timeline.served.extend(served)

    def _feedback(self, plan: RequestPlan, reply, rng: random.Random) -> None:
        assert self.sender is not None
        annotator = rng.choice(self.pool.annotators)
        judgement = judge(annotator, plan.prompt, [s.text for s in reply.samples], rng,
                          self.config.feedback.scale_share)
        event = feedback_event(
            judgement, [s.response_id for s in reply.samples], event_id=self._event_id(),
            annotator_id=f"sim-{annotator.id}", prompt_id=reply.prompt_id, created_at_s=time.time(),
            metadata={"simulator": "rlhf simulate", "run": self.run_id, "topic": plan.prompt.topic,
                      "intent": plan.prompt.intent, "routing_key": plan.routing_key},
        )
        self.sender.put(event)

    # -- head-to-head: one version, pinned, on every held-out prompt
    def stable_version(self) -> str:
        reply = policy_pb2_grpc.PolicyServiceStub(self.channel("policy")).GetPolicy(
            policy_pb2.GetPolicyRequest(), timeout=self.config.probe_timeout_s, metadata=self.metadata)
        return policy_split(reply)[0]

    def pinned_gold(self, version: str) -> list[float]:
        """Gold utility of ``version``'s answers to every held-out prompt, ``head_to_head`` samples each, in a
        fixed order with fixed seeds (so that two versions' lists pair up). Raises grpc.RpcError."""
        from concurrent.futures import ThreadPoolExecutor

        policy = policy_pb2_grpc.PolicyServiceStub(self.channel("policy"))
        n = self.config.head_to_head

        def one(i: int) -> list[float]:
            prompt = self.held_out_prompts[i]
            reply = policy.Generate(policy_pb2.GenerateRequest(
                prompt=prompt.text, num_samples=n, product=EVAL_PRODUCT, version=version,
                routing_key=f"head-to-head-{i}", sampling=common_pb2.SamplingParams(
                    max_new_tokens=self.config.max_new_tokens, seed=self.config.seed * 1_000_003 + 7_919 * i)),
                timeout=self.config.rpc_timeout_s, metadata=self.metadata)
            if reply.policy_version != version or len(reply.samples) != n:
                raise SimulateError(f"asked {version} for {n} samples, got {len(reply.samples)} from "
                                    f"{reply.policy_version or '?'}")
            return [gold_utility(prompt, s.text) for s in reply.samples]

        with ThreadPoolExecutor(self.config.concurrency) as pool:
            return [g for golds in pool.map(one, range(len(self.held_out_prompts))) for g in golds]

    def trainer_status(self):  # a TrainerStatus, or None
        if not self.trainer:
            return None
        try:
            return trainer_pb2_grpc.TrainerServiceStub(self.channel("trainer")).GetStatus(
                trainer_pb2.GetStatusRequest(), timeout=self.config.probe_timeout_s, metadata=self.metadata)
        except grpc.RpcError:
            return None

    def trainer_kl(self) -> float | None:
        status = self.trainer_status()
        return trainer_view(status)["kl"] if status is not None else None  # type: ignore[return-value]

    # -- 3. the platform's state at a report tick
    def snapshot(self) -> Snapshot:
        t = self.elapsed()
        canary, candidate, stable = None, "", ""
        try:
            reply = policy_pb2_grpc.PolicyServiceStub(self.channel("policy")).GetPolicy(
                policy_pb2.GetPolicyRequest(), timeout=2.0, metadata=self.metadata)
            stable, candidate, canary = policy_split(reply)
        except grpc.RpcError:
            pass
        snap = Snapshot(t, canary, candidate, stable)
        if self.trainer:
            try:
                status = trainer_pb2_grpc.TrainerServiceStub(self.channel("trainer")).GetStatus(
                    trainer_pb2.GetStatusRequest(), timeout=2.0, metadata=self.metadata)
                snap = dataclasses.replace(snap, **trainer_view(status))
            except grpc.RpcError:
                pass
        with self.lock:
            self.timeline.snapshots.append(snap)
        return snap

    def timeline_copy(self) -> Timeline:
        with self.lock:
            return self.timeline.copy()

    def finish(self, grace_s: float) -> None:
        """Stop the product threads (a call in flight finishes), then send the feedback still queued."""
        self.stop.set()
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if self.sender is not None:
            self.sender.stop(max(1.0, deadline - time.monotonic()))
        self.ended_s = self.elapsed()


def policy_split(reply) -> tuple[str, str, int]:  # a GetPolicyResponse
    """(stable version, candidate version, the candidate's traffic_percent) of a GetPolicy reply; "" for a role
    nobody has (and 0% without a candidate)."""
    stable, candidate, percent = "", "", 0
    for p in reply.policies:
        if p.role == policy_pb2.POLICY_ROLE_STABLE:
            stable = p.version.version
        elif p.role == policy_pb2.POLICY_ROLE_CANDIDATE:
            candidate, percent = p.version.version, int(p.traffic_percent)
    return stable, candidate, percent


def trainer_view(status) -> dict[str, object]:  # a TrainerStatus
    """The Snapshot fields a TrainerStatus gives: PPO step and KL only when the trainer runs PPO (a step or a "kl"
    metric reported), the consumed feedback always."""
    kl = status.metrics.get("kl")
    runs_ppo = status.step > 0 or kl is not None
    return {
        "ppo_step": int(status.step) if runs_ppo else None,
        "kl": float(kl) if kl is not None else None,
        "trainer_policy_version": status.policy_version if runs_ppo else "",
        "feedback_consumed": int(status.feedback_events_consumed),
    }


def trainer_latency(status) -> dict[str, dict[str, float]] | None:  # a TrainerStatus, or None
    """Freshness and weight sync as the trainer reports them (count, p50, p95, max seconds over its recent
    observations); None when no trainer answered."""
    if status is None:
        return None
    return {name: {"count": int(s.count), "p50_s": round(s.p50_seconds, 3), "p95_s": round(s.p95_seconds, 3),
                   "max_s": round(s.max_seconds, 3)}
            for name, s in (("freshness", status.freshness), ("weight_sync", status.weight_sync))}


def format_latency(latency: dict[str, dict[str, float]]) -> str:
    parts = [f"{name.replace('_', ' ')} p50 {v['p50_s']:.1f}s p95 {v['p95_s']:.1f}s ({v['count']} observed)"
             if v["count"] else f"{name.replace('_', ' ')}: none observed" for name, v in latency.items()]
    return "rlhf simulate: the trainer's " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# the command


def write_outputs(sim: Simulation, interrupted: bool,
                  head_to_head: HeadToHead | None = None) -> tuple[dict[str, object], int]:
    """simulate.json and simulate.png under ``--out``; returns the summary and the number of windows."""
    timeline = sim.timeline_copy()
    elapsed = sim.ended_s if sim.ended_s is not None else sim.elapsed()  # after the last call: every stamp is earlier
    windows = [summarize(timeline, a, b) for a, b in window_bounds(elapsed, sim.config.window_s)]
    summary = summarize_run(timeline, windows, elapsed, interrupted)
    summary["head_to_head"] = dataclasses.asdict(head_to_head) if head_to_head is not None else None
    # (not after Ctrl-C: that exits at once with what the product collected)
    summary["trainer_latency"] = None if interrupted else trainer_latency(sim.trainer_status())
    os.makedirs(sim.config.out, exist_ok=True)
    config = {k: v for k, v in dataclasses.asdict(sim.config).items() if k != "token"}
    with open(os.path.join(sim.config.out, "simulate.json"), "w") as f:
        json.dump({"config": config, "run_id": sim.run_id, "windows": [window_record(w) for w in windows],
                   "summary": summary}, f, indent=2)
    with open(os.path.join(sim.config.out, "simulate.png"), "wb") as f:
        f.write(render_plot(windows, version_changes(timeline.snapshots)))
    return summary, len(windows)


def report_loop(sim: Simulation) -> None:
    """A line every ``report_every_s`` until the duration is over (or Ctrl-C)."""
    c = sim.config
    next_tick = c.report_every_s
    while True:
        now = sim.elapsed()
        if now >= c.duration_s:
            return
        sim.stop.wait(max(0.0, min(next_tick, c.duration_s) - now))
        if sim.elapsed() < next_tick - 1e-3:  # the duration ended before the tick
            return
        sim.snapshot()
        elapsed = sim.elapsed()
        timeline = sim.timeline_copy()
        window = summarize(timeline, max(0.0, elapsed - c.window_s), math.inf)
        print(format_report(elapsed, c.duration_s, window, summarize(timeline, 0.0, math.inf)), flush=True)
        next_tick += c.report_every_s


@dataclass(frozen=True)
class Baseline:
    version: str
    gold: list[float]


def start_head_to_head(sim: Simulation) -> Baseline | None:
    """The stable version's pinned answers before the run (None, with a note, when skipped or impossible)."""
    if sim.config.head_to_head == 0:
        return None
    t = time.monotonic()
    try:
        version = sim.stable_version()
        if not version:
            print("rlhf simulate: note: no stable policy version is served; no head-to-head", flush=True)
            return None
        gold = sim.pinned_gold(version)
    except (grpc.RpcError, SimulateError) as e:
        print(f"rlhf simulate: note: no head-to-head ({_rpc_text(e)})", flush=True)
        return None
    print(f"rlhf simulate: head-to-head baseline: {version} on {len(gold)} held-out answers, gold "
          f"{statistics.fmean(gold):+.2f} ({time.monotonic() - t:.0f}s)", flush=True)
    return Baseline(version, gold)


def finish_head_to_head(sim: Simulation, baseline: Baseline) -> HeadToHead | None:
    """The stable version at the end, pinned, on the same prompts and seeds as ``baseline``."""
    for attempt in range(3):  # the stable version may change (a promotion, a rollback) while it is evaluated
        try:
            version = sim.stable_version()
            gold = sim.pinned_gold(version) if version else []
            break
        except (grpc.RpcError, SimulateError) as e:
            if attempt == 2:
                print(f"rlhf simulate: note: no head-to-head at the end ({_rpc_text(e)})", flush=True)
                return None
            time.sleep(1.0)
    if not gold:
        print("rlhf simulate: note: no stable policy version at the end; no head-to-head", flush=True)
        return None
    return HeadToHead(baseline.version, version, len(gold), paired_win_rate(gold, baseline.gold),
                      statistics.fmean(baseline.gold), statistics.fmean(gold), sim.trainer_kl())


def _rpc_text(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return str(e)


def simulate(config: SimulateConfig) -> int:
    sim = Simulation(config)
    try:
        for note in sim.probe():
            print(f"rlhf simulate: note: {note}", flush=True)
        print(f"rlhf simulate: {config.minutes:g} min against {config.address('policy')} "
              f"(feedback {config.address('feedback')}), {config.concurrency} in parallel, "
              f"{config.eval_share:.0%} held-out; a line every {config.report_every_s:g}s over the last "
              f"{config.window_s:g}s", flush=True)
        baseline = start_head_to_head(sim)
        interrupted = False
        sim.start()
        sim.snapshot()
        try:
            report_loop(sim)
            sim.finish(grace_s=config.rpc_timeout_s)
        except KeyboardInterrupt:
            interrupted = True
            print("rlhf simulate: interrupted; writing what was collected", flush=True)
            sim.finish(grace_s=2.0)
        if sim.sender is not None and sim.sender.last_error and not sim.timeline.feedback_accepted:
            print(f"rlhf simulate: note: no feedback was accepted; last error: {sim.sender.last_error}", flush=True)
        result = finish_head_to_head(sim, baseline) if baseline is not None and not interrupted else None
        summary, windows = write_outputs(sim, interrupted, result)
        if result is not None:
            print(format_head_to_head(result), flush=True)
        if summary["trainer_latency"] is not None:
            print(format_latency(summary["trainer_latency"]), flush=True)  # type: ignore[arg-type]
        print(format_summary(summary, windows, config.out), flush=True)
        return 130 if interrupted else 0
    finally:
        sim.close()


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the policy service (every service with `rlhf up`, e.g. 127.0.0.1:50051)")
    parser.add_argument("--feedback-target", metavar="HOST:PORT", help="the feedback service (default: --target)")
    parser.add_argument("--reward-target", metavar="HOST:PORT", help="the reward service (default: --target)")
    parser.add_argument("--trainer-target", metavar="HOST:PORT", help="the trainer service (default: --target)")
    parser.add_argument("--token", default=None,
                        help="product bearer token (default: the RLHF_AUTH_TOKEN environment variable)")
    parser.add_argument("--minutes", type=_positive(float), required=True, help="how long to play (> 0)")
    parser.add_argument("--concurrency", type=_positive(int), default=2, help="product calls in parallel (default 2)")
    parser.add_argument("--report-every", type=_positive(float), default=5.0,
                        help="seconds between report lines (default 5)")
    parser.add_argument("--window-s", type=_positive(float), default=30.0,
                        help="seconds each report line and each record of simulate.json averages over (default 30)")
    parser.add_argument("--eval-share", type=float, default=0.3,
                        help="share of requests on held-out prompts, without feedback (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of users, annotators and sampling (default 0)")
    parser.add_argument("--out", default=os.path.join("out", "simulate"),
                        help="where simulate.json and simulate.png go (default out/simulate)")
    parser.add_argument("--max-new-tokens", type=_positive(int), default=48,
                        help="tokens per response at most (default 48)")
    parser.add_argument("--head-to-head", type=int, default=4, metavar="N",
                        help="samples per held-out prompt of the start-vs-end comparison of the stable versions "
                             "(default 4; 0 skips it)")


def run(args: argparse.Namespace) -> int:
    try:
        config = SimulateConfig.from_args(args)
    except ValueError as e:
        print(f"rlhf simulate: {e}", file=sys.stderr, flush=True)
        return 2
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM writes the outputs too, like Ctrl-C
    try:
        return simulate(config)
    except SimulateError as e:
        print(f"rlhf simulate: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # during the probes: nothing collected yet
        print("rlhf simulate: interrupted before it started", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "EVAL_PRODUCT", "PRODUCT", "Baseline", "FeedbackMix", "HeadToHead", "Judgement", "ProbeResult", "RequestPlan", "Served", "SimulateConfig",
    "SimulateError", "Simulation", "Snapshot", "Timeline", "VersionChange", "WindowStats", "add_arguments",
    "feedback_event", "format_report", "format_summary", "judge", "plan_request", "policy_split", "probe_outcome",
    "paired_win_rate", "progress_bar", "render_plot", "run", "serving_versions", "summarize", "summarize_run", "trainer_view",
    "version_changes", "window_bounds",
]
