"""Dynamic batching of one reward model's forward passes on a dedicated thread.

Items (one (prompt, response) pair each, already tokenized) of any number of concurrent calls wait in length buckets;
the engine thread runs one forward pass at a time:

1. wait for a first item; when the model was idle, up to ``max_wait_s`` more for others (or a full batch);
2. take the bucket whose oldest item waited longest and up to ``max_batch_size`` of its items, oldest first, so one
   pass holds items whose lengths are within ``bucket_ratio`` of each other (padding below that share); items whose
   deadline passed while queued, or whose call was cancelled, leave without being scored;
3. one forward pass over them (right-padded, exactly ``RewardModel.collate``: an item's score does not depend on its
   neighbours), and the scores go back to the event loop with one ``call_soon_threadsafe`` per pass.

A call's items are queued either with one future each (:meth:`ScoringEngine.submit`) or with one future for the whole
call (:meth:`ScoringEngine.submit_call`: the reward service's path, no per-item futures, callbacks or gathering on the
event loop); cancelling that future takes the call's queued items out of later passes.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from rlhf.core.models import RewardInput, RewardModel

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` items already."""


class EngineStopped(Exception):
    """The engine is stopping or stopped."""


class Expired(Exception):
    """The item's deadline passed before a forward pass took it."""


class _Call:
    """The items of one :meth:`ScoringEngine.submit_call`: one future, resolved with every score (in item order) or the
    first error of any of its items."""

    __slots__ = ("future", "scores", "left")

    def __init__(self, future: asyncio.Future, count: int) -> None:
        self.future = future
        self.scores: list[float] = [0.0] * count
        self.left = count

    def cancelled(self) -> bool:  # as asyncio.Future.cancelled for the engine thread: nobody waits for it any more
        return self.future.done()


@dataclasses.dataclass(eq=False, slots=True)
class Job:
    """One item waiting for its score; the future (the item's own, or its call's) belongs to the event loop."""

    item: RewardInput
    future: asyncio.Future | _Call
    deadline: float | None  # time.monotonic()
    seq: int
    index: int = 0
    """The item's place in its call (a _Call's job)."""


@dataclasses.dataclass
class EngineMetrics:
    """Prometheus children for one engine; any may be None."""

    batch_size: Any = None  # Histogram: items per pass
    forward_seconds: Any = None  # Histogram
    padding: Any = None  # Histogram: padding share of a pass
    queue_depth: Any = None  # Gauge (shared by every engine of the process)


def bucket_of(length: int, ratio: float) -> int:
    """The length bucket of a ``length``-token item: lengths in [ratio**b, ratio**(b+1)) share bucket b."""
    return int(math.log(max(length, 1)) / math.log(ratio))


class ScoringEngine:
    """Scores items of one reward model in dynamic, length-bucketed batches on its own thread."""

    def __init__(self, reward_model: RewardModel, *, loop: asyncio.AbstractEventLoop, name: str = "reward",
                 max_batch_size: int = 64, max_wait_s: float = 0.002, max_queue: int = 8192,
                 bucket_ratio: float = 2.0, metrics: EngineMetrics | None = None) -> None:
        self.reward_model = reward_model
        self.loop = loop
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.bucket_ratio = bucket_ratio
        self.metrics = metrics or EngineMetrics()
        self._buckets: dict[int, collections.deque[Job]] = collections.defaultdict(collections.deque)
        self._pending = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"score-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ event loop side

    def submit(self, items: Sequence[RewardInput], deadline: float | None = None) -> list[asyncio.Future]:
        """Queue ``items``; one future per item, resolved with its score (float) on the engine's loop."""
        futures = [self.loop.create_future() for _ in items]
        self._queue([(item, future, 0) for item, future in zip(items, futures, strict=True)], deadline)
        return futures

    def submit_call(self, items: Sequence[RewardInput], deadline: float | None = None) -> asyncio.Future:
        """Queue ``items`` of one call; one future, resolved on the engine's loop with their scores (floats, in item
        order) once all are scored, or failed with the first error of any of them (Expired, EngineStopped, a failed
        forward pass). Cancelling it drops the items that still wait."""
        future = self.loop.create_future()
        if not items:
            future.set_result([])
            return future
        call = _Call(future, len(items))
        self._queue([(item, call, i) for i, item in enumerate(items)], deadline)
        return future

    def _queue(self, entries: list[tuple[RewardInput, Any, int]], deadline: float | None) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped("this reward-model version is being unloaded")
            if self._pending + len(entries) > self.max_queue:
                raise QueueFull(f"{self._pending} items are waiting to be scored (max_queue {self.max_queue})")
            buckets, ratio, seq = self._buckets, self.bucket_ratio, self._seq
            for item, future, index in entries:
                buckets[bucket_of(item.length, ratio)].append(Job(item, future, deadline, next(seq), index))
            self._pending += len(entries)
            self._gauge(len(entries))
            self._cond.notify()

    @property
    def pending(self) -> int:
        return self._pending

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking items, finish the pass that runs, fail what still waits (EngineStopped); blocking."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------------------------------ engine thread

    def _gauge(self, delta: int) -> None:
        if self.metrics.queue_depth is not None:
            self.metrics.queue_depth.inc(delta)

    def _run(self) -> None:
        idle = True
        while True:
            with self._cond:
                while self._pending == 0 and not self._stopping:
                    self._cond.wait()
                    idle = True
                if self._stopping:
                    break
                if idle and self.max_wait_s > 0:
                    # 1. the model was idle: give the first item's neighbours a moment to arrive
                    until = time.monotonic() + self.max_wait_s
                    while self._pending < self.max_batch_size and not self._stopping:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._stopping:
                        break
                jobs, dropped = self._take()
            idle = False
            self._resolve_dropped(dropped)
            if jobs:
                self._forward(jobs)
        self._fail_all(EngineStopped("this reward-model version was unloaded before the item was scored; retry"))

    def _take(self) -> tuple[list[Job], list[tuple[Job, BaseException]]]:
        """2. the oldest item's bucket, up to max_batch_size live items of it. Called with the lock held."""
        now = time.monotonic()
        jobs: list[Job] = []
        dropped: list[tuple[Job, BaseException]] = []
        taken = 0
        while not jobs and self._pending:
            key = min((b for b, q in self._buckets.items() if q), key=lambda b: self._buckets[b][0].seq)
            queue = self._buckets[key]
            while queue and len(jobs) < self.max_batch_size:
                job = queue.popleft()
                self._pending -= 1
                taken += 1
                if job.future.cancelled():
                    continue
                if job.deadline is not None and job.deadline <= now:
                    dropped.append((job, Expired("the deadline passed before the item was scored")))
                    continue
                jobs.append(job)
            if not queue:
                del self._buckets[key]
        self._gauge(-taken)
        return jobs, dropped

    def _forward(self, jobs: list[Job]) -> None:
        """3. one forward pass; results (or the error) go back to the loop."""
        version_metrics = self.metrics
        started = time.perf_counter()
        try:
            inputs = self._collate([j.item for j in jobs])
            with torch.inference_mode():
                scores = self.reward_model(**inputs).float().cpu().tolist()  # (B,)
        except Exception as e:  # noqa: BLE001 - every item of the pass fails with the cause; the engine goes on
            log.exception("a forward pass of %d items failed", len(jobs))
            self._post([(j, e) for j in jobs])
            return
        if version_metrics.forward_seconds is not None:
            version_metrics.forward_seconds.observe(time.perf_counter() - started)
        if version_metrics.batch_size is not None:
            version_metrics.batch_size.observe(len(jobs))
        if version_metrics.padding is not None:
            width = max(j.item.length for j in jobs)
            version_metrics.padding.observe(1.0 - sum(j.item.length for j in jobs) / (width * len(jobs)))
        self._post(list(zip(jobs, scores, strict=True)))

    def _collate(self, rows: list[RewardInput]) -> dict[str, torch.Tensor]:
        """``RewardModel.collate``: for a causal model the same tensors built from padded lists in one ``torch.tensor``
        each (not one per row); an encoder's through the tokenizer's own ``pad``, as the core does."""
        model = self.reward_model
        pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        if not isinstance(model, RewardModel) or model.pair_input or pad is None:
            return model.collate(rows)
        lengths = [len(r.features["input_ids"]) for r in rows]
        width = max(lengths)
        input_ids = torch.tensor([r.features["input_ids"] + [pad] * (width - n) for r, n in zip(rows, lengths)],
                                 dtype=torch.long)
        attention_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long)
        device = model.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def _resolve_dropped(self, dropped: list[tuple[Job, BaseException]]) -> None:
        if dropped:
            self._post(dropped)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            rest = [job for queue in self._buckets.values() for job in queue]
            self._buckets.clear()
            self._gauge(-self._pending)
            self._pending = 0
        if rest:
            self._post([(job, error) for job in rest])

    def _post(self, results: list[tuple[Job, Any]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, results)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass


def _deliver(results: list[tuple[Job, Any]]) -> None:
    for job, result in results:
        sink = job.future
        if isinstance(sink, _Call):
            future = sink.future
            if future.done():  # cancelled, or failed by another of its items
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
                continue
            sink.scores[job.index] = result
            sink.left -= 1
            if sink.left == 0:
                future.set_result(sink.scores)
            continue
        if sink.done():
            continue
        if isinstance(result, BaseException):
            sink.set_exception(result)
        else:
            sink.set_result(result)
