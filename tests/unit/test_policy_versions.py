"""Version swaps in the policy manager and recording of served responses, over a fake backend and the in-process
bus and cache: load → ready → switch → drain (in-flight requests finish on the old version) → unload; a failed load
changes nothing; recording failures are counted, never raised."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from rlhf import keys
from rlhf.bus import topics
from rlhf.bus.memory import InMemoryBus
from rlhf.cache.base import CacheUnavailable
from rlhf.cache.memory import InMemoryCache
from rlhf.policy.backend import Generation, LoadedModel, PolicyBackend
from rlhf.policy.manager import PolicyManager
from rlhf.policy.recording import ResponseRecorder
from rlhf.serving.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from rlhf.v1 import common_pb2, events_pb2, policy_pb2


class FakeModel(LoadedModel):
    backend = "fake"
    tokenizer = None
    context = 0

    def __init__(self, version: str, log: list[str]) -> None:
        self.version = version
        self.log = log

    def generate(self, rows, *, stream, deadline=None) -> Generation:  # pragma: no cover - not used here
        raise NotImplementedError

    async def unload(self) -> None:
        self.log.append(f"unload {self.version}")


class FakeBackend(PolicyBackend):
    name = "fake"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, loads wait for it

    async def load(self, version, path) -> LoadedModel:
        if "broken" in path:
            raise RuntimeError(f"no weights at {path}")
        if self.gate is not None:
            await self.gate.wait()
        self.log.append(f"load {version.version}")
        return FakeModel(version.version, self.log)


def mv(version: str, uri: str | None = None) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(name="policy", version=version, kind=common_pb2.MODEL_KIND_POLICY,
                                   uri=uri if uri is not None else f"/models/{version}")


def manager(backend: FakeBackend, **kwargs) -> PolicyManager:
    return PolicyManager(backend, artifact_root="/models", drain_timeout_s=kwargs.pop("drain_timeout_s", 5), **kwargs)


def test_swap_drains_in_flight_requests_before_unloading():
    async def main():
        backend = FakeBackend()
        m = manager(backend)
        await m.load(mv("v1"), 100)
        lease = m.acquire("user-1")  # a request in flight on v1
        assert lease.version == "v1"
        await m.load(mv("v2"), 100)
        assert m.acquire("user-2").version == "v2"  # routed after the switch
        await asyncio.sleep(0.05)
        states = {p.version.version: p.state for p in m.describe().policies}
        assert states == {"v1": policy_pb2.POLICY_STATE_DRAINING, "v2": policy_pb2.POLICY_STATE_READY}
        assert "unload v1" not in backend.log  # still answering its request
        with pytest.raises(NotFound):
            m.acquire("user-3", pinned="v1")  # draining: no new requests
        lease.release()
        await asyncio.sleep(0.05)
        assert backend.log == ["load v1", "load v2", "unload v1"]
        assert [p.version.version for p in m.describe().policies] == ["v2"]
        assert m.describe().previous_version == "v1"

    asyncio.run(main())


def test_loading_version_is_visible_and_not_routed_until_ready():
    async def main():
        backend = FakeBackend()
        m = manager(backend)
        await m.load(mv("v1"), 100)
        backend.gate = asyncio.Event()
        loading = asyncio.create_task(m.load(mv("v2"), 100))
        await asyncio.sleep(0.02)
        states = {p.version.version: p.state for p in m.describe().policies}
        assert states["v2"] == policy_pb2.POLICY_STATE_LOADING
        assert m.acquire("anyone").version == "v1"
        backend.gate.set()
        await loading
        assert m.acquire("anyone").version == "v2"

    asyncio.run(main())


def test_a_failed_load_changes_nothing():
    async def main():
        backend = FakeBackend()
        m = manager(backend)
        await m.load(mv("v1"), 100)
        with pytest.raises(FailedPrecondition) as e:
            await m.load(mv("v2", uri="/models/broken"), 100)
        assert "v2" in str(e.value)
        assert m.acquire("anyone").version == "v1"
        assert [p.version.version for p in m.describe().policies] == ["v1"]

    asyncio.run(main())


def test_admin_errors_name_fields_and_no_policy_is_unavailable():
    async def main():
        m = manager(FakeBackend())
        with pytest.raises(Unavailable):
            m.acquire("anyone")
        with pytest.raises(Unavailable):
            await m.check()
        with pytest.raises(InvalidArgument) as e:
            await m.load(common_pb2.ModelVersion(uri="/x"), 100)
        assert e.value.field == "version.version"
        with pytest.raises(InvalidArgument) as e:
            await m.load(common_pb2.ModelVersion(version="v9"), 100)
        assert e.value.field == "version.uri"
        with pytest.raises(InvalidArgument) as e:
            await m.load(mv("v1"), 101)
        assert e.value.field == "traffic_percent"
        with pytest.raises(FailedPrecondition):
            await m.set_split("v5", 10)
        with pytest.raises(FailedPrecondition):
            await m.rollback()

    asyncio.run(main())


def test_rollback_reloads_the_previous_version_from_its_uri():
    async def main():
        backend = FakeBackend()
        m = manager(backend)
        await m.load(mv("v1"), 100)
        await m.load(mv("v2"), 100)
        await asyncio.sleep(0.02)
        await m.rollback()
        await asyncio.sleep(0.02)
        assert m.acquire("anyone").version == "v1"
        assert backend.log == ["load v1", "load v2", "unload v1", "load v1", "unload v2"]

    asyncio.run(main())


def test_events_of_other_models_are_ignored_and_a_history_loads_only_its_end():
    async def main():
        backend = FakeBackend()
        m = manager(backend, model_name="policy")
        other = events_pb2.ModelEvent(version=common_pb2.ModelVersion(name="reward", version="r1",
                                                                      kind=common_pb2.MODEL_KIND_REWARD, uri="/r1"),
                                      action=events_pb2.MODEL_ACTION_PUBLISHED, traffic_percent=100)
        history = [events_pb2.ModelEvent(version=mv(f"v{i}"), action=events_pb2.MODEL_ACTION_PUBLISHED,
                                         traffic_percent=100) for i in range(1, 6)]
        applied = await m.apply_events([other, *history])
        assert applied == 5
        assert backend.log == ["load v5"]
        assert m.acquire("anyone").version == "v5"

    asyncio.run(main())


# --------------------------------------------------------------------------------------------- recording


def sample(value: str) -> float:
    return REGISTRY.get_sample_value("rlhf_policy_record_failures_total", {"sink": value}) or 0.0


class DownCache(InMemoryCache):
    async def set_many(self, items, ttl_s=None):
        raise CacheUnavailable("switched off by the test")


def served(i: int) -> events_pb2.ServedResponse:
    return events_pb2.ServedResponse(response_id=f"resp-{i}", prompt_id="p", text=f"text {i}", policy_version="v1")


def test_served_responses_are_cached_with_a_ttl_and_published_keyed_by_response_id():
    async def main():
        bus, cache = InMemoryBus(), InMemoryCache()
        recorder = ResponseRecorder(bus, cache, ttl_s=60)
        recorder.start()
        for i in range(3):
            recorder.record(served(i))
        await recorder.close()
        values = await cache.get_many([keys.served_response(f"resp-{i}") for i in range(3)])
        assert [events_pb2.ServedResponse.FromString(v).text for v in values] == ["text 0", "text 1", "text 2"]
        with bus.consumer([topics.RESPONSES], "test") as consumer:
            messages = consumer.poll(1.0)
        assert sorted(m.key for m in messages) == [b"resp-0", b"resp-1", b"resp-2"]

    asyncio.run(main())


def test_recording_failures_are_counted_not_raised():
    async def main():
        bus, cache = InMemoryBus(), DownCache()
        before_cache, before_queue = sample("cache"), sample("queue")
        recorder = ResponseRecorder(bus, cache, ttl_s=60, queue_size=2)
        for i in range(3):  # not started yet: the third does not fit
            recorder.record(served(i))
        recorder.start()
        await recorder.close()
        assert sample("queue") - before_queue == 1
        assert sample("cache") - before_cache == 2
        with bus.consumer([topics.RESPONSES], "test") as consumer:
            assert len(consumer.poll(1.0)) == 2  # the bus still got them

    asyncio.run(main())
