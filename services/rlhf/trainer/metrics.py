"""Prometheus metrics of the trainer (``rlhf_trainer_`` prefix, base units, ``_total`` counters)."""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("rlhf_trainer_records_consumed_total", "Records read from the bus (first delivery), by topic.",
                   ["topic"])
STORED = Counter("rlhf_trainer_records_stored_total",
                 "Records stored in the dataset, by kind (response, rating, pairwise, ranking, demonstration, edit).",
                 ["kind"])
DUPLICATES = Counter("rlhf_trainer_duplicates_total",
                     "Records not stored again: a known event_id / response_id, or an offset already stored "
                     "(kind redelivered).", ["kind"])
DEAD_LETTERS = Counter("rlhf_trainer_dead_letters_total",
                       "Feedback sent to rlhf.feedback.v1.dlq, by reason (join_timeout, different_prompts, ...).",
                       ["reason"])
DEAD_LETTERS_PUBLISHED = Counter("rlhf_trainer_dead_letters_published_total",
                                 "Dead letters made durable on rlhf.feedback.v1.dlq.")
LAG = Gauge("rlhf_trainer_consumer_lag", "Newest offset minus stored offset, per partition (records).",
            ["topic", "partition"])
DATASET = Gauge("rlhf_trainer_dataset_size",
                "Dataset rows by kind (responses, pairs, rankings, demonstrations, feedback_pending, ...).", ["kind"])
STORE_SECONDS = Histogram("rlhf_trainer_store_duration_seconds", "Time of one dataset transaction (a polled batch).",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
CONSUMING = Gauge("rlhf_trainer_consuming", "1 while the trainer consumes feedback, 0 while paused or down.")
FEEDBACK_PAUSED = Gauge("rlhf_trainer_feedback_paused",
                        "1 while feedback waits for the responses topic to catch up (a backlog is read responses "
                        "first), else 0.")
REWARD_TRAININGS = Counter("rlhf_trainer_reward_trainings_total",
                           "Reward-model trainings, by outcome (published, rejected, failed).", ["outcome"])
REWARD_TRAINING_SECONDS = Histogram("rlhf_trainer_reward_training_duration_seconds",
                                    "Time of one reward-model training (train, evaluate, save, publish).",
                                    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
REWARD_HELDOUT_ACCURACY = Gauge("rlhf_trainer_reward_heldout_accuracy",
                                "Held-out pairwise accuracy of the current reward-model version (at its training).")
REWARD_PUBLISHED_AT = Gauge("rlhf_trainer_reward_last_published_timestamp_seconds",
                            "Unix time of the last published reward-model version (0: none yet).")
SECONDS_SINCE_REWARD = Gauge("rlhf_trainer_seconds_since_reward_published",
                             "Seconds since the last published reward-model version (-1: none yet).")
_last_published = 0.0
SECONDS_SINCE_REWARD.set_function(lambda: time.time() - _last_published if _last_published else -1.0)


def reward_published(at: float) -> None:
    """A reward-model version was published (or is current since) ``at`` (Unix time)."""
    global _last_published
    _last_published = at
    REWARD_PUBLISHED_AT.set(at)

# ---------------------------------------------------------------------------------------------- continuous PPO
PPO_STEPS = Counter("rlhf_trainer_ppo_steps_total", "Learner updates (PPO steps).")
PPO_SAMPLES = Counter("rlhf_trainer_ppo_samples_total", "Rollouts the learner trained on.")
PPO_STATS = {
    name: Gauge(f"rlhf_trainer_ppo_{metric}", help_text)
    for name, metric, help_text in (
        ("rlhf_reward", "reward", "Mean RLHF reward of the last update's rollouts: score minus beta * KL."),
        ("score", "score", "Mean reward-service score of the last update's rollouts (before shaping)."),
        ("kl", "kl_nats", "Mean KL(policy || parent) per response of the last update (nats, summed over tokens)."),
        ("beta", "beta", "Weight of the KL penalty (beta) of the last update."),
        ("entropy", "entropy_nats", "Mean policy entropy per response token of the last update (nats)."),
        ("clipfrac", "clip_fraction", "Share of tokens whose PPO ratio was clipped in the last update."),
        ("approx_kl", "approx_kl_nats", "Mean approximate KL(old || new) per token of the last update's epochs."),
        ("policy_loss", "policy_loss", "Mean clipped policy loss of the last update."),
        ("value_loss", "value_loss", "Mean value loss of the last update."),
        ("explained_variance", "explained_variance", "Explained variance of the returns by the values, last update."),
        ("response_length", "response_length_tokens", "Mean rollout response length of the last update (tokens)."),
        ("importance_clipfrac", "importance_clip_fraction",
         "Share of a stale batch's tokens whose truncated importance weight was capped (0 for fresh batches)."),
    )
}
PPO_PHASE_SECONDS = Histogram(
    "rlhf_trainer_ppo_phase_duration_seconds",
    "Time of one phase of a PPO step: generation and scoring (in the worker), buffer_wait, update, save, checkpoint.",
    ["phase"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BUFFER_DEPTH = Gauge("rlhf_trainer_rollout_buffer_depth", "Rollout batches in the buffer not yet acknowledged.")
STALENESS = Histogram("rlhf_trainer_rollout_staleness_versions",
                      "Policy versions between a rollout batch's sampler and the learner when it was read.",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 16))
DROPPED_BATCHES = Counter("rlhf_trainer_rollout_batches_dropped_total",
                          "Rollout batches not trained on, by reason (stale, used_already, unreadable, other_run, ahead).",
                          ["reason"])
ROLLOUT_BATCHES = Counter("rlhf_trainer_rollout_batches_total", "Rollout batches added to the buffer by this "
                                                                "process's workers.")
WEIGHT_SYNC_SECONDS = Histogram("rlhf_trainer_weight_sync_seconds",
                                "Time from a policy version's save to the first rollout batch generated with it.",
                                buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
POLICY_VERSION = Gauge("rlhf_trainer_policy_version_info",
                       "1 for the learner's current policy version and for the served stable and canary ones.",
                       ["version", "role"])
REWARD_MODEL_VERSION = Gauge("rlhf_trainer_reward_model_version_info",
                             "1 for the reward-model version the last rollouts were scored by.", ["version"])
RUN_STATE = Gauge("rlhf_trainer_ppo_running", "1 while a PPO run is running, 0 otherwise.")
GUARD_TRIPS = Counter("rlhf_trainer_ppo_guard_trips_total", "Reward-hacking guards that paused the run, by guard.",
                      ["guard"])
GUARD_PAUSED = Gauge("rlhf_trainer_ppo_guard_paused", "1 while the run is paused by a guard, by guard.", ["guard"])
CANARY_DECISIONS = Counter("rlhf_trainer_canary_decisions_total", "Canary outcomes (promoted, rolled_back).",
                           ["outcome"])
KL_BUDGET = Gauge("rlhf_trainer_ppo_kl_budget_nats", "The run's KL budget (nats per response; 0 = none).")
FRESHNESS_SECONDS = Histogram(
    "rlhf_trainer_feedback_freshness_seconds",
    "Time from a feedback event's arrival to the first served policy version whose reward model was trained on it.",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400))


_roles: dict[str, str] = {}


def _init_labels() -> None:
    """Every known label value exists from the start (0), so that rates and alerts see the series before the first
    event."""
    from rlhf.trainer.guards import GUARDS

    for guard in GUARDS:
        GUARD_TRIPS.labels(guard)
        GUARD_PAUSED.labels(guard).set(0)
    for outcome in ("promoted", "rolled_back"):
        CANARY_DECISIONS.labels(outcome)
    for reason in ("stale", "used_already", "unreadable", "other_run", "ahead", "other"):
        DROPPED_BATCHES.labels(reason)


_init_labels()


def set_role(role: str, version: str) -> None:
    """``version`` is now the one with ``role`` (learner, stable, canary): the info gauge follows."""
    old = _roles.pop(role, None)
    if old is not None:
        POLICY_VERSION.remove(old, role)
    if version:
        _roles[role] = version
        POLICY_VERSION.labels(version, role).set(1)
