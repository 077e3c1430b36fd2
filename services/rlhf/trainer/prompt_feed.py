"""Feeds a worker's prompt pool from the bus: ``rlhf.prompts.v1`` (prompts for RL) and ``rlhf.responses.v1``
(the prompts of served traffic, but not of the products in ``exclude_products``: evaluation traffic, opt-outs).

The topics are the durable store of prompts: a worker reads them from the start each time it starts (a reader outside
any consumer group, ``Bus.reader``, like the model-event followers), so a worker that crashed loses no prompt, and
workers need not share a position. Only plain prompts are taken from served traffic (``input_prompt``: what the product sent,
before the serving policy's template); conversations are skipped.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence

from rlhf.bus import topics
from rlhf.bus.base import Bus, Message
from rlhf.bus.follower import TopicFollower
from rlhf.trainer.rollouts import PoolPrompt, PromptPool, prompt_id_of
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


def prompts_of(messages: Iterable[Message], exclude_products: frozenset[str] = frozenset()) -> list[PoolPrompt]:
    """The pool prompts in a batch of records of the two topics (unreadable or unusable records are skipped)."""
    out: list[PoolPrompt] = []
    for m in messages:
        try:
            if m.topic == topics.PROMPTS:
                record = events_pb2.PromptRecord.FromString(m.value)
                if record.WhichOneof("input") == "prompt" and record.prompt.strip():
                    out.append(PoolPrompt(record.prompt_id or prompt_id_of(record.prompt), record.prompt, "dataset"))
            elif m.topic == topics.RESPONSES:
                served = events_pb2.ServedResponse.FromString(m.value)
                if served.product in exclude_products or not served.input_prompt.strip():
                    continue
                out.append(PoolPrompt(prompt_id_of(served.input_prompt), served.input_prompt, "served"))
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: a record that is not ours is skipped
            log.debug("unreadable record at %s[%d]@%d skipped", m.topic, m.partition, m.offset)
    return out


class PromptFeed(TopicFollower):
    """A thread that adds the topics' prompts to ``pool`` until stopped; retries while the bus is down."""

    thread_name = "prompt-feed"

    def __init__(self, bus: Bus, pool: PromptPool, *, exclude_products: Iterable[str] = (),
                 group_prefix: str = "rlhf-rollouts", served: bool = True, retry_s: float = 2.0) -> None:
        super().__init__(bus, [topics.PROMPTS, topics.RESPONSES] if served else [topics.PROMPTS],
                         client_id=f"{group_prefix}.{uuid.uuid4().hex[:8]}", max_records=2000, retry_s=retry_s)
        self.pool = pool
        self.exclude = frozenset(p for p in exclude_products if p)
        self.records = 0

    @property
    def group(self) -> str:
        """The reader's name (its Kafka client id)."""
        return self.client_id

    def handle(self, messages: Sequence[Message]) -> bool:
        self.records += len(messages)
        self.pool.add(prompts_of(messages, self.exclude))
        return True
