"""The rollout buffer between rollout workers and the learner: one small synchronous interface, an in-process
implementation (embedded mode, unit tests) and a Redis one (``rlhf.trainer.buffer_redis``: a stream with a consumer
group, as in PipelineRL).

The contract every implementation keeps:

- ``add`` is idempotent by ``batch_id`` (a worker that crashed after adding and before committing its prompts adds
  the same batch again: it is stored once). A stored batch survives the worker.
- ``read`` hands a consumer new entries, oldest first; ``read(pending=True)`` instead hands it its own
  delivered-but-unacknowledged ones (after a learner restart: the batches it had read and not yet acknowledged).
  A running learner holds entries it used until its next checkpoint, so the two are apart. An entry stays in the
  buffer until ``ack``.
- ``ack`` removes entries for good; ``depth`` counts what was added and not acknowledged (delivered or not).
- ``publish_progress`` / ``progress`` carry the learner's position (its step, the policy version workers should
  generate with, the entries it holds for its next checkpoint) from the learner to every worker: the "Redis
  notification" of a new version, read before each batch. ``ack`` can replace the progress in the same atomic
  operation, and ``progress_and_depth`` reads both at one instant, so a worker never sees entries gone from the
  depth without the progress that accounts for them.
- ``wait_progress`` wakes a waiting worker as soon as the learner publishes (instead of a fixed poll), so a worker
  held back by the staleness bound starts its next batch the moment the learner's step allows it.

Synchronous on purpose: workers and the learner are torch loops on their own threads or processes. A buffer that
cannot be reached raises :class:`BufferUnavailable`; callers wait and retry, they never drop an acknowledged batch.
"""
from __future__ import annotations

import abc
import dataclasses
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence


class BufferError(Exception):
    """A buffer operation failed."""


class BufferUnavailable(BufferError):
    """The buffer cannot be reached now (Redis down): wait and retry."""


@dataclasses.dataclass(frozen=True)
class BufferEntry:
    """One stored rollout batch as the learner reads it."""

    entry_id: str
    """The buffer's own id (a Redis stream id); what ``ack`` takes."""
    batch_id: str
    """The worker's idempotency id of the batch."""
    payload: bytes
    """The serialised ``RolloutBatch``."""
    deliveries: int
    """How many times it was handed out (1 the first time; more after a learner restart)."""


@dataclasses.dataclass(frozen=True)
class LearnerProgress:
    """What the learner last published."""

    step: int = 0
    """Learner updates done."""
    version: str = ""
    """The policy version workers should generate with ("" before the first)."""
    version_index: int = 0
    """Its index: 0 for the run's starting policy, then 1, 2, ... (staleness is a difference of indexes)."""
    uri: str = ""
    """Where its weights are (a save_pretrained folder; relative to the artifact root unless absolute)."""
    run_id: str = ""
    """The run it belongs to."""
    state: str = ""
    """The run's state as the learner sees it ("running", "paused", ...): workers idle unless "running"."""
    saved_at: float = 0.0
    """Unix time the version was saved (workers measure the weight-sync delay from it)."""
    held: int = 0
    """Entries the learner has read and finished with (used, dropped, skipped) but holds unacknowledged until the
    checkpoint that covers them: part of ``depth``, yet no longer ahead of the learner. A worker's admission counts
    ``depth - held`` batches still to come before its own."""


class RolloutBuffer(abc.ABC):
    @abc.abstractmethod
    def add(self, batch_id: str, payload: bytes) -> str | None:
        """Store a batch; its entry id, or None when a batch with this id was stored already (nothing stored)."""

    @abc.abstractmethod
    def read(self, consumer: str, count: int = 1, block_s: float = 1.0, pending: bool = False) -> list[BufferEntry]:
        """Up to ``count`` new entries for ``consumer``, waiting up to ``block_s`` for one to arrive; [] when none
        came. ``pending``: instead, the entries handed to ``consumer`` before and not acknowledged (no waiting)."""

    @abc.abstractmethod
    def ack(self, entry_ids: Sequence[str], progress: LearnerProgress | None = None) -> int:
        """Acknowledge and remove entries; how many were still there. ``progress``: also replace the published
        progress, atomically with the removal (what the learner does after a checkpoint)."""

    @abc.abstractmethod
    def depth(self) -> int:
        """Entries added and not acknowledged yet (delivered or not)."""

    @abc.abstractmethod
    def publish_progress(self, progress: LearnerProgress) -> None:
        """Replace the learner's published progress."""

    @abc.abstractmethod
    def progress(self) -> LearnerProgress:
        """The learner's last published progress (all defaults before the first)."""

    def progress_and_depth(self) -> tuple[LearnerProgress, int]:
        """``progress()`` and ``depth()`` read at one instant (implementations make it atomic)."""
        return self.progress(), self.depth()

    def wait_progress(self, seen: LearnerProgress, timeout_s: float) -> LearnerProgress:
        """Wait up to ``timeout_s`` until the published progress differs from ``seen``; the progress then. This
        default polls; implementations wake on the publication itself."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            current = self.progress()
            left = deadline - time.monotonic()
            if current != seen or left <= 0:
                return current
            time.sleep(min(0.02, left))

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise BufferUnavailable unless the buffer answers."""

    def close(self) -> None:
        """Release connections."""


class InMemoryRolloutBuffer(RolloutBuffer):
    """The buffer in this process (embedded mode): thread-safe, nothing survives the process."""

    def __init__(self, dedupe_window: int = 100_000) -> None:
        self._cond = threading.Condition()
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # entry id -> (batch id, payload)
        self._delivered: dict[str, tuple[str, int]] = {}  # entry id -> (consumer, deliveries)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_window = dedupe_window
        self._next = 0
        self._progress = LearnerProgress()

    def add(self, batch_id: str, payload: bytes) -> str | None:
        with self._cond:
            if batch_id in self._seen:
                return None
            self._seen[batch_id] = None
            while len(self._seen) > self._dedupe_window:
                self._seen.popitem(last=False)
            self._next += 1
            entry_id = f"{self._next}-0"
            self._entries[entry_id] = (batch_id, bytes(payload))
            self._cond.notify_all()
            return entry_id

    def read(self, consumer: str, count: int = 1, block_s: float = 1.0, pending: bool = False) -> list[BufferEntry]:
        deadline = time.monotonic() + max(0.0, block_s)
        with self._cond:
            while True:
                if pending:
                    chosen = [e for e, (c, _) in self._delivered.items() if c == consumer and e in self._entries]
                else:
                    chosen = [e for e in self._entries if e not in self._delivered]
                chosen = chosen[:count]
                if chosen:
                    out = []
                    for entry_id in chosen:
                        _, n = self._delivered.get(entry_id, (consumer, 0))
                        self._delivered[entry_id] = (consumer, n + 1)
                        batch_id, payload = self._entries[entry_id]
                        out.append(BufferEntry(entry_id, batch_id, payload, n + 1))
                    return out
                left = deadline - time.monotonic()
                if left <= 0 or pending:
                    return []
                self._cond.wait(left)

    def ack(self, entry_ids: Sequence[str], progress: LearnerProgress | None = None) -> int:
        with self._cond:
            n = 0
            for entry_id in entry_ids:
                if self._entries.pop(entry_id, None) is not None:
                    n += 1
                self._delivered.pop(entry_id, None)
            if progress is not None:
                self._progress = progress
            self._cond.notify_all()
            return n

    def depth(self) -> int:
        with self._cond:
            return len(self._entries)

    def publish_progress(self, progress: LearnerProgress) -> None:
        with self._cond:
            self._progress = progress
            self._cond.notify_all()

    def progress(self) -> LearnerProgress:
        with self._cond:
            return self._progress

    def progress_and_depth(self) -> tuple[LearnerProgress, int]:
        with self._cond:
            return self._progress, len(self._entries)

    def wait_progress(self, seen: LearnerProgress, timeout_s: float) -> LearnerProgress:
        with self._cond:
            self._cond.wait_for(lambda: self._progress != seen, max(0.0, timeout_s))
            return self._progress

    def ping(self) -> None:
        return None


def open_buffer(url: str, *, stream: str = "rollouts") -> RolloutBuffer:
    """``memory://`` (this process) or ``redis://host:port/db?key_prefix=rlhf:`` (``rediss://`` for TLS)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "memory":
        return InMemoryRolloutBuffer()
    if scheme in ("redis", "rediss", "unix"):
        from rlhf.trainer.buffer_redis import RedisRolloutBuffer

        return RedisRolloutBuffer.from_url(url, stream=stream)
    raise ValueError(f"rollout buffer url must be memory:// or redis://HOST:PORT/DB, got {url!r}")
