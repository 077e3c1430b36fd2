"""The rollout buffer on Redis: a stream with one consumer group (``learner``), as PipelineRL streams rollouts.

Keys (under the URL's ``key_prefix``, default ``rlhf:``), all of one buffer on one Redis (not spread over a cluster):

- ``<prefix><stream>``: the stream; an entry has fields ``batch_id`` and ``payload``;
- ``<prefix><stream>:seen:<batch_id>``: the idempotency key of an added batch (``dedupe_ttl_s``);
- ``<prefix><stream>:progress``: the learner's progress (JSON), also PUBLISHed on a channel of that name.

``add`` is one Lua script (SET NX of the idempotency key, XADD only if it was set), so a batch is stored once however
often a worker retries. ``ack`` is XACK + XDEL in one MULTI (with the progress's SET + PUBLISH when it replaces the
progress too), so XLEN counts what was added and not acknowledged. ``progress_and_depth`` is GET + XLEN in one MULTI.
``wait_progress`` listens on the progress channel (one subscription per waiting thread).
Synchronous redis-py (hiredis parser when installed): workers and the learner are torch loops on their own threads.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions as rexc

from rlhf.cache.redis import RedisConfig
from rlhf.trainer.buffer import (
    BufferEntry,
    BufferError,
    BufferUnavailable,
    LearnerProgress,
    RolloutBuffer,
)

GROUP = "learner"
MAX_BLOCK_S = 30.0
"""Longest server-side wait of one read."""

_ADD = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return redis.call('XADD', KEYS[1], '*', 'batch_id', ARGV[1], 'payload', ARGV[2])
end
return false
"""

_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, OSError)


def _safe(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or ''}{parts.path}"


class RedisRolloutBuffer(RolloutBuffer):
    def __init__(self, config: RedisConfig, *, stream: str = "rollouts", dedupe_ttl_s: float = 7 * 86400.0) -> None:
        self.config = config
        self.key = f"{config.key_prefix}{stream}"
        self.dedupe_ttl_ms = int(dedupe_ttl_s * 1000)
        self._where = _safe(config.url)
        # No connection is made here: a buffer built while Redis is down works once Redis is back.
        self._client = redis.Redis.from_url(
            config.url, socket_timeout=config.socket_timeout_s, socket_connect_timeout=config.connect_timeout_s,
            max_connections=config.max_connections, health_check_interval=30)
        # Blocking reads on a client of their own, whose socket waits longer than the server blocks.
        self._blocking = redis.Redis.from_url(
            config.url, socket_timeout=MAX_BLOCK_S + config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s, max_connections=4)
        self._add = self._client.register_script(_ADD)
        self._group_ready = False
        self._listeners = threading.local()  # a pubsub on the progress channel per thread that waits
        self._opened: list[Any] = []  # every such pubsub, closed by close()
        self._opened_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, stream: str = "rollouts") -> RedisRolloutBuffer:
        return cls(RedisConfig.from_url(url), stream=stream)

    def __repr__(self) -> str:
        return f"RedisRolloutBuffer({self._where}, {self.key!r})"

    # ------------------------------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _UNAVAILABLE as e:
            self._group_ready = False
            raise BufferUnavailable(f"{what} on Redis at {self._where}: {e}") from None
        except rexc.RedisError as e:
            raise BufferError(f"{what} on Redis at {self._where}: {e}") from None

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._call("creating the consumer group", self._client.xgroup_create, self.key, GROUP, id="0",
                       mkstream=True)
        except BufferError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _grouped(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A group command; a stream deleted meanwhile (NOGROUP) gets its group again and the command once more."""
        self._ensure_group()
        try:
            return self._call(what, fn, *args, **kwargs)
        except BufferError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False
            self._ensure_group()
            return self._call(what, fn, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ the interface

    def add(self, batch_id: str, payload: bytes) -> str | None:
        self._ensure_group()
        entry = self._call("adding a rollout batch", self._add, keys=[self.key, f"{self.key}:seen:{batch_id}"],
                           args=[batch_id, payload, self.dedupe_ttl_ms])
        if entry is None:
            return None
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def read(self, consumer: str, count: int = 1, block_s: float = 1.0, pending: bool = False) -> list[BufferEntry]:
        live: list[tuple[str, dict]] = []
        if pending:
            # This consumer's unacknowledged entries, oldest first. Entries deleted without XACK (another process
            # acknowledged-and-deleted them) come back with no fields: acknowledge those and read on past them, so
            # that a run of them ahead of live entries does not hide the live ones.
            after = "0"
            while len(live) < count:
                reply = self._grouped("reading pending batches", self._client.xreadgroup, GROUP, consumer,
                                      {self.key: after}, count=count - len(live))
                entries = [(eid, fields) for _, items in (reply or []) for eid, fields in items]
                if not entries:
                    break
                live += self._live(entries)
                after = entries[-1][0]
        else:
            block_ms = max(1, int(block_s * 1000)) if block_s > 0 else None
            reply = self._grouped("reading rollout batches", self._read_blocking, consumer, count, block_ms)
            live = self._live([(eid, fields) for _, items in (reply or []) for eid, fields in items])
        deliveries = self._deliveries([eid for eid, _ in live]) if pending else {}
        return [BufferEntry(entry_id=eid, batch_id=fields[b"batch_id"].decode(), payload=fields[b"payload"],
                            deliveries=deliveries.get(eid, 1)) for eid, fields in live]

    def _live(self, entries: list[tuple[bytes, dict]]) -> list[tuple[str, dict]]:
        """The entries that still have their fields; the deleted ones (left in the PEL) are acknowledged."""
        gone = [eid for eid, fields in entries if not fields]
        if gone:
            self._call("dropping deleted entries", self._client.xack, self.key, GROUP, *gone)
        return [(eid.decode(), fields) for eid, fields in entries if fields]

    def _read_blocking(self, consumer: str, count: int, block_ms: int | None) -> Any:
        if block_ms is None:
            return self._client.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count)
        return self._blocking.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count,
                                         block=min(block_ms, int(MAX_BLOCK_S * 1000)))

    def _deliveries(self, entry_ids: list[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        rows = self._call("reading delivery counts", self._client.xpending_range, self.key, GROUP,
                          min=entry_ids[0], max=entry_ids[-1], count=len(entry_ids) + 100)
        return {(r["message_id"].decode() if isinstance(r["message_id"], bytes) else r["message_id"]):
                int(r["times_delivered"]) for r in rows}

    def ack(self, entry_ids: Sequence[str], progress: LearnerProgress | None = None) -> int:
        if not entry_ids:
            if progress is not None:
                self.publish_progress(progress)
            return 0
        pipe = self._client.pipeline(transaction=True)
        pipe.xack(self.key, GROUP, *entry_ids)
        pipe.xdel(self.key, *entry_ids)
        if progress is not None:
            self._queue_progress(pipe, progress)
        replies = self._call("acknowledging rollout batches", pipe.execute)
        return int(replies[1])

    def depth(self) -> int:
        return int(self._call("reading the buffer depth", self._client.xlen, self.key))

    def _queue_progress(self, pipe: Any, progress: LearnerProgress) -> None:
        value = json.dumps(dataclasses.asdict(progress))
        pipe.set(f"{self.key}:progress", value)
        pipe.publish(f"{self.key}:progress", value)

    def publish_progress(self, progress: LearnerProgress) -> None:
        pipe = self._client.pipeline(transaction=True)
        self._queue_progress(pipe, progress)
        self._call("publishing the learner's progress", pipe.execute)

    @staticmethod
    def _parse_progress(raw: Any) -> LearnerProgress:
        if not raw:
            return LearnerProgress()
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(LearnerProgress)}
        return LearnerProgress(**{k: v for k, v in data.items() if k in known})

    def progress(self) -> LearnerProgress:
        return self._parse_progress(
            self._call("reading the learner's progress", self._client.get, f"{self.key}:progress"))

    def progress_and_depth(self) -> tuple[LearnerProgress, int]:
        pipe = self._client.pipeline(transaction=True)
        pipe.get(f"{self.key}:progress")
        pipe.xlen(self.key)
        raw, depth = self._call("reading the learner's progress and the buffer depth", pipe.execute)
        return self._parse_progress(raw), int(depth)

    def wait_progress(self, seen: LearnerProgress, timeout_s: float) -> LearnerProgress:
        deadline = time.monotonic() + max(0.0, timeout_s)
        try:
            listener = getattr(self._listeners, "pubsub", None)
            if listener is None:
                listener = self._client.pubsub(ignore_subscribe_messages=True)
                self._listeners.pubsub = listener
                with self._opened_lock:
                    self._opened.append(listener)
                listener.subscribe(f"{self.key}:progress")
            while listener.get_message(timeout=0.0) is not None:  # publications since this thread last waited
                pass
            current = self.progress()  # after subscribing: a publication from here on wakes the wait below
            while current == seen and (left := deadline - time.monotonic()) > 0:
                if listener.get_message(timeout=left) is not None:
                    current = self.progress()
            return current
        except (*_UNAVAILABLE, rexc.RedisError, BufferError) as e:
            self._drop_listener()
            if isinstance(e, BufferError):
                raise
            raise BufferUnavailable(f"waiting for the learner's progress on Redis at {self._where}: {e}") from None

    def _drop_listener(self, listener: Any = None) -> None:
        if listener is None:
            listener = getattr(self._listeners, "pubsub", None)
            self._listeners.pubsub = None
        if listener is None:
            return
        with self._opened_lock:
            if listener in self._opened:
                self._opened.remove(listener)
        try:
            listener.close()
        except Exception:  # noqa: BLE001 - a broken connection is what is being dropped
            pass

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def close(self) -> None:
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for listener in opened:
            self._drop_listener(listener)
        self._client.close()
        self._blocking.close()
