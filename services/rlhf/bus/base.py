"""The message bus: one small interface, a Kafka implementation and an in-process one.

Contract (both implementations keep it, and tests/integration checks it against a real broker):

* ``send`` resolves its future only when the record is durable (Kafka: acknowledged by all in-sync replicas),
  or fails it with :class:`BusUnavailable` (broker unreachable, delivery timeout) / :class:`BusError`.
  It never blocks the caller for longer than ``max_block_s`` of the bus config.
* Consumers belong to a group, start from the earliest offset of a new group, and commit only when told
  (at-least-once: a record is redelivered until the consumer commits past it).
* Records keep the order of their key (same key -> same partition).
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Sequence


class BusError(Exception):
    """A bus operation failed for a reason other than availability (e.g. a record too large)."""


class BusUnavailable(BusError):
    """The bus cannot be reached now; nothing was written. Retrying later may succeed."""


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    """A topic to create if it does not exist."""

    name: str
    """Topic name, e.g. ``rlhf.feedback.v1``."""
    partitions: int = 3
    """Number of partitions (parallelism of consumers in one group)."""
    replication_factor: int = 1
    """Copies of each partition; 1 on a single local broker, 3 in production."""
    config: tuple[tuple[str, str], ...] = ()
    """Extra topic configs, e.g. ``(("retention.ms", "604800000"),)``."""


def check_topic_specs(specs: Sequence[TopicSpec]) -> dict[str, TopicSpec]:
    """The specs by topic name; TypeError / ValueError for a bad spec or one topic given twice differently."""
    by_name: dict[str, TopicSpec] = {}
    for spec in specs:
        if not isinstance(spec, TopicSpec):
            raise TypeError(f"ensure_topics takes TopicSpec, got {spec!r}")
        if spec.partitions < 1 or spec.replication_factor < 1:
            raise ValueError(f"{spec.name}: partitions and replication_factor must be >= 1")
        if by_name.setdefault(spec.name, spec) != spec:
            raise ValueError(f"topic {spec.name!r} given twice with different specs")
    return by_name


@dataclasses.dataclass(frozen=True)
class RecordMetadata:
    """Where a sent record landed."""

    topic: str
    partition: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Message:
    """A consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


class Consumer(abc.ABC):
    """A member of a consumer group. Not thread-safe: use it from one thread."""

    @abc.abstractmethod
    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Message]:
        """Return up to ``max_records`` records (possibly none after ``timeout_s``)."""

    @abc.abstractmethod
    def commit(self, messages: Sequence[Message] | None = None) -> None:
        """Commit past ``messages`` (per partition, the highest offset + 1), or past everything polled when None."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group without committing anything more."""

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus(abc.ABC):
    """Producer side, consumer factory and administration of one bus."""

    @abc.abstractmethod
    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> concurrent.futures.Future[RecordMetadata]:
        """Queue a record; the future resolves once it is durable (see module docstring)."""

    async def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> RecordMetadata:
        """``send`` for asyncio code: awaits durability without blocking the event loop."""
        return await asyncio.wrap_future(self.send(topic, value, key=key, headers=headers))

    @abc.abstractmethod
    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued record is resolved (durable or failed)."""

    @abc.abstractmethod
    def consumer(self, topics: Sequence[str], group_id: str, *, client_id: str | None = None) -> Consumer:
        """A consumer in ``group_id`` subscribed to ``topics``, with manual commits."""

    @abc.abstractmethod
    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet (idempotent)."""

    @abc.abstractmethod
    def ping(self, timeout_s: float = 2.0) -> None:
        """Raise :class:`BusUnavailable` unless the bus answers a metadata request within ``timeout_s``."""

    @abc.abstractmethod
    def close(self, timeout_s: float | None = 10.0) -> None:
        """Flush queued records (up to ``timeout_s``) and release connections."""
