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
