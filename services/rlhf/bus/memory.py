"""The bus in one process, for embedded mode and tests of the logic above the bus.

It keeps Kafka's observable semantics (tests/unit/test_memory_bus.py and tests/integration/test_kafka_bus.py run
one contract against both):

* topics have partitions; a keyed record goes to ``murmur2(key) % partitions`` like Kafka's default partitioner
  (same partition numbers as a real cluster), an unkeyed one round-robin; offsets count from 0 per partition;
* sending to or subscribing to an unknown topic creates it with ``default_partitions`` (a broker with
  ``auto.create.topics.enable``); records above ``max_record_bytes`` fail with BusError like a producer's
  ``max_request_size``;
* consumer groups: partitions are split among the members (range assignment); when a member joins or leaves,
  a partition that moves to another member restarts there from the group's committed offset, so its records not
  committed are delivered again, while a member keeps its position on the partitions it keeps (what
  kafka-python 3 does); a new group starts at the earliest offset; commits are accepted from any member
  (a Kafka broker checks the group generation, not who owns the partition);
* retention: each partition keeps its last ``retention_records`` records; a consumer behind that restarts at the
  oldest one kept (auto_offset_reset=earliest).

``send`` futures are resolved before ``send`` returns. Everything is guarded by one lock, so producers and
consumers may live on any threads (each Consumer on one thread, as with Kafka).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Sequence

from rlhf.bus.base import (
    Bus, BusError, Consumer, Message, RebalanceListener, RecordMetadata, TopicPartition, TopicSpec, check_poll,
    check_record, check_topic_specs,
)
from rlhf.bus.partitioning import partition_for_key


class _Partition:
    __slots__ = ("start", "records")

    def __init__(self) -> None:
        self.start = 0  # offset of records[0]
        self.records: list[Message] = []

    @property
    def end(self) -> int:
        return self.start + len(self.records)


class _Group:
    def __init__(self) -> None:
        self.generation = 0
        self.members: dict[int, list[str]] = {}  # member id -> subscribed topics, in join order
        self.assignment: dict[int, list[tuple[str, int]]] = {}
        self.committed: dict[tuple[str, int], int] = {}


class InMemoryBus(Bus):
    """:class:`Bus` in process memory, thread-safe."""

    def __init__(self, *, default_partitions: int = 1, max_record_bytes: int = 1024 * 1024,
                 retention_records: int = 100_000) -> None:
        """
        Args:
            default_partitions: partitions of a topic created by a send or a subscription (Kafka: num.partitions).
            max_record_bytes: largest key + value + headers accepted (Kafka: the producer's max_request_size).
            retention_records: records kept per partition; the oldest go first (Kafka: retention.bytes / .ms).
        """
        if default_partitions < 1 or max_record_bytes < 1 or retention_records < 1:
            raise ValueError("default_partitions, max_record_bytes and retention_records must be positive")
        self.default_partitions = default_partitions
        self.max_record_bytes = max_record_bytes
        self.retention_records = retention_records
        self._cond = threading.Condition(threading.Lock())
        self._topics: dict[str, list[_Partition]] = {}
        self._round_robin: dict[str, itertools.count] = {}
        self._groups: dict[str, _Group] = {}
        self._member_ids = itertools.count(1)
        self._closed = False

    def __repr__(self) -> str:
        return f"InMemoryBus(topics={sorted(self._topics)})"

    # -- topics

    def _topic(self, name: str, partitions: int | None = None) -> list[_Partition]:
        parts = self._topics.get(name)
        if parts is None:
            parts = self._topics[name] = [_Partition() for _ in range(partitions or self.default_partitions)]
            self._round_robin[name] = itertools.count()
        return parts

    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        by_name = check_topic_specs(specs)
        with self._cond:
            if self._closed:
                raise BusError("ensure_topics on a closed bus")
            for spec in by_name.values():
                self._topic(spec.name, spec.partitions)

    def partitions(self, topic: str) -> int:
        """Number of partitions of ``topic`` (0 when it does not exist); for tests and tools."""
        with self._cond:
            return len(self._topics.get(topic, ()))

    # -- producing

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> concurrent.futures.Future[RecordMetadata]:
        hdrs = tuple(check_record(topic, value, key, headers))
        fut: concurrent.futures.Future[RecordMetadata] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        size = len(value) + (len(key) if key is not None else 0) + sum(len(k) + len(v) for k, v in hdrs)
        if size > self.max_record_bytes:
            fut.set_exception(BusError(
                f"send to {topic!r} failed: record of {size} bytes is larger than "
                f"max_record_bytes={self.max_record_bytes}"
            ))
            return fut
        with self._cond:
            if self._closed:
                fut.set_exception(BusError("send on a closed bus"))
                return fut
            parts = self._topic(topic)
            if key is not None:
                p = partition_for_key(bytes(key), len(parts))
            else:
                p = next(self._round_robin[topic]) % len(parts)
            part = parts[p]
            offset = part.end
            part.records.append(Message(
                topic, p, offset, None if key is None else bytes(key), bytes(value), hdrs, int(time.time() * 1000)
            ))
            # Trim in chunks so that a full partition does not pay a list shift per record.
            excess = len(part.records) - self.retention_records
            if excess > max(1, self.retention_records // 10):
                del part.records[:excess]
                part.start += excess
            self._cond.notify_all()
        fut.set_result(RecordMetadata(topic, p, offset))
        return fut

    def flush(self, timeout_s: float | None = None) -> None:
        """Nothing to do: every send is resolved before it returns."""

    def ping(self, timeout_s: float = 2.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self._closed:
            raise BusError("ping on a closed bus")

    def close(self, timeout_s: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- consuming

    def consumer(self, topics: Sequence[str], group_id: str, *, client_id: str | None = None,
                 listener: RebalanceListener | None = None) -> Consumer:
        if isinstance(topics, str) or not topics or not all(isinstance(t, str) and t for t in topics):
            raise TypeError(f"topics must be a non-empty sequence of topic names, got {topics!r}")
        if not isinstance(group_id, str) or not group_id:
            raise ValueError(f"group_id must be a non-empty str, got {group_id!r}")
        with self._cond:
            if self._closed:
                raise BusError("consumer() on a closed bus")
            for t in topics:
                self._topic(t)
            member = next(self._member_ids)
            group = self._groups.setdefault(group_id, _Group())
            group.members[member] = list(dict.fromkeys(topics))
            self._rebalance(group)
        return _InMemoryConsumer(self, group_id, member, listener)

    def _rebalance(self, group: _Group) -> None:
        """New generation; range assignment per topic (Kafka's RangeAssignor): contiguous partition ranges by member."""
        group.generation += 1
        group.assignment = {m: [] for m in group.members}
        topics = sorted({t for ts in group.members.values() for t in ts})
        for t in topics:
            subscribers = [m for m, ts in group.members.items() if t in ts]
            n = len(self._topics[t])
            per, extra = divmod(n, len(subscribers))
            start = 0
            for i, m in enumerate(subscribers):
                count = per + (1 if i < extra else 0)
                group.assignment[m].extend((t, p) for p in range(start, start + count))
                start += count
        self._cond.notify_all()

    def _leave(self, group_id: str, member: int) -> None:
        with self._cond:
            group = self._groups[group_id]
            if group.members.pop(member, None) is not None:
                self._rebalance(group)


class _InMemoryConsumer(Consumer):
    def __init__(self, bus: InMemoryBus, group_id: str, member: int,
                 listener: RebalanceListener | None = None) -> None:
        self._bus = bus
        self._group_id = group_id
        self._member = member
        self._listener = listener
        self._generation = -1  # forces a (re)sync with the group on the first poll
        self._positions: dict[tuple[str, int], int] = {}
        self._paused: set[tuple[str, int]] = set()
        self._rotation = -1
        self._closed = False

    def _sync(self, group: _Group) -> None:
        """After a rebalance: keep the position of retained partitions, start new ones at the committed offset."""
        if self._generation == group.generation:
            return
        self._generation = group.generation
        old = self._positions
        new = list(group.assignment.get(self._member, []))
        if self._listener is not None:
            revoked = [tp for tp in old if tp not in new]
            if revoked:
                group.committed.update(self._listener.on_revoked(revoked))
        self._positions = {tp: old[tp] if tp in old else group.committed.get(tp, 0) for tp in new}
        self._paused &= set(new)  # (one assigned anew starts resumed; those kept stay paused, as in kafka-python)
        if self._listener is not None:
            added = [tp for tp in new if tp not in old]
            if added:
                self._positions.update({tp: o for tp, o in self._listener.on_assigned(added).items()
                                        if tp in self._positions})

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Message]:
        if self._closed:
            raise BusError("poll on a closed consumer")
        check_poll(timeout_s, max_records)
        bus = self._bus
        deadline = time.monotonic() + timeout_s
        with bus._cond:
            while True:
                group = bus._groups[self._group_id]
                self._sync(group)
                out = self._take(max_records)
                left = deadline - time.monotonic()
                if out or left <= 0 or bus._closed:
                    return out
                bus._cond.wait(left)

    def _take(self, max_records: int) -> list[Message]:
        out: list[Message] = []
        tps = list(self._positions)
        # Start at a different partition each poll, so a busy partition does not starve the others.
        self._rotation = (self._rotation + 1) % max(1, len(tps))
        for topic, p in tps[self._rotation:] + tps[:self._rotation]:
            if (topic, p) in self._paused:
                continue
            pos = self._positions[(topic, p)]
            part = self._bus._topics[topic][p]
            pos = max(pos, part.start)  # behind retention: restart at the oldest record kept
            if pos >= part.end:
                continue
            batch = part.records[pos - part.start: pos - part.start + max_records - len(out)]
            out.extend(batch)
            self._positions[(topic, p)] = pos + len(batch)
            if len(out) >= max_records:
                break
        return out

    def commit(self, messages: Sequence[Message] | None = None) -> None:
        if self._closed:
            raise BusError("commit on a closed consumer")
        with self._bus._cond:
            group = self._bus._groups[self._group_id]
            if messages is None:
                offsets = dict(self._positions)
            else:
                offsets = {}
                for m in messages:
                    tp = (m.topic, m.partition)
                    if m.offset + 1 > offsets.get(tp, 0):
                        offsets[tp] = m.offset + 1
            group.committed.update(offsets)

    def commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        if self._closed:
            raise BusError("commit on a closed consumer")
        with self._bus._cond:
            self._bus._groups[self._group_id].committed.update(offsets)

    def assignment(self) -> list[TopicPartition]:
        with self._bus._cond:
            self._sync(self._bus._groups[self._group_id])
            return list(self._positions)

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        with self._bus._cond:
            return {(t, p): self._bus._topics[t][p].end for t, p in partitions}

    def positions(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        with self._bus._cond:
            return {tp: self._positions[tp] for tp in partitions if tp in self._positions}

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        with self._bus._cond:
            self._paused.update(tp for tp in partitions if tp in self._positions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        with self._bus._cond:
            self._paused.difference_update(partitions)
            self._bus._cond.notify_all()  # (a poll waiting on this consumer's other partitions may take them now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._listener is not None:
                with self._bus._cond:
                    group = self._bus._groups[self._group_id]
                    if self._positions:
                        group.committed.update(self._listener.on_revoked(list(self._positions)))
            self._bus._leave(self._group_id, self._member)
