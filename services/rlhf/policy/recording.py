"""Every served response, recorded off the request's path: a cache record with a TTL (``keys.served_response``, which
the feedback service joins late feedback on) and an event on ``rlhf.responses.v1`` keyed by response id.

``record`` only puts the record on a bounded queue (no I/O, no await); a background task writes batches: one cache
round trip per batch, the bus sends in flight together. A full queue or a failed write is counted
(``rlhf_policy_record_failures_total{sink}``) and logged, never raised: serving goes on without the records.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from rlhf import keys
from rlhf.bus import topics
from rlhf.bus.base import Bus
from rlhf.cache.base import Cache
from rlhf.policy import metrics
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


class ResponseRecorder:
    def __init__(self, bus: Bus, cache: Cache, *, ttl_s: float, queue_size: int = 10000, batch_size: int = 256,
                 write_timeout_s: float = 30.0) -> None:
        self.bus = bus
        self.cache = cache
        self.ttl_s = ttl_s
        self.batch_size = batch_size
        self.write_timeout_s = write_timeout_s
        self._queue: asyncio.Queue[events_pb2.ServedResponse] = asyncio.Queue(queue_size)
        self._task: asyncio.Task | None = None
        self._warned = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="record-responses")

    def record(self, response: events_pb2.ServedResponse) -> None:
        """Queue a served response; never blocks and never raises."""
        try:
            self._queue.put_nowait(response)
        except asyncio.QueueFull:
            metrics.RECORD_FAILURES.labels("queue").inc()
            if not self._warned:
                self._warned = True
                log.warning("served-response queue full (%d): records are dropped until it drains",
                            self._queue.maxsize)
            return
        metrics.RECORD_QUEUE.set(self._queue.qsize())

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            metrics.RECORD_QUEUE.set(self._queue.qsize())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[events_pb2.ServedResponse]) -> None:
        payloads = [(r.response_id, r.SerializeToString()) for r in batch]

        async def to_cache() -> None:
            try:
                await asyncio.wait_for(
                    self.cache.set_many({keys.served_response(rid): value for rid, value in payloads}, ttl_s=self.ttl_s),
                    self.write_timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - counted, never fatal
                metrics.RECORD_FAILURES.labels("cache").inc(len(payloads))
                log.warning("%d served-response records not cached: %s", len(payloads), e)
            else:
                metrics.RECORDS.labels("cache").inc(len(payloads))

        async def to_bus(rid: str, value: bytes) -> None:
            try:
                await asyncio.wait_for(self.bus.publish(topics.RESPONSES, value, key=rid.encode()), self.write_timeout_s)
            except Exception as e:  # noqa: BLE001 - counted, never fatal
                metrics.RECORD_FAILURES.labels("bus").inc()
                log.warning("served response %s not published to %s: %s", rid, topics.RESPONSES, e)
            else:
                metrics.RECORDS.labels("bus").inc()

        await asyncio.gather(to_cache(), *(to_bus(rid, value) for rid, value in payloads))
        self._warned = False

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        if self._queue.qsize():
            metrics.RECORD_FAILURES.labels("queue").inc(self._queue.qsize())
            log.warning("%d served responses not recorded at shutdown", self._queue.qsize())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
