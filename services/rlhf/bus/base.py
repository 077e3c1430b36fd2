"""The message bus: one small interface, a Kafka implementation and an in-process one.

Contract (both implementations keep it, and tests/integration checks it against a real broker):

* ``send`` resolves its future only when the record is durable (Kafka: acknowledged by all in-sync replicas),
  or fails it with :class:`BusUnavailable` (broker unreachable, delivery timeout) / :class:`BusError`.
  It never blocks the caller for longer than ``max_block_s`` of the bus config.
* Consumers belong to a group, start from the earliest offset of a new group, and commit only when told
  (at-least-once: a record is redelivered until the consumer commits past it). A consumer that keeps its own
  offsets (with its data, in one transaction) gives a :class:`RebalanceListener`: its offsets win over the group's
  committed ones when partitions are assigned, and it commits them (advisory) when partitions are revoked.
* Records keep the order of their key (same key -> same partition).
* ``poll`` returns one :class:`Message` per record; ``poll_partitions`` returns the same records as columns, one
  :class:`PartitionRecords` per partition, for consumers that read too many records a second to build an object for
  each.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import threading
import typing
from collections.abc import Iterable, Sequence


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


def check_record(
    topic: str, value: bytes, key: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> list[tuple[str, bytes]]:
    """Raise TypeError / ValueError for a record no bus can send (a programming error, not a bus failure);
    return its headers as a list."""
    if type(topic) is not str:
        raise TypeError(f"topic must be a str, got {type(topic).__name__}")
    if not topic:
        raise ValueError("topic must not be empty")
    if type(value) is not bytes and not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    if key is not None and type(key) is not bytes and not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes or None, got {type(key).__name__}")
    if not headers:
        return []
    out = []
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2 and type(item[0]) is str and isinstance(item[1], bytes)):
            raise TypeError(f"headers must be (str, bytes) pairs, got {item!r}")
        out.append(item)
    return out


def check_poll(timeout_s: float, max_records: int) -> None:
    """Raise ValueError for poll arguments no consumer takes."""
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
    if type(max_records) is not int or max_records < 1:
        raise ValueError(f"max_records must be a positive int, got {max_records!r}")


def _outcome(fut: concurrent.futures.Future) -> RecordMetadata | BusError:
    exc = fut.exception()
    if exc is None:
        return fut.result()
    if isinstance(exc, BusError):
        return exc
    err = BusError(f"send failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


@dataclasses.dataclass(frozen=True)
class RecordMetadata:
    """Where a sent record landed."""

    topic: str
    partition: int
    offset: int


class Message(typing.NamedTuple):
    """A consumed record. A named tuple, not a dataclass: one is built per consumed record, and a frozen dataclass
    costs about three times as much to build (a measurable share of the trainer's consumption, benchmarks/README.md)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


class PartitionRecords(typing.NamedTuple):
    """The records of one partition returned by one poll, as columns (no object per record):
    ``values[i]`` is the record at ``offsets[i]``. What :meth:`Consumer.poll_partitions` returns, for a consumer
    that needs only offsets and values: building one :class:`Message` per record costs about 0.65 us, against about
    0.08 us a record for these two lists (the trainer reads ~100k records/s)."""

    topic: str
    partition: int
    offsets: list[int]
    """Ascending, never empty; not necessarily consecutive (Kafka: a compacted topic, transaction markers)."""
    values: list[bytes]
    """The records' values, one per offset."""


def partition_records(messages: Iterable[Message]) -> list[PartitionRecords]:
    """Messages as columns: one :class:`PartitionRecords` per partition, in the order of its first record, each
    partition's records in their order."""
    groups: dict[tuple[str, int], PartitionRecords] = {}
    for m in messages:
        records = groups.get((m.topic, m.partition))
        if records is None:
            records = groups[(m.topic, m.partition)] = PartitionRecords(m.topic, m.partition, [], [])
        records.offsets.append(m.offset)
        records.values.append(m.value)
    return list(groups.values())


class BatchResults:
    """The outcomes of one ``send_batch`` call, filled in from any thread as records resolve.

    ``future`` resolves, once every record has an outcome, to the list of them in the call's order: the record's
    :class:`RecordMetadata` once durable, or the :class:`BusError` it failed with. The first outcome given for a
    record is kept."""

    def __init__(self, n: int) -> None:
        self.future: concurrent.futures.Future[list[RecordMetadata | BusError]] = concurrent.futures.Future()
        self._results: list[RecordMetadata | BusError | None] = [None] * n
        self._remaining = n
        self._lock = threading.Lock()
        if n == 0:
            self.future.set_result([])

    def set_many(self, outcomes: Iterable[tuple[int, RecordMetadata | BusError]]) -> None:
        """Record ``(index, outcome)`` pairs; resolves the future with the last missing one."""
        results = self._results
        with self._lock:
            for i, outcome in outcomes:
                if results[i] is None:
                    results[i] = outcome
                    self._remaining -= 1
            last = self._remaining == 0 and not self.future.done()
        if last:
            self.future.set_result(list(results))  # type: ignore[arg-type]

    def fail_unset(self, error: BusError) -> None:
        """Give every record without an outcome yet this error."""
        self.set_many([(i, error) for i, r in enumerate(list(self._results)) if r is None])


TopicPartition = tuple[str, int]
"""(topic, partition)."""


class RebalanceListener:
    """Told when the group moves partitions to or from a consumer. Called during ``poll`` (Kafka: on the client's
    network thread), so it must return promptly and must not call the consumer or the bus."""

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Partitions now this consumer's; returns where to start reading those it knows better than the group's
        committed offset (the next offset to read), e.g. the offsets stored with its data."""
        return {}

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Partitions about to move away, after the last record of them was returned by ``poll``; returns offsets
        to commit for them (asynchronously, best effort: the next owner starts there)."""
        return {}

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions taken away without a chance to commit (the consumer was evicted from the group): work on
        their records that is not durable yet should be dropped; another member reads them again."""


class _SeekTo(RebalanceListener):
    """Positions given up front, for the partitions assigned (Bus.reader's default ``start_at``)."""

    def __init__(self, offsets: dict[TopicPartition, int]) -> None:
        self.offsets = dict(offsets)

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}


class Consumer(abc.ABC):
    """A member of a consumer group. Not thread-safe: use it from one thread."""

    @abc.abstractmethod
    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Message]:
        """Return up to ``max_records`` records (possibly none after ``timeout_s``)."""

    def poll_partitions(self, timeout_s: float = 1.0, max_records: int = 500) -> list[PartitionRecords]:
        """What :meth:`poll` returns, as columns: the same records (up to ``max_records`` in all, possibly none
        after ``timeout_s``), the same positions advanced and the same errors, grouped by partition, offsets
        ascending within each, a partition without records left out. Keys, headers and timestamps are not returned.
        ``commit()`` afterwards commits past them as after ``poll``; to commit past only some partitions' records,
        ``commit_offsets({(r.topic, r.partition): r.offsets[-1] + 1 for r in ...})``.

        This default groups ``poll``'s records (which keep their partition's order); an implementation that can
        build the columns without a Message per record overrides it (Kafka does)."""
        return partition_records(self.poll(timeout_s, max_records))

    @abc.abstractmethod
    def commit(self, messages: Sequence[Message] | None = None) -> None:
        """Commit past ``messages`` (per partition, the highest offset + 1), or past everything polled when None."""

    def commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit explicit next-to-read offsets (e.g. those stored with the consumer's data)."""
        raise NotImplementedError

    def commit_offsets_async(self, offsets: dict[TopicPartition, int]) -> None:
        """:meth:`commit_offsets` without waiting for the answer, for advisory commits (a consumer that keeps its own
        offsets): a failure is logged, not raised, and a later commit may overtake an earlier one. By default it
        waits (and raises) like :meth:`commit_offsets`."""
        self.commit_offsets(offsets)

    def assignment(self) -> list[TopicPartition]:
        """The partitions this member holds now."""
        raise NotImplementedError

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next record written to each partition will get (for consumer lag)."""
        raise NotImplementedError

    def positions(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset of the next record ``poll`` returns, for partitions this member holds."""
        raise NotImplementedError

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Return no records of these partitions (those held) until :meth:`resume`. Their positions stay and what
        was fetched of them is kept for then; a partition assigned again by a rebalance may start resumed."""
        raise NotImplementedError

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Return records of these paused partitions again (those held; the others are ignored)."""
        raise NotImplementedError

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

    def send_batch(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> concurrent.futures.Future[list[RecordMetadata | BusError]]:
        """Queue ``(value, key)`` records, in order; the future resolves once each is durable or failed, to one
        outcome per record (its RecordMetadata or its BusError), never to an exception. A malformed record raises
        TypeError / ValueError before any is queued. Same guarantees per record as ``send``; implementations may
        do it with much less work per record (Kafka does)."""
        for value, key in records:
            check_record(topic, value, key)
        results = BatchResults(len(records))
        for i, (value, key) in enumerate(records):
            self.send(topic, value, key=key).add_done_callback(
                lambda fut, i=i: results.set_many([(i, _outcome(fut))]))
        return results.future

    async def publish_batch(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> list[RecordMetadata | BusError]:
        """``send_batch`` for asyncio code: one wake-up of the event loop for the whole batch."""
        return await asyncio.wrap_future(self.send_batch(topic, records))

    @abc.abstractmethod
    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued record is resolved (durable or failed)."""

    @abc.abstractmethod
    def consumer(self, topics: Sequence[str], group_id: str, *, client_id: str | None = None,
                 listener: RebalanceListener | None = None) -> Consumer:
        """A consumer in ``group_id`` subscribed to ``topics``, with manual commits (and ``listener`` told of
        rebalances)."""

    def reader(self, topics: Sequence[str], *, client_id: str | None = None,
               start_at: dict[TopicPartition, int] | None = None) -> Consumer:
        """Every partition of ``topics`` from the beginning, outside any consumer group: a broadcast reader, for
        topics each replica must read whole (rlhf.models.v1). No group means no join, rebalance or session timeout,
        and no group left behind per start; ``commit`` is a no-op (a reader starts at the beginning every time).
        Partitions added later are read from its next start. ``start_at``: offsets to begin at instead, for some
        partitions (a reader made again after an error goes on where the last one stopped). This default is the
        only member of a new group (for buses without assignment); Kafka's assigns the partitions itself."""
        import uuid

        if start_at:
            listener = _SeekTo(start_at)
            return self.consumer(topics, f"reader-{uuid.uuid4().hex}", client_id=client_id, listener=listener)
        return self.consumer(topics, f"reader-{uuid.uuid4().hex}", client_id=client_id)

    @abc.abstractmethod
    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet (idempotent)."""

    @abc.abstractmethod
    def ping(self, timeout_s: float = 2.0) -> None:
        """Raise :class:`BusUnavailable` unless the bus answers a metadata request within ``timeout_s``."""

    @abc.abstractmethod
    def close(self, timeout_s: float | None = 10.0) -> None:
        """Flush queued records (up to ``timeout_s``) and release connections."""
