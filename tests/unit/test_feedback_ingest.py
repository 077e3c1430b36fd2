"""The feedback ingestor on the in-process bus and cache: concurrent batches share their cache calls (group
commit) and keep every guarantee (one outcome per event, duplicates published once, records in the topic)."""
from __future__ import annotations

import asyncio
import collections
import time

from support.feedback_cases import thumbs_up, valid_events
from unit.test_memory_bus import poll_until

from rlhf.bus import InMemoryBus, topics
from rlhf.cache.memory import InMemoryCache
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.ingest import ACCEPTED, DUPLICATE, REJECTED, FeedbackIngestor
from rlhf.v1 import events_pb2


class SlowCountingCache(InMemoryCache):
    """An in-process cache whose batch calls take a round trip's time and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    async def set_many_if_absent(self, items, ttl_s=None):  # type: ignore[no-untyped-def]
        self.calls["claim"] += 1
        await asyncio.sleep(0.005)
        return await super().set_many_if_absent(items, ttl_s)

    async def get_many(self, keys):  # type: ignore[no-untyped-def]
        self.calls["lookup"] += 1
        await asyncio.sleep(0.005)
        return await super().get_many(keys)

    async def set_many(self, items, ttl_s=None):  # type: ignore[no-untyped-def]
        self.calls["mark"] += 1
        await asyncio.sleep(0.005)
        return await super().set_many(items, ttl_s)


def test_concurrent_batches_share_cache_calls_and_keep_their_outcomes() -> None:
    bus, cache = InMemoryBus(), SlowCountingCache()
    ingestor = FeedbackIngestor(bus, cache, FeedbackConfig(cache_calls_in_flight=1))
    now = time.time()
    batches = [[thumbs_up(now, rid=f"r{b}-{i}") for i in range(5)] + valid_events(now) for b in range(20)]
    bad = thumbs_up(now)
    bad.event_id = "not an id!"
    batches[3].append(bad)

    async def main() -> tuple[list, list]:
        first = await asyncio.gather(*(ingestor.submit_batch(b) for b in batches))
        again = await asyncio.gather(*(ingestor.submit_batch(b) for b in batches))
        return first, again

    first, again = asyncio.run(main())
    for batch, outcomes in zip(batches, first):
        assert len(outcomes) == len(batch)
        assert [o.status for o in outcomes] == [REJECTED if e is bad else ACCEPTED for e in batch]
    for batch, outcomes in zip(batches, again):
        assert [o.status for o in outcomes] == [REJECTED if e is bad else DUPLICATE for e in batch]
    # 40 batches, but far fewer calls per step: the batches waiting behind a call went together in the next one
    assert cache.calls["claim"] <= 10 and cache.calls["mark"] <= 8 and cache.calls["lookup"] <= 5, cache.calls
    sent = [e.event_id for b in batches for e in b if e is not bad]
    with bus.consumer([topics.FEEDBACK], "check") as consumer:
        got = poll_until(consumer, len(sent))
    assert sorted(events_pb2.FeedbackRecord.FromString(m.value).event.event_id for m in got) == sorted(sent)
