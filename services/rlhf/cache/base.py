"""The cache: one small async interface, a Redis implementation and an in-process one.

Used for served-response records (TTL), rollout batches, reward-score cache and feedback idempotency keys.
A cache that is down raises :class:`CacheUnavailable`; callers degrade (treat as a miss, fall back) and count it,
they never crash on it.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence


class CacheError(Exception):
    """A cache operation failed."""


class CacheUnavailable(CacheError):
    """The cache cannot be reached now."""


class Cache(abc.ABC):
    """Byte keys and values (str keys are UTF-8 encoded). TTLs in seconds; ``None`` = no expiry."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in the order of ``keys`` (None for each miss), in one round trip."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value."""

    @abc.abstractmethod
    async def set_many(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> None:
        """Store every item, in one round trip."""

    @abc.abstractmethod
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Atomically store ``value`` only when ``key`` is absent (Redis ``SET NX``); True when stored."""

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> list[bool]:
        """``set_if_absent`` for each item (in the mapping's order), in one round trip where the cache allows it;
        one flag per item, True where it was stored."""
        return [await self.set_if_absent(key, value, ttl_s) for key, value in items.items()]

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`CacheUnavailable` unless the cache answers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
