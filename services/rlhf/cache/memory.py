"""The cache in process memory, for embedded mode and tests: TTLs, LRU eviction, Redis's semantics.

Semantics shared with :class:`rlhf.cache.redis.RedisCache` (tests/unit/test_memory_cache.py and
tests/integration/test_redis_cache.py run one contract against both): keys are str, values bytes; a TTL is a
positive number of seconds or None; an expired key is absent for every method (``set_if_absent`` stores over it,
``delete`` reports False); ``set`` clears a previous TTL; ``set_if_absent`` is atomic.

Bounded: at most ``max_entries`` keys; storing one more evicts the least recently used (read or written) key,
like Redis with ``maxmemory-policy allkeys-lru``. Guarded by one lock and never awaiting while holding it, so it is
safe from any number of threads and event loops.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from rlhf.cache.base import Cache, CacheError

DEFAULT_MAX_ENTRIES = 100_000
"""Default bound on the number of keys of an InMemoryCache (each entry costs about 200 bytes plus its value)."""


def check_key(key: str) -> str:
    if type(key) is not str:
        raise TypeError(f"cache keys are str, got {type(key).__name__}")
    if not key:
        raise ValueError("cache key must not be empty")
    return key


def check_value(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"cache values are bytes, got {type(value).__name__}")
    return bytes(value)


def check_ttl(ttl_s: float | None) -> float | None:
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
    return float(ttl_s)


class InMemoryCache(Cache):
    """:class:`Cache` in a bounded LRU dict with per-key expiry."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()  # key -> (value, expires_at)
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"InMemoryCache({len(self._data)}/{self.max_entries} entries)"

    def __len__(self) -> int:
        """Keys held, counting expired ones not yet dropped."""
        return len(self._data)

    # -- under the lock

    def _live(self, key: str, now: float) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and expires_at <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def _store(self, key: str, value: bytes, ttl_s: float | None, now: float) -> None:
        self._data[key] = (value, None if ttl_s is None else now + ttl_s)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CacheError(f"{what} on a closed cache")

    # -- Cache

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open("get")
            return self._live(key, time.monotonic())

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if isinstance(keys, str):
            raise TypeError("get_many takes a sequence of keys, not one str")
        for k in keys:
            check_key(k)
        with self._lock:
            self._check_open("get_many")
            now = time.monotonic()
            return [self._live(k, now) for k in keys]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        check_key(key)
        value, ttl_s = check_value(value), check_ttl(ttl_s)
        with self._lock:
            self._check_open("set")
            self._store(key, value, ttl_s, time.monotonic())

    async def set_many(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> None:
        if not isinstance(items, Mapping):
            raise TypeError(f"set_many takes a mapping of key -> bytes, got {type(items).__name__}")
        checked = [(check_key(k), check_value(v)) for k, v in items.items()]
        ttl_s = check_ttl(ttl_s)
        with self._lock:
            self._check_open("set_many")
            now = time.monotonic()
            for k, v in checked:
                self._store(k, v, ttl_s, now)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        check_key(key)
        value, ttl_s = check_value(value), check_ttl(ttl_s)
        with self._lock:
            self._check_open("set_if_absent")
            now = time.monotonic()
            if self._live(key, now) is not None:
                return False
            self._store(key, value, ttl_s, now)
            return True

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> list[bool]:
        if not isinstance(items, Mapping):
            raise TypeError(f"set_many_if_absent takes a mapping of key -> bytes, got {type(items).__name__}")
        checked = [(check_key(k), check_value(v)) for k, v in items.items()]
        ttl_s = check_ttl(ttl_s)
        with self._lock:
            self._check_open("set_many_if_absent")
            now = time.monotonic()
            stored = []
            for k, v in checked:
                absent = self._live(k, now) is None
                if absent:
                    self._store(k, v, ttl_s, now)
                stored.append(absent)
            return stored

    async def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            self._check_open("delete")
            existed = self._live(key, time.monotonic()) is not None
            self._data.pop(key, None)
            return existed

    async def ping(self) -> None:
        self._check_open("ping")

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data.clear()
