"""The cache on Redis, through ``redis.asyncio`` (with the hiredis parser when installed, as in our dependencies).

Fails fast: short socket timeouts, at most ``retries`` immediate retries, a bounded pool that waits
``pool_timeout_s`` for a free connection. Any connection or timeout error becomes :class:`CacheUnavailable`
(callers degrade); a Redis error reply becomes :class:`CacheError`.

A RedisCache belongs to the event loop it is first used on (redis.asyncio's connections do).
"""
from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc

try:
    import hiredis
except ImportError:  # redis works without it, only slower
    hiredis = None
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from rlhf.cache.base import Cache, CacheError, CacheUnavailable
from rlhf.cache.memory import check_key, check_ttl, check_value

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """How :class:`RedisCache` reaches Redis. Times in seconds."""

    url: str = "redis://127.0.0.1:16379/0"
    """``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS (default: deploy/local/infra.py's Redis)."""
    key_prefix: str = "rlhf:"
    """Prepended to every key, so that the platform can share a Redis with others and its keys are easy to find."""
    socket_timeout_s: float = 1.0
    """Longest wait for one reply; past it the command fails with CacheUnavailable. Cache commands take
    microseconds, so a second means Redis is stuck or gone."""
    connect_timeout_s: float = 1.0
    """Longest wait to open a connection."""
    max_connections: int = 64
    """Connections in the pool; a command waits ``pool_timeout_s`` for one when all are busy."""
    pool_timeout_s: float = 1.0
    """Longest wait for a free pooled connection before CacheUnavailable."""
    retries: int = 1
    """Immediate retries of a command after a connection error: one covers a pooled connection that a Redis
    restart closed; more only delay the failure."""

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"RedisConfig.url must be redis://, rediss:// or unix://, got {self.url!r}")
        for name in ("socket_timeout_s", "connect_timeout_s", "pool_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RedisConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_connections < 1 or self.retries < 0:
            raise ValueError("RedisConfig.max_connections must be >= 1 and retries >= 0")

    @classmethod
    def from_url(cls, url: str) -> RedisConfig:
        """A Redis URL; query parameters named like this class's fields set them (``?key_prefix=x:``),
        the others stay in the URL for redis-py."""
        parts = urllib.parse.urlsplit(url)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "url"}
        kwargs: dict[str, Any] = {}
        rest = []
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if name in fields:
                default = fields[name].default
                try:
                    kwargs[name] = type(default)(value) if not isinstance(default, str) else value
                except ValueError:
                    raise ValueError(f"{name}={value!r} in {url!r} is not a {type(default).__name__}") from None
            else:
                rest.append((name, value))
        clean = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
        return cls(url=clean, **kwargs)


# One round trip and one command for many keys (pipelining N commands costs N command encodings in redis-py).
# ARGV[1] is the TTL in milliseconds ("" for none), ARGV[i + 1] the value of KEYS[i]. Keys of one call must live on
# one node (a single Redis or one cluster slot).
_SET_MANY_NX = """
local out = {}
for i, key in ipairs(KEYS) do
  local stored
  if ARGV[1] == '' then stored = redis.call('SET', key, ARGV[i + 1], 'NX')
  else stored = redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1]) end
  out[i] = stored and 1 or 0
end
return out
"""
_SET_MANY = """
for i, key in ipairs(KEYS) do
  if ARGV[1] == '' then redis.call('SET', key, ARGV[i + 1])
  else redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]) end
end
return #KEYS
"""

_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of ``redis.asyncio``'s Python packer: about 0.25 instead of 2.5 us
    per argument. The sync client already does this when hiredis is installed; the asyncio one does not, and a
    batch script has an argument per key. Mixed into whichever connection class the URL picks (TCP, TLS, unix)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # "SCRIPT LOAD"-style names are sent as separate words
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        encoder = self.encoder  # type: ignore[attr-defined]
        if encoder.encoding.replace("-", "").lower() == "utf8" and encoder.encoding_errors == "strict":
            try:  # str, bytes, int and float: hiredis writes them as redis-py's encoder would
                return [hiredis.pack_command(args)]
            except TypeError:
                pass  # memoryview, bytearray, or a type redis-py refuses (bool): its encoder decides

        def as_bytes(arg: Any) -> bytes:
            out = encoder.encode(arg)  # raises DataError for what Redis cannot take
            return out if type(out) is bytes else bytes(out)

        try:
            return [hiredis.pack_command(tuple(as_bytes(a) for a in args))]
        except TypeError as e:
            raise rexc.DataError(str(e)) from e


def _with_hiredis_packing(cls: type) -> type:
    if hiredis is None or not hasattr(hiredis, "pack_command"):
        return cls
    return type(f"HiredisPacking{cls.__name__}", (_HiredisPacking, cls), {})


class RedisCache(Cache):
    """:class:`Cache` on Redis."""

    def __init__(self, config: RedisConfig | None = None) -> None:
        self.config = c = config or RedisConfig()
        pool = aioredis.BlockingConnectionPool.from_url(
            c.url,
            max_connections=c.max_connections,
            timeout=c.pool_timeout_s,
            socket_timeout=c.socket_timeout_s,
            socket_connect_timeout=c.connect_timeout_s,
            # Only connection errors are retried: a command that timed out may have run, and a SET NX run twice
            # would answer "not stored" for a key it stored itself.
            retry=Retry(NoBackoff(), c.retries, supported_errors=(rexc.ConnectionError,)),
        )
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
        self._r = aioredis.Redis(connection_pool=pool)
        self._prefix = c.key_prefix
        self._set_many_nx = self._r.register_script(_SET_MANY_NX)
        self._set_many = self._r.register_script(_SET_MANY)
        self._closed = False

    def __repr__(self) -> str:
        parts = urllib.parse.urlsplit(self.config.url)
        return f"RedisCache({parts.scheme}://{parts.hostname}:{parts.port}{parts.path}, prefix={self._prefix!r})"

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        if self._closed:
            if asyncio.iscoroutine(op):
                op.close()
            raise CacheError(f"{what} on a closed cache")
        try:
            return await op
        except _UNAVAILABLE as e:
            raise CacheUnavailable(f"Redis {what} failed ({self!r}): {type(e).__name__}: {e}") from e
        except rexc.RedisError as e:
            raise CacheError(f"Redis {what} failed ({self!r}): {type(e).__name__}: {e}") from e

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    async def get(self, key: str) -> bytes | None:
        return await self._call("GET", self._r.get(self._key(key)))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if isinstance(keys, str):
            raise TypeError("get_many takes a sequence of keys, not one str")
        if not keys:
            return []
        return list(await self._call("MGET", self._r.mget([self._key(k) for k in keys])))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        await self._call("SET", self._r.set(self._key(key), check_value(value), px=_px(ttl_s)))

    async def set_many(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> None:
        if not isinstance(items, Mapping):
            raise TypeError(f"set_many takes a mapping of key -> bytes, got {type(items).__name__}")
        if not items:
            return
        keys, args = self._script_args(items, ttl_s)
        await self._call("SET many (script)", self._set_many(keys=keys, args=args))

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_s: float | None = None) -> list[bool]:
        if not isinstance(items, Mapping):
            raise TypeError(f"set_many_if_absent takes a mapping of key -> bytes, got {type(items).__name__}")
        if not items:
            return []
        keys, args = self._script_args(items, ttl_s)
        stored = await self._call("SET NX many (script)", self._set_many_nx(keys=keys, args=args))
        return [bool(x) for x in stored]

    def _script_args(self, items: Mapping[str, bytes], ttl_s: float | None) -> tuple[list[str], list[bytes | int]]:
        px = _px(ttl_s)
        keys = [self._key(k) for k in items]
        checked: dict[int, bytes] = {}  # each distinct value object once (a batch often repeats one value)
        values = []
        for v in items.values():
            c = checked.get(id(v))
            if c is None:
                c = checked[id(v)] = check_value(v)
            values.append(c)
        return keys, ["" if px is None else px, *values]

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        stored = await self._call("SET NX", self._r.set(self._key(key), check_value(value), px=_px(ttl_s), nx=True))
        return bool(stored)

    async def delete(self, key: str) -> bool:
        return bool(await self._call("DEL", self._r.delete(self._key(key))))

    async def ping(self) -> None:
        await self._call("PING", self._r.ping())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._r.aclose(close_connection_pool=True)


def _px(ttl_s: float | None) -> int | None:
    """TTL in whole milliseconds (Redis PX), at least 1."""
    ttl_s = check_ttl(ttl_s)
    return None if ttl_s is None else max(1, round(ttl_s * 1000))
