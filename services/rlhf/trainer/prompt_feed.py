"""Feeds a worker's prompt pool from the bus: ``rlhf.prompts.v1`` (prompts for RL) and ``rlhf.responses.v1``
(the prompts of served traffic, but not of the products in ``exclude_products``: evaluation traffic, opt-outs).

The topics are the durable store of prompts: a worker reads them from the start each time it starts (a reader outside
any consumer group, ``Bus.reader``, like the model-event followers), so a worker that crashed loses no prompt, and
workers need not share a position. Only plain prompts are taken from served traffic (``input_prompt``: what the product sent,
before the serving policy's template); conversations are skipped.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable

from rlhf.bus import topics
from rlhf.bus.base import Bus, Consumer, Message
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


class PromptFeed:
    """A thread that adds the topics' prompts to ``pool`` until stopped; retries while the bus is down."""

    def __init__(self, bus: Bus, pool: PromptPool, *, exclude_products: Iterable[str] = (),
                 group_prefix: str = "rlhf-rollouts", served: bool = True, retry_s: float = 2.0) -> None:
        self.bus = bus
        self.pool = pool
        self.exclude = frozenset(p for p in exclude_products if p)
        self.group = f"{group_prefix}.{uuid.uuid4().hex[:8]}"
        """The reader's name (its Kafka client id); no consumer group is joined."""
        self._next: dict[tuple[str, int], int] = {}
        """Per partition, the offset after the last record taken: a reader made again after an error goes on there."""
        self.topics = [topics.PROMPTS, topics.RESPONSES] if served else [topics.PROMPTS]
        self.retry_s = retry_s
        self.records = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prompt-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer: Consumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self.bus.reader(self.topics, client_id=self.group, start_at=self._next)
                messages = consumer.poll(0.5, max_records=2000)
                if messages:
                    self.records += len(messages)
                    self.pool.add(prompts_of(messages, self.exclude))
                    for m in messages:
                        key = (m.topic, m.partition)
                        self._next[key] = max(self._next.get(key, 0), m.offset + 1)
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - the bus may be down: retry
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("prompt feed: %s; retrying in %.0fs", self.last_error, self.retry_s)
                if consumer is not None:
                    _close(consumer)
                    consumer = None
                self._stop.wait(self.retry_s)
        if consumer is not None:
            _close(consumer)


def _close(consumer: Consumer) -> None:
    try:
        consumer.close()
    except Exception:
        log.debug("closing the prompt consumer failed", exc_info=True)
