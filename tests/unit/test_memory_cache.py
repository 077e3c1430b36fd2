"""The in-process cache: the cache contract (shared with the real-Redis tests) plus what only it has.

``CacheContract`` is the behaviour every Cache keeps; tests/integration/test_redis_cache.py runs the same class
against a real Redis. Each test runs its coroutine with ``run``, on a cache made inside that event loop.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rlhf.cache import InMemoryCache, cache_from_url
from rlhf.cache.base import Cache, CacheError

Body = Callable[[Cache], Awaitable[Any]]


class CacheContract:
    """What every Cache implementation does. Subclasses provide ``make_cache`` (called inside the event loop)."""

    def make_cache(self) -> Cache:
        raise NotImplementedError

    @pytest.fixture
    def run(self) -> Callable[[Body], Any]:
        def run(body: Body) -> Any:
            async def main() -> Any:
                cache = self.make_cache()
                try:
                    return await body(cache)
                finally:
                    await cache.close()

            return asyncio.run(main())

        return run

    def test_get_set_overwrite_delete(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            assert await c.get("k") is None
            await c.set("k", b"v1")
            assert await c.get("k") == b"v1"
            await c.set("k", bytearray(b"v2"))
            assert await c.get("k") == b"v2"
            assert await c.delete("k") is True
            assert await c.delete("k") is False
            assert await c.get("k") is None
            await c.set("empty", b"")
            assert await c.get("empty") == b""
            await c.set("ünï/cödé key:1", b"\x00\xff")
            assert await c.get("ünï/cödé key:1") == b"\x00\xff"

        run(body)

    def test_ttl_expires_and_set_without_ttl_clears_it(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            await c.set("short", b"v", ttl_s=0.2)
            await c.set("cleared", b"v", ttl_s=0.2)
            await c.set("cleared", b"v2")  # a plain SET drops the TTL, as in Redis
            await c.set("long", b"v", ttl_s=60)
            assert await c.get("short") == b"v"
            await asyncio.sleep(0.35)
            assert await c.get("short") is None
            assert await c.delete("short") is False
            assert await c.get("cleared") == b"v2"
            assert await c.get("long") == b"v"

        run(body)

    def test_get_many_and_set_many(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            assert await c.get_many([]) == []
            await c.set_many({})
            await c.set_many({f"k{i}": b"%d" % i for i in range(100)})
            await c.set_many({"t1": b"a", "t2": b"b"}, ttl_s=0.2)
            keys = ["k0", "missing", "k99", "t1", "k0"]
            assert await c.get_many(keys) == [b"0", None, b"99", b"a", b"0"]
            await asyncio.sleep(0.35)
            assert await c.get_many(["t1", "t2", "k5"]) == [None, None, b"5"]

        run(body)

    def test_set_if_absent(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            assert await c.set_if_absent("idem", b"first", ttl_s=0.2) is True
            assert await c.set_if_absent("idem", b"second") is False
            assert await c.get("idem") == b"first"
            await asyncio.sleep(0.35)
            assert await c.set_if_absent("idem", b"third") is True  # expired keys are absent
            assert await c.get("idem") == b"third"
            await c.delete("idem")
            assert await c.set_if_absent("idem", b"fourth") is True

        run(body)

    def test_set_many_if_absent(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            assert await c.set_many_if_absent({}) == []
            await c.set("taken", b"old")
            flags = await c.set_many_if_absent({"new-1": b"1", "taken": b"x", "new-2": b"2"}, ttl_s=0.2)
            assert flags == [True, False, True]
            assert await c.get_many(["new-1", "taken", "new-2"]) == [b"1", b"old", b"2"]
            await asyncio.sleep(0.35)
            assert await c.set_many_if_absent({"new-1": b"again", "taken": b"y"}) == [True, False]
            assert await c.get_many(["new-1", "taken", "new-2"]) == [b"again", b"old", None]
            with pytest.raises(TypeError):
                await c.set_many_if_absent({"ok": b"v", "bad": "text"})  # type: ignore[dict-item]
            assert await c.get("ok") is None  # checked before anything is written

        run(body)

    def test_set_if_absent_has_one_winner_under_concurrency(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            for round_ in range(5):
                key = f"race-{round_}"
                results = await asyncio.gather(*(c.set_if_absent(key, b"%d" % i, ttl_s=30) for i in range(50)))
                assert results.count(True) == 1
                winner = results.index(True)
                assert await c.get(key) == b"%d" % winner

        run(body)

    def test_ping(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            await c.ping()

        run(body)

    def test_bad_input_raises_at_once(self, run: Callable[[Body], Any]) -> None:
        async def body(c: Cache) -> None:
            with pytest.raises(TypeError):
                await c.set("k", "text")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await c.set(b"k", b"v")  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                await c.set("", b"v")
            for ttl in (0, -1, math.nan, math.inf, "5", True):
                with pytest.raises(ValueError):
                    await c.set("k", b"v", ttl_s=ttl)  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                await c.set_if_absent("k", b"v", ttl_s=0)
            with pytest.raises(TypeError):
                await c.get_many("abc")
            with pytest.raises(TypeError):
                await c.set_many([("k", b"v")])  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await c.set_many({"k": "text"})  # type: ignore[dict-item]
            assert await c.get("k") is None  # nothing was written by the rejected calls

        run(body)

    def test_closed_cache_raises_cache_error(self) -> None:
        async def main() -> None:
            c = self.make_cache()
            await c.set("k", b"v")
            await c.close()
            await c.close()  # idempotent
            with pytest.raises(CacheError):
                await c.get("k")
            with pytest.raises(CacheError):
                await c.set("k", b"v")

        asyncio.run(main())


class TestInMemoryCacheContract(CacheContract):
    def make_cache(self) -> Cache:
        return InMemoryCache()


# --------------------------------------------------------------------------------------------- in-memory only


def test_lru_eviction_keeps_the_recently_used() -> None:
    async def main() -> None:
        c = InMemoryCache(max_entries=3)
        await c.set("a", b"1")
        await c.set("b", b"2")
        await c.set("c", b"3")
        assert await c.get("a") == b"1"  # a is now the most recently used
        await c.set("d", b"4")  # evicts b, the least recently used
        assert await c.get_many(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]
        assert len(c) == 3
        assert await c.set_if_absent("e", b"5") is True
        assert len(c) == 3 and await c.get("a") is None  # a was the least recently used after the get_many

    asyncio.run(main())


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryCache(max_entries=0)


def test_safe_from_many_threads_and_loops() -> None:
    cache = InMemoryCache(max_entries=10_000)
    winners: list[int] = []

    def worker(n: int) -> None:
        async def main() -> None:
            for i in range(200):
                await cache.set(f"{n}-{i}", b"%d" % i, ttl_s=60)
                if await cache.set_if_absent("shared", b"%d" % n):
                    winners.append(n)
            assert await cache.get_many([f"{n}-{i}" for i in range(200)]) == [b"%d" % i for i in range(200)]

        asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(cache) == 8 * 200 + 1


def test_ttl_uses_a_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        c = InMemoryCache()
        await c.set("k", b"v", ttl_s=10)
        monkeypatch.setattr(time, "time", lambda: 0.0)  # wall-clock jumps do not expire entries
        assert await c.get("k") == b"v"

    asyncio.run(main())


def test_cache_from_url() -> None:
    assert isinstance(cache_from_url("memory://"), InMemoryCache)
    assert cache_from_url("memory://?max_entries=7").max_entries == 7  # type: ignore[attr-defined]
    shared = cache_from_url("memory://embedded-test")
    assert cache_from_url("memory://embedded-test") is shared
    with pytest.raises(ValueError, match="unknown cache URL"):
        cache_from_url("memcached://localhost")
    with pytest.raises(ValueError, match="max_entries"):
        cache_from_url("memory://?max_entries=many")
    with pytest.raises(ValueError, match="unknown memory cache option"):
        cache_from_url("memory://?size=3")
