"""RedisCache against a real Redis (deploy/local/infra.py's, or RLHF_REDIS_URL): the cache contract shared with the
in-memory cache, then what only a real server shows (keys and TTLs on the server, unreachable or silent servers).
"""
from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from rlhf.cache import RedisCache, RedisConfig, cache_from_url
from rlhf.cache.base import Cache, CacheError, CacheUnavailable
from unit.test_memory_cache import CacheContract


class TestRedisCacheContract(CacheContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"  # no collisions with other tests or sessions

    def make_cache(self) -> Cache:
        return RedisCache(RedisConfig(url=self.redis_url, key_prefix=self.prefix))


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client, to look at what RedisCache wrote."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_keys_are_prefixed_and_ttls_are_set_on_the_server(redis_url: str, prefix: str, server: redis.Redis) -> None:
    async def main() -> None:
        cache = RedisCache(RedisConfig(url=redis_url, key_prefix=prefix))
        try:
            await cache.set("a", b"1", ttl_s=30)
            await cache.set_many({"b": b"2", "c": b"3"}, ttl_s=0.25)
            await cache.set_if_absent("d", b"4")
        finally:
            await cache.close()

    asyncio.run(main())
    assert server.get(prefix + "a") == b"1"
    assert 29_000 < server.pttl(prefix + "a") <= 30_000
    assert 0 < server.pttl(prefix + "b") <= 250
    assert server.ttl(prefix + "d") == -1  # no expiry
    assert server.get("a") is None


def test_commands_packed_by_hiredis_reach_the_server_byte_for_byte(
    redis_url: str, prefix: str, server: redis.Redis
) -> None:
    """RedisCache packs commands with hiredis (rlhf.cache.redis._HiredisPacking): str, int, bytes, bytearray and
    memoryview arguments arrive as redis-py's own packer would send them, and a type Redis cannot take is refused
    with redis-py's DataError, not sent."""
    binary = bytes(range(256))

    async def main() -> None:
        cache = RedisCache(RedisConfig(url=redis_url, key_prefix=prefix))
        try:
            assert cache._r.connection_pool.connection_class.__name__.startswith("HiredisPacking")
            await cache.set("plain", binary, ttl_s=30)
            await cache.set_many({"ba": bytearray(b"\x00ba"), "mv": memoryview(b"\xffmv"), "é-key": b"u"}, ttl_s=30)
            assert await cache.set_many_if_absent({"ba": b"x", "new": b"y"}, ttl_s=30) == [False, True]
            with pytest.raises(redis.DataError):
                await cache._r.set(prefix + "bool", True)
        finally:
            await cache.close()

    asyncio.run(main())
    assert server.get(prefix + "plain") == binary
    assert [server.get(prefix + k) for k in ("ba", "mv", "é-key", "new")] == [b"\x00ba", b"\xffmv", b"u", b"y"]
    assert 0 < server.pttl(prefix + "mv") <= 30_000
    assert server.get(prefix + "bool") is None


def test_cache_from_url_takes_our_fields_and_leaves_redis_ones(redis_url: str, prefix: str,
                                                               server: redis.Redis) -> None:
    url = f"{redis_url}?key_prefix={prefix}&socket_timeout_s=0.5&health_check_interval=30"
    cache = cache_from_url(url)
    assert isinstance(cache, RedisCache)
    assert cache.config.key_prefix == prefix and cache.config.socket_timeout_s == 0.5
    assert "health_check_interval=30" in cache.config.url and "key_prefix" not in cache.config.url

    async def main() -> None:
        try:
            await cache.set("via-url", b"ok")
        finally:
            await cache.close()

    asyncio.run(main())
    assert server.get(prefix + "via-url") == b"ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


@pytest.mark.parametrize("where", ["dead port", "silent server"])
def test_unreachable_redis_raises_cache_unavailable_quickly(where: str, silent_server: int) -> None:
    port = free_port() if where == "dead port" else silent_server
    config = RedisConfig(url=f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.3, connect_timeout_s=0.3)

    async def main() -> None:
        cache = RedisCache(config)
        calls = [
            cache.ping(), cache.get("k"), cache.get_many(["a", "b"]), cache.set("k", b"v", ttl_s=5),
            cache.set_many({"a": b"1"}), cache.set_if_absent("k", b"v"), cache.delete("k"),
        ]
        try:
            for call in calls:
                t = time.monotonic()
                with pytest.raises(CacheUnavailable, match=f"127.0.0.1:{port}"):
                    await call
                assert time.monotonic() - t < 1.5
        finally:
            await cache.close()

    t = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t < 8


def test_error_reply_is_cache_error_not_unavailable(redis_url: str, prefix: str, server: redis.Redis) -> None:
    server.lpush(prefix + "a-list", b"x")  # GET on a list: WRONGTYPE

    async def main() -> None:
        cache = RedisCache(RedisConfig(url=redis_url, key_prefix=prefix))
        try:
            with pytest.raises(CacheError, match="WRONGTYPE") as err:
                await cache.get("a-list")
            assert not isinstance(err.value, CacheUnavailable)
            await cache.ping()  # the connection is still good
        finally:
            await cache.close()

    asyncio.run(main())
    server.delete(prefix + "a-list")


def test_pipelined_bulk_is_one_round_trip_fast(redis_url: str, prefix: str) -> None:
    async def main() -> float:
        cache = RedisCache(RedisConfig(url=redis_url, key_prefix=prefix))
        try:
            items = {f"bulk-{i}": b"%d" % i for i in range(10_000)}
            t = time.monotonic()
            await cache.set_many(items, ttl_s=60)
            values = await cache.get_many(list(items))
            elapsed = time.monotonic() - t
            assert values == list(items.values())
            return elapsed
        finally:
            await cache.close()

    assert asyncio.run(main()) < 5.0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisConfig(url="http://localhost:6379")
    with pytest.raises(ValueError, match="socket_timeout_s"):
        RedisConfig(socket_timeout_s=0)
    with pytest.raises(ValueError, match="not a float"):
        RedisConfig.from_url("redis://h:1/0?socket_timeout_s=soon")
