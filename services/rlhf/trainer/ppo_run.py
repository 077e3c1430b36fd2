"""One continuous PPO run inside the trainer: the learner on a thread of its own, ``local_workers`` rollout workers
on theirs (embedded; distributed workers are ``rlhf rollout-worker`` processes on the same buffer), and the prompt
feed. The servicer starts, pauses and resumes it; the guards pause it by themselves.

The learner loop (``_learn``):

1. while running: one learner step (a batch from the buffer → the PPO update → a version every publish_every);
2. its metrics and phases to Prometheus and to the status;
3. a saved version is recorded in the dataset (``saved``, with its lineage) for the canary controller;
4. the guards judge the step; one that trips pauses the run with its reason;
5. ``ppo_steps`` reached: the run is completed.

A buffer that is down makes the learner and the workers wait and retry; nothing they acknowledged is lost.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

from rlhf.trainer import metrics
from rlhf.trainer.buffer import BufferUnavailable, RolloutBuffer
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.guards import GuardConfig, GuardTrip, RewardHackingGuards
from rlhf.trainer.learner import Learner, LearnerSettings, SavedVersion, StepResult
from rlhf.trainer.rollouts import PromptPool
from rlhf.trainer.worker import RolloutWorker, Scorer, WorkerSettings

log = logging.getLogger(__name__)

RUNNING, PAUSED, COMPLETED, FAILED, STOPPED = "running", "paused", "completed", "failed", "stopped"
DROP_REASONS = (("used already", "used_already"), ("unreadable", "unreadable"), ("batch of run", "other_run"),
                ("from a version", "ahead"))
"""StepResult.reason prefixes -> the reason label of rlhf_trainer_rollout_batches_dropped_total."""


def guard_config(c: TrainerConfig) -> GuardConfig:
    return GuardConfig(kl_budget=c.kl_budget, kl_patience=c.kl_patience, slope_window=c.kl_slope_window,
                       max_kl_slope=c.max_kl_slope, length_factor=c.length_factor,
                       length_patience=c.length_patience)


def worker_settings(c: TrainerConfig, index: int = 0, name: str = "") -> WorkerSettings:
    return WorkerSettings(batch_size=c.ppo_batch_size, response_length=c.ppo_response_length,
                          temperature=c.ppo_temperature, seed=c.ppo_seed, max_staleness=c.max_staleness,
                          publish_every=c.publish_every, artifact_root=c.artifact_root, worker_index=index,
                          name=name or f"worker-{index}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    run_id: str
    parent_version: str
    parent_uri: str
    """Relative to the artifact root, or absolute."""
    ppo_steps: int


class PPORun:
    def __init__(self, config: TrainerConfig, spec: RunSpec, buffer: RolloutBuffer, *, pool: PromptPool,
                 scorer_factory: Callable[[], Scorer], on_saved: Callable[[SavedVersion], None],
                 on_state: Callable[[str, str], None] = lambda state, message: None,
                 lineage: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.spec = spec
        self.buffer = buffer
        self.pool = pool
        self.scorer_factory = scorer_factory
        self.on_saved = on_saved
        self.on_state = on_state
        self.on_result: Callable[[StepResult], None] | None = None
        """Called with each learner step's result on the learner thread (the trainer's weight-sync measurement)."""
        self.lineage = lineage
        self.state = PAUSED
        self.message = ""
        self.paused_by: GuardTrip | None = None
        self.last_result: StepResult | None = None
        self.learner: Learner | None = None
        self.guards = RewardHackingGuards(guard_config(config))
        self.workers: list[RolloutWorker] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ building

    def _build_learner(self) -> Learner:
        from rlhf.core.models import load_causal_lm
        from rlhf.core.ppo import PPOTrainer
        from rlhf.core.tokenizer import format_prompt

        c, spec = self.config, self.spec
        path = spec.parent_uri if os.path.isabs(spec.parent_uri) else os.path.join(c.artifact_root, spec.parent_uri)
        policy, tokenizer = load_causal_lm(path)
        policy.requires_grad_(True)
        trainer = PPOTrainer(
            c.ppo_config(), policy, None, tokenizer, None, [],
            encode_prompt=lambda text: tokenizer(format_prompt(tokenizer, text), add_special_tokens=False)["input_ids"],
        )
        settings = LearnerSettings(
            run_id=spec.run_id, parent_version=spec.parent_version, parent_uri=spec.parent_uri,
            artifact_root=c.artifact_root, checkpoint_dir=os.path.join(c.artifact_root, "runs", spec.run_id),
            max_staleness=c.max_staleness, publish_every=c.publish_every, checkpoint_every=c.checkpoint_every,
            policy_name=c.policy_name)
        learner = Learner(settings, trainer, tokenizer, self.buffer, lineage=self.lineage, extra_state=self.guards)
        learner.resume()
        return learner

    # ------------------------------------------------------------------------------------------ control

    def start(self, state: str = RUNNING) -> None:
        """Load the parent (or the checkpoint), then run the learner and the local workers."""
        self.learner = self._build_learner()
        metrics.KL_BUDGET.set(max(0.0, self.config.kl_budget))
        self.state = state
        self._publish_progress()
        metrics.set_role("learner", self.learner.version)
        self._spawn("learner", self._learn)
        for i in range(self.config.local_workers):
            worker = RolloutWorker(worker_settings(self.config, i), self.buffer, self.pool, self.scorer_factory(),
                                   on_batch=self._on_batch)
            self.workers.append(worker)
            self._spawn(f"rollout-worker-{i}", lambda w=worker: w.run(self._stop))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def pause(self, message: str = "paused by PauseRun", trip: GuardTrip | None = None) -> None:
        with self._lock:
            if self.state != RUNNING:
                return
            self.state, self.message, self.paused_by = PAUSED, message, trip
        if trip is not None:
            metrics.GUARD_TRIPS.labels(trip.guard).inc()
            metrics.GUARD_PAUSED.labels(trip.guard).set(1)
            log.warning("PPO run %s paused by the %s guard: %s", self.spec.run_id, trip.guard, trip.reason)
        self._set_state()

    def resume(self) -> None:
        with self._lock:
            if self.state not in (PAUSED,):
                return
            if self.paused_by is not None:
                metrics.GUARD_PAUSED.labels(self.paused_by.guard).set(0)
                self.guards.reset()  # a human looked at it: the guards judge from here on
            self.state, self.message, self.paused_by = RUNNING, "", None
        self._set_state()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        if self.learner is not None and not any(t.is_alive() for t in self._threads):
            try:
                self.learner.flush()
            except Exception:  # noqa: BLE001 - the buffer may be down: the next start redoes what is pending
                log.warning("final checkpoint of run %s failed", self.spec.run_id, exc_info=True)

    def _set_state(self) -> None:
        metrics.RUN_STATE.set(1 if self.state == RUNNING else 0)
        try:
            self._publish_progress()
        except BufferUnavailable as e:
            log.warning("could not publish the run's state now (%s); the learner loop will", e)
        self.on_state(self.state, self.message)

    def _publish_progress(self) -> None:
        if self.learner is not None:
            self.learner.publish_progress(self.state)

    # ------------------------------------------------------------------------------------------ loops

    def _on_batch(self, batch: Any, timings: dict[str, float]) -> None:
        metrics.ROLLOUT_BATCHES.inc()  # (weight sync: the trainer measures it from the learner's side, on_result)

    def _learn(self) -> None:
        assert self.learner is not None
        learner = self.learner
        while not self._stop.is_set():
            if self.state != RUNNING:
                self._stop.wait(0.2)
                continue
            # 1. one step
            try:
                result = learner.step()
                metrics.BUFFER_DEPTH.set(self.buffer.depth())
                self.message = "" if self.paused_by is None else self.message
            except BufferUnavailable as e:
                self.message = f"rollout buffer unavailable: {e}; retrying"
                log.warning(self.message)
                self._stop.wait(1.0)
                continue
            except Exception as e:
                log.exception("PPO step failed")
                self.state, self.message = FAILED, f"the learner failed: {type(e).__name__}: {e}"
                self._set_state()
                return
            if result is None:
                continue
            self.last_result = result
            if self.on_result is not None:
                self.on_result(result)
            # 2. metrics
            self._record(result)
            # 3. a saved version
            if result.saved is not None:
                metrics.set_role("learner", result.saved.version)
                try:
                    self.on_saved(result.saved)
                except Exception:
                    log.exception("recording version %s failed", result.saved.version)
            if not result.used:
                continue
            # 4. guards
            m = result.metrics
            trip = self.guards.observe(learner.step_count, m.get("score", math.nan), m.get("kl", math.nan),
                                       m.get("response_length", math.nan))
            if trip is not None:
                self.pause(trip.reason, trip)
                continue
            # 5. done?
            if self.spec.ppo_steps and learner.step_count >= self.spec.ppo_steps:
                self.state, self.message = COMPLETED, f"{learner.step_count} steps done"
                self._set_state()
                return

    def _record(self, result: StepResult) -> None:
        if not result.used:
            reason = "stale" if result.staleness > 0 else next(
                (label for prefix, label in DROP_REASONS if result.reason.startswith(prefix)), "other")
            metrics.DROPPED_BATCHES.labels(reason).inc()
            if result.staleness:
                metrics.STALENESS.observe(result.staleness)
            return
        metrics.STALENESS.observe(result.staleness)
        metrics.PPO_STEPS.inc()
        if result.batch is not None:
            metrics.PPO_SAMPLES.inc(len(result.batch))
            if result.batch.reward_model_version:
                metrics.REWARD_MODEL_VERSION.clear()
                metrics.REWARD_MODEL_VERSION.labels(result.batch.reward_model_version).set(1)
        for name, gauge in metrics.PPO_STATS.items():
            value = result.metrics.get(name, 0.0 if name == "importance_clipfrac" else None)
            if value is not None and math.isfinite(value):
                gauge.set(value)
        for phase, seconds in result.phases.items():
            metrics.PPO_PHASE_SECONDS.labels(phase).observe(max(0.0, seconds))

    # ------------------------------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        learner = self.learner
        out: dict[str, Any] = {"run_id": self.spec.run_id, "state": self.state, "message": self.message,
                               "total_steps": self.spec.ppo_steps}
        if learner is not None:
            out.update(step=learner.step_count, version=learner.version, version_index=learner.version_index,
                       reward_model_version=learner.reward_model_version, metrics=dict(learner.last_metrics),
                       batches_used=learner.batches_used, dropped_stale=learner.dropped_stale,
                       skipped=learner.skipped)
        if self.paused_by is not None:
            out["guard"] = self.paused_by.guard
        out["worker_errors"] = [w.last_error for w in self.workers if w.last_error]
        return out
