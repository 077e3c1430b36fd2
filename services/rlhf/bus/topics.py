"""The platform's topic names, in one place (see DESIGN.md, "Topics")."""
from __future__ import annotations

from rlhf.bus.base import TopicSpec

RESPONSES = "rlhf.responses.v1"
"""Every served response (key: response id)."""
FEEDBACK = "rlhf.feedback.v1"
"""Validated feedback events (key: prompt id)."""
FEEDBACK_DLQ = "rlhf.feedback.v1.dlq"
"""Feedback events that could not be used, with the reason (key: event id)."""
PROMPTS = "rlhf.prompts.v1"
"""Prompts for RL rollouts (key: prompt id)."""
MODELS = "rlhf.models.v1"
"""Policy / reward-model versions published, promoted or rolled back (key: model name)."""

ALL = (RESPONSES, FEEDBACK, FEEDBACK_DLQ, PROMPTS, MODELS)


def platform_topics(partitions: int = 3, replication_factor: int = 1) -> list[TopicSpec]:
    """The specs of every platform topic, for ``Bus.ensure_topics``.

    ``partitions`` bounds the parallelism of one consumer group. ``rlhf.models.v1`` always gets one partition: model
    events are rare and every consumer must see them in one total order (publish, promote, roll back).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")
    return [
        TopicSpec(name, partitions=1 if name == MODELS else partitions, replication_factor=replication_factor)
        for name in ALL
    ]
