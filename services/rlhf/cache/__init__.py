"""The cache: :class:`Cache`, a Redis implementation and an in-process one, and ``cache_from_url``.

Importing this package does not import redis-py; ``RedisCache`` / ``RedisConfig`` load it on first use.
"""
from __future__ import annotations

import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from rlhf.cache.base import Cache, CacheError, CacheUnavailable
from rlhf.cache.memory import DEFAULT_MAX_ENTRIES, InMemoryCache

if TYPE_CHECKING:
    from rlhf.cache.redis import RedisCache, RedisConfig

__all__ = [
    "Cache", "CacheError", "CacheUnavailable", "InMemoryCache", "RedisCache", "RedisConfig", "cache_from_url",
    "DEFAULT_MAX_ENTRIES",
]

_LAZY = {"RedisCache", "RedisConfig"}
_named_memory_caches: dict[str, InMemoryCache] = {}
_named_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from rlhf.cache import redis

        return getattr(redis, name)
    raise AttributeError(f"module 'rlhf.cache' has no attribute {name!r}")


def cache_from_url(url: str) -> Cache:
    """The cache a config string names.

    * ``redis://[user:password@]host:port/db[?field=value...]`` or ``rediss://`` -> :class:`RedisCache`
      (query fields of :class:`RedisConfig`, e.g. ``?key_prefix=test:&socket_timeout_s=0.5``);
    * ``memory://[?max_entries=N]`` -> a new private :class:`InMemoryCache`;
    * ``memory://NAME`` -> the process-wide InMemoryCache called NAME (shared by services embedded in one process).
    """
    if not isinstance(url, str):
        raise TypeError(f"cache URL must be a str, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        from rlhf.cache.redis import RedisCache, RedisConfig

        return RedisCache(RedisConfig.from_url(url))
    if parts.scheme == "memory":
        query = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(query) - {"max_entries"}
        if unknown:
            raise ValueError(f"unknown memory cache option(s) {sorted(unknown)} in {url!r}; known: max_entries")
        try:
            max_entries = int(query.get("max_entries", DEFAULT_MAX_ENTRIES))
        except ValueError:
            raise ValueError(f"max_entries in {url!r} is not an integer") from None
        if not parts.netloc:
            return InMemoryCache(max_entries)
        with _named_lock:
            cache = _named_memory_caches.get(parts.netloc)
            if cache is None or cache._closed:
                cache = _named_memory_caches[parts.netloc] = InMemoryCache(max_entries)
            return cache
    raise ValueError(f"unknown cache URL {url!r}: expected redis://host:port/db, rediss://... or memory://[name]")
