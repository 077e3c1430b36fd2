"""The cache key layout shared by the services (one place, so a writer and a reader never disagree).

Keys are plain strings; the cache adds its own prefix (e.g. ``rlhf:``).
"""
from __future__ import annotations

import hashlib


def served_response(response_id: str) -> str:
    """A serialized ``rlhf.v1.ServedResponse``, written by the policy service with a TTL."""
    return f"resp:{response_id}"


def feedback_idempotency(event_id: str) -> str:
    """State of a feedback event: ``pending:<replica>`` while being published, ``done`` after."""
    return f"fb:idem:{event_id}"


def reward_score(reward_model_version: str, prompt: str, response: str) -> str:
    """A cached reward score of (prompt, response) under one reward-model version."""
    digest = hashlib.sha256(f"{len(prompt)}:{prompt}{response}".encode()).hexdigest()[:32]
    return f"score:{reward_model_version}:{digest}"


def rollout_batch(run_id: str, step: int) -> str:
    """A serialized rollout batch of a PPO run."""
    return f"rollout:{run_id}:{step}"
