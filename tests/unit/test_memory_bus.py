"""The in-process bus: the bus contract (shared with the real-Kafka tests) plus what only it has.

``BusContract`` is the behaviour every Bus keeps; tests/integration/test_kafka_bus.py runs the same class against a
real broker, so "identical to Kafka where observable" is checked, not assumed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from rlhf.bus import InMemoryBus, bus_from_url, topics
from rlhf.bus.base import (
    Bus, BusError, BusUnavailable, Consumer, Message, PartitionRecords, RebalanceListener, RecordMetadata, TopicSpec,
)
from rlhf.bus.partitioning import partition_for_key


def poll_until(consumer: Consumer, want: int, timeout_s: float = 30.0,
               stop: Callable[[list[Message]], bool] | None = None) -> list[Message]:
    """Poll until ``want`` records arrived (or ``stop(records)``), failing after ``timeout_s``."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and not (stop and stop(got)):
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(got)} of {want} records within {timeout_s}s")
        got.extend(consumer.poll(timeout_s=0.5))
    return got


def poll_partitions_until(consumer: Consumer, want: int, timeout_s: float = 30.0,
                          max_records: int = 500) -> list[list[PartitionRecords]]:
    """``poll_partitions`` until ``want`` records arrived, failing after ``timeout_s``: what each poll returned."""
    polls: list[list[PartitionRecords]] = []
    deadline = time.monotonic() + timeout_s
    while sum(len(r.offsets) for batch in polls for r in batch) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {sum(len(r.offsets) for b in polls for r in b)} of {want} records "
                                 f"within {timeout_s}s")
        polls.append(consumer.poll_partitions(timeout_s=0.5, max_records=max_records))
    return polls


def check_columns(polls: list[list[PartitionRecords]], topic: str) -> dict[tuple[int, int], bytes]:
    """Assert the shape poll_partitions promises for every poll (one entry per partition, none empty, offsets
    ascending, one value per offset, nothing twice); the records by (partition, offset)."""
    records: dict[tuple[int, int], bytes] = {}
    for batch in polls:
        assert all(type(r) is PartitionRecords for r in batch), batch
        assert len({r.partition for r in batch}) == len(batch), f"a partition twice in one poll: {batch}"
        for r in batch:
            assert r.topic == topic
            assert r.offsets and len(r.values) == len(r.offsets)
            assert r.offsets == sorted(set(r.offsets)), f"offsets not strictly ascending: {r.offsets}"
            for offset, value in zip(r.offsets, r.values):
                assert (r.partition, offset) not in records, f"{(r.partition, offset)} returned twice"
                records[(r.partition, offset)] = value
    return records


def key_for_partition(partition: int, partitions: int) -> bytes:
    """A key that Kafka's partitioner puts in ``partition`` of ``partitions``."""
    return next(k for k in (b"key-%d" % i for i in range(10_000)) if partition_for_key(k, partitions) == partition)


def poll_quiet(consumer: Consumer, seconds: float) -> list[Message]:
    """Everything a consumer receives during ``seconds``."""
    got: list[Message] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_s=0.2))
    return got


def assert_only_new_records_arrive(bus: Bus, consumer: Consumer, topic: str, settle_s: float) -> None:
    """Nothing old is (re)delivered: quiet for ``settle_s``, then a new record arrives and nothing else does."""
    assert poll_quiet(consumer, settle_s) == []
    md = bus.send(topic, b"sentinel", key=b"sentinel").result(30)
    got = poll_until(consumer, 1)
    got += poll_quiet(consumer, 0.3)
    assert [(m.value, m.partition, m.offset) for m in got] == [(b"sentinel", md.partition, md.offset)]


class BusContract:
    """What every Bus implementation does. Subclasses provide the ``bus`` fixture."""

    PARTITIONS = 3
    # How long a consumer of this implementation may need to join its group and fetch (Kafka: a join round trip).
    SETTLE_S = 0.2

    @pytest.fixture
    def topic(self, bus: Bus, topic_name: str) -> str:
        bus.ensure_topics([TopicSpec(topic_name, partitions=self.PARTITIONS)])
        return topic_name

    def test_round_trip_keeps_key_value_headers(self, bus: Bus, topic: str, group_id: str) -> None:
        md = bus.send(topic, b"value-1", key=b"key-1", headers=[("trace", b"t-1"), ("kind", b"rating")]).result(30)
        assert isinstance(md, RecordMetadata)
        assert (md.topic, md.partition) == (topic, partition_for_key(b"key-1", self.PARTITIONS))
        with bus.consumer([topic], group_id) as consumer:
            [m] = poll_until(consumer, 1)
        assert (m.topic, m.partition, m.offset) == (md.topic, md.partition, md.offset)
        assert (m.key, m.value) == (b"key-1", b"value-1")
        assert m.headers == (("trace", b"t-1"), ("kind", b"rating"))
        assert abs(m.timestamp_ms / 1000 - time.time()) < 60

    def test_unkeyed_records_and_empty_values_round_trip(self, bus: Bus, topic: str, group_id: str) -> None:
        futures = [bus.send(topic, b"") for _ in range(3)] + [bus.send(topic, bytearray(b"ba"))]
        mds = [f.result(30) for f in futures]
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 4)
        assert sorted(m.value for m in got) == [b"", b"", b"", b"ba"]
        assert {(m.partition, m.offset) for m in got} == {(md.partition, md.offset) for md in mds}
        assert all(m.key is None for m in got)

    def test_records_of_a_key_keep_their_order_and_partition(self, bus: Bus, topic: str, group_id: str) -> None:
        keys = [b"alpha", b"beta", b"gamma", b"delta"]
        futures = [bus.send(topic, f"{k.decode()}-{i}".encode(), key=k) for i in range(50) for k in keys]
        bus.flush(30)
        assert all(f.done() for f in futures)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 200)
        for k in keys:
            mine = [m for m in got if m.key == k]
            assert [m.value for m in mine] == [f"{k.decode()}-{i}".encode() for i in range(50)]
            assert {m.partition for m in mine} == {partition_for_key(k, self.PARTITIONS)}
            assert [m.offset for m in mine] == sorted(m.offset for m in mine)

    def test_new_group_reads_from_the_earliest_record(self, bus: Bus, topic: str, group_id: str) -> None:
        for i in range(5):
            bus.send(topic, b"%d" % i, key=b"k")
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            assert [m.value for m in poll_until(consumer, 5)] == [b"0", b"1", b"2", b"3", b"4"]

    def test_uncommitted_records_move_with_their_partition_when_a_member_joins(
        self, bus: Bus, topic: str, group_id: str
    ) -> None:
        sent = {(md.partition, md.offset) for md in
                (bus.send(topic, b"v%d" % i, key=b"k%d" % i).result(30) for i in range(30))}
        assert len({p for p, _ in sent}) == self.PARTITIONS, "the records should span every partition"
        first = bus.consumer([topic], group_id)
        second = None
        try:
            assert {(m.partition, m.offset) for m in poll_until(first, 30)} == sent
            # Nothing committed. A second member joins and takes over some partitions: it starts them at the
            # committed offset (none: the earliest), so it receives their records again.
            second = bus.consumer([topic], group_id)
            again: list[Message] = []
            to_first: list[Message] = []
            deadline = time.monotonic() + 60

            def redelivered_all_of_its_partitions() -> bool:
                moved = {m.partition for m in again}
                return bool(moved) and {(m.partition, m.offset) for m in again} == {
                    (p, o) for p, o in sent if p in moved
                }

            while not redelivered_all_of_its_partitions():
                assert time.monotonic() < deadline, f"redelivered {len(again)} records"
                to_first += first.poll(timeout_s=0.2)
                again += second.poll(timeout_s=0.2)
            to_first += poll_quiet(first, 0.5)
            again += poll_quiet(second, 0.5)
            # The first member keeps its position on the partitions it kept: nothing again for it.
            assert to_first == []
            assert len(again) == len({(m.partition, m.offset) for m in again}) < 30
        finally:
            first.close()
            if second is not None:
                second.close()

    def test_uncommitted_records_are_redelivered_after_the_member_leaves(
        self, bus: Bus, topic: str, group_id: str
    ) -> None:
        for i in range(12):
            bus.send(topic, b"v%d" % i, key=b"k%d" % i)
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 12)
            consumer.commit([m for m in got if m.partition == got[0].partition])
        done = {(m.partition, m.offset) for m in got if m.partition == got[0].partition}
        with bus.consumer([topic], group_id) as consumer:
            again = poll_until(consumer, 12 - len(done))
            assert {(m.partition, m.offset) for m in again} == {(m.partition, m.offset) for m in got} - done

    def test_committed_records_are_not_redelivered(self, bus: Bus, topic: str, group_id: str) -> None:
        for i in range(20):
            bus.send(topic, b"v%d" % i, key=b"k%d" % i)
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 20)
            consumer.commit(got)
        with bus.consumer([topic], group_id) as consumer:
            assert_only_new_records_arrive(bus, consumer, topic, self.SETTLE_S)

    def test_commit_of_some_messages_commits_per_partition_their_highest_offset(
        self, bus: Bus, topic_name: str, group_id: str
    ) -> None:
        bus.ensure_topics([TopicSpec(topic_name, partitions=2)])
        ka, kb = key_for_partition(0, 2), key_for_partition(1, 2)
        for i in range(10):
            bus.send(topic_name, b"a%d" % i, key=ka)
            bus.send(topic_name, b"b%d" % i, key=kb)
        bus.flush(30)
        with bus.consumer([topic_name], group_id) as consumer:
            got = poll_until(consumer, 20)
            a = [m for m in got if m.key == ka]
            b = [m for m in got if m.key == kb]
            # Out of order on purpose: the highest offset of each partition counts, not the last message.
            consumer.commit([a[6], a[2], b[0]])
        with bus.consumer([topic_name], group_id) as consumer:
            again = poll_until(consumer, 3 + 9)
        assert sorted(m.value for m in again if m.key == ka) == [b"a7", b"a8", b"a9"]
        assert [m.value for m in again if m.key == kb] == [b"b%d" % i for i in range(1, 10)]

    def test_commit_without_messages_commits_everything_polled(self, bus: Bus, topic: str, group_id: str) -> None:
        for i in range(6):
            bus.send(topic, b"%d" % i, key=b"k%d" % i)
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            poll_until(consumer, 6)
            consumer.commit()
            consumer.commit([])  # nothing to do
        with bus.consumer([topic], group_id) as consumer:
            assert_only_new_records_arrive(bus, consumer, topic, self.SETTLE_S)

    def test_a_listeners_offsets_win_over_the_groups_committed_ones(self, bus: Bus, topic: str,
                                                                    group_id: str) -> None:
        key = key_for_partition(1, self.PARTITIONS)
        mds = [bus.send(topic, b"%d" % i, key=key).result(30) for i in range(6)]
        with bus.consumer([topic], group_id) as consumer:
            consumer.commit(poll_until(consumer, 6))  # the group is past everything

        class StoredOffsets(RebalanceListener):
            assigned: list = []

            def on_assigned(self, partitions):
                self.assigned.extend(partitions)
                return {(topic, 1): mds[2].offset}  # "my data ends before offset 2 of partition 1"

        listener = StoredOffsets()
        with bus.consumer([topic], group_id, listener=listener) as consumer:
            got = poll_until(consumer, 4)
            assert [m.value for m in got] == [b"2", b"3", b"4", b"5"]
            assert sorted(listener.assigned) == [(topic, p) for p in range(self.PARTITIONS)]
            assert sorted(consumer.assignment()) == [(topic, p) for p in range(self.PARTITIONS)]
            ends = consumer.end_offsets([(topic, 1), (topic, 0)])
            assert ends == {(topic, 1): mds[-1].offset + 1, (topic, 0): 0}

    def test_a_listener_commits_its_offsets_when_its_partitions_are_revoked(self, bus: Bus, topic: str,
                                                                           group_id: str) -> None:
        key = key_for_partition(0, self.PARTITIONS)
        for i in range(5):
            bus.send(topic, b"%d" % i, key=key)
        bus.flush(30)

        class Revoked(RebalanceListener):
            revoked: list = []

            def on_revoked(self, partitions):
                self.revoked.extend(partitions)
                return {(topic, 0): 3} if (topic, 0) in partitions else {}

        listener = Revoked()
        with bus.consumer([topic], group_id, listener=listener) as consumer:
            poll_until(consumer, 5)  # read everything, commit nothing: leaving revokes the partitions
        assert (topic, 0) in listener.revoked
        deadline = time.monotonic() + 30  # Kafka: the commit on revoke is asynchronous
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 2)
            while len(got) < 2 and time.monotonic() < deadline:
                got += consumer.poll(0.2)
            assert [m.value for m in got] == [b"3", b"4"]

    def test_commit_offsets_commits_explicit_offsets(self, bus: Bus, topic: str, group_id: str) -> None:
        key = key_for_partition(2, self.PARTITIONS)
        for i in range(4):
            bus.send(topic, b"%d" % i, key=key)
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            poll_until(consumer, 4)
            consumer.commit_offsets({(topic, 2): 1})
        with bus.consumer([topic], group_id) as consumer:
            assert [m.value for m in poll_until(consumer, 3)] == [b"1", b"2", b"3"]

    def test_commit_offsets_async_commits_without_waiting(self, bus: Bus, topic: str, group_id: str) -> None:
        key = key_for_partition(1, self.PARTITIONS)
        for i in range(4):
            bus.send(topic, b"%d" % i, key=key)
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            poll_until(consumer, 4)
            consumer.commit_offsets_async({(topic, 1): 2})
            poll_quiet(consumer, 0.5)  # (Kafka: its network thread sends the commit meanwhile)
        with bus.consumer([topic], group_id) as consumer:
            assert [m.value for m in poll_until(consumer, 2)] == [b"2", b"3"]

    def test_groups_are_independent(self, bus: Bus, topic: str, group_id: str) -> None:
        bus.send(topic, b"x", key=b"k").result(30)
        with bus.consumer([topic], group_id) as a:
            a.commit(poll_until(a, 1))
        with bus.consumer([topic], group_id + "-other") as b:
            assert [m.value for m in poll_until(b, 1)] == [b"x"]

    def test_readers_each_read_every_partition_from_the_beginning(self, bus: Bus, topic: str) -> None:
        """A broadcast reader (rlhf.models.v1's followers): two of them both get every record written before and
        after they were made; commit is accepted and changes nothing for the next reader."""
        for i in range(6):
            bus.send(topic, f"before-{i}".encode(), key=f"k{i}".encode()).result(30)
        with bus.reader([topic], client_id="replica-a") as a, bus.reader([topic], client_id="replica-b") as b:
            assert sorted(a.assignment()) == [(topic, p) for p in range(self.PARTITIONS)]
            got_a = poll_until(a, 6)
            a.commit(got_a)
            for i in range(3):
                bus.send(topic, f"after-{i}".encode(), key=f"k{i}".encode()).result(30)
            got_a += poll_until(a, 3)
            got_b = poll_until(b, 9)
        values = sorted([f"before-{i}".encode() for i in range(6)] + [f"after-{i}".encode() for i in range(3)])
        assert sorted(m.value for m in got_a) == values and sorted(m.value for m in got_b) == values
        with bus.reader([topic]) as again:  # a reader keeps no position: the next one starts at the beginning
            assert len(poll_until(again, 9)) == 9

    def test_a_reader_starts_where_it_is_told_and_elsewhere_at_the_beginning(self, bus: Bus, topic: str) -> None:
        other_key = next(k for k in (f"key-{i}".encode() for i in range(100))
                         if partition_for_key(k, self.PARTITIONS) != partition_for_key(b"one-key", self.PARTITIONS))
        mds = [bus.send(topic, f"r-{i}".encode(), key=b"one-key").result(30) for i in range(5)]
        bus.send(topic, b"elsewhere", key=other_key).result(30)
        partition = mds[0].partition
        with bus.reader([topic], start_at={(topic, partition): mds[3].offset}) as reader:
            got = poll_until(reader, 3)
            assert poll_quiet(reader, self.SETTLE_S) == []
        assert sorted(m.value for m in got) == [b"elsewhere", b"r-3", b"r-4"]

    def test_ensure_topics_is_idempotent_and_creates_the_partitions(self, bus: Bus, topic_name: str) -> None:
        spec = TopicSpec(topic_name, partitions=5, config=(("retention.ms", "3600000"),))
        bus.ensure_topics([spec])
        bus.ensure_topics([spec, spec])
        bus.ensure_topics([])
        # A key that hashes to the last partition lands there: the topic has 5 partitions, hashed like Kafka.
        assert bus.send(topic_name, b"v", key=key_for_partition(4, 5)).result(30).partition == 4

    def test_ensure_topics_rejects_bad_specs(self, bus: Bus, topic_name: str) -> None:
        with pytest.raises(ValueError):
            bus.ensure_topics([TopicSpec(topic_name, partitions=0)])
        with pytest.raises(ValueError):
            bus.ensure_topics([TopicSpec(topic_name, partitions=1), TopicSpec(topic_name, partitions=2)])
        with pytest.raises(TypeError):
            bus.ensure_topics([topic_name])  # type: ignore[list-item]

    def test_ping_answers(self, bus: Bus) -> None:
        bus.ping(5.0)
        with pytest.raises(ValueError):
            bus.ping(0)

    def test_malformed_records_raise_at_once(self, bus: Bus, topic: str) -> None:
        with pytest.raises(TypeError, match="value"):
            bus.send(topic, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="value"):
            bus.send(topic, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key"):
            bus.send(topic, b"v", key="k")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="headers"):
            bus.send(topic, b"v", headers=[("h", "not bytes")])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="headers"):
            bus.send(topic, b"v", headers=[["h", b"v"]])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="topic"):
            bus.send("", b"v")
        with pytest.raises(TypeError, match="topic"):
            bus.send(b"t", b"v")  # type: ignore[arg-type]

    def test_bad_consumer_arguments_raise(self, bus: Bus, topic: str, group_id: str) -> None:
        with pytest.raises(TypeError):
            bus.consumer(topic, group_id)  # a str is not a list of topics
        with pytest.raises(TypeError):
            bus.consumer([], group_id)
        with pytest.raises(ValueError):
            bus.consumer([topic], "")
        with bus.consumer([topic], group_id) as consumer:
            with pytest.raises(ValueError):
                consumer.poll(timeout_s=-1)
            with pytest.raises(ValueError):
                consumer.poll(max_records=0)
        with pytest.raises(BusError):
            consumer.poll()

    def test_poll_respects_max_records_and_timeout(self, bus: Bus, topic: str, group_id: str) -> None:
        for i in range(10):
            bus.send(topic, b"%d" % i, key=b"same")
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 1)
            while len(got) < 10:
                batch = consumer.poll(timeout_s=0.5, max_records=3)
                assert len(batch) <= 3
                got += batch
            t = time.monotonic()
            assert consumer.poll(timeout_s=0.3) == []
            assert time.monotonic() - t < 5

    # -- poll_partitions: poll's records as columns per partition

    def test_poll_partitions_returns_the_records_written_by_partition(self, bus: Bus, topic: str,
                                                                       group_id: str) -> None:
        """Values at their offsets, in offset order, per partition; a partition without records is left out.
        A reader returns the same columns."""
        sent = {}
        for i in range(30):  # partitions 0 and 2 only, interleaved, different counts
            p = 0 if i % 3 else 2
            md = bus.send(topic, b"p%d-%d" % (p, i), key=key_for_partition(p, self.PARTITIONS)).result(30)
            assert md.partition == p
            sent[(md.partition, md.offset)] = b"p%d-%d" % (p, i)
        with bus.consumer([topic], group_id) as consumer:
            polls = poll_partitions_until(consumer, len(sent))
            polls.append(consumer.poll_partitions(timeout_s=self.SETTLE_S))  # nothing more, nothing again
        assert check_columns(polls, topic) == sent
        assert polls[-1] == []
        assert {r.partition for batch in polls for r in batch} == {0, 2}
        # In the order written: partition 0 got 20 records at offsets 0..19, partition 2 got 10 at 0..9.
        by_partition: dict[int, list[bytes]] = {}
        for batch in polls:
            for r in batch:
                by_partition.setdefault(r.partition, []).extend(r.values)
        assert by_partition[0] == [b"p0-%d" % i for i in range(30) if i % 3]
        assert by_partition[2] == [b"p2-%d" % i for i in range(30) if not i % 3]
        with bus.reader([topic]) as reader:
            assert check_columns(poll_partitions_until(reader, len(sent)), topic) == sent

    def test_a_paused_partition_returns_nothing_until_resumed_then_everything_once(self, bus: Bus, topic: str,
                                                                                   group_id: str) -> None:
        """Paused after some of its records were returned (the rest fetched already, on Kafka), a partition returns
        nothing while the others are read to their end, and once resumed the rest of it, each record once. On
        kafka-python 3.0.12 its fetched records stayed parked for good here (rlhf.bus.kafka_fetch.unpark)."""
        sent: dict[tuple[int, int], bytes] = {}
        for p in (0, 1):
            outcomes = bus.send_batch(topic, [(b"p%d-%d" % (p, i), key_for_partition(p, self.PARTITIONS))
                                              for i in range(300)]).result(30)
            sent.update({(md.partition, md.offset): b"p%d-%d" % (p, i) for i, md in enumerate(outcomes)})
        with bus.consumer([topic], group_id) as consumer:
            got: dict[tuple[int, int], bytes] = {}
            first = None
            deadline = time.monotonic() + 30
            while first is None and time.monotonic() < deadline:
                for r in consumer.poll_partitions(timeout_s=0.5, max_records=10):
                    first = r.partition
                    got.update({(r.partition, o): v for o, v in zip(r.offsets, r.values)})
            assert first is not None
            other = 1 - first
            consumer.pause([(topic, first)])
            while len([k for k in got if k[0] == other]) < 300 and time.monotonic() < deadline:
                for r in consumer.poll_partitions(timeout_s=0.5, max_records=50):
                    assert r.partition != first, "a paused partition returned records"
                    for o, v in zip(r.offsets, r.values):
                        assert (r.partition, o) not in got
                        got[(r.partition, o)] = v
            assert consumer.poll_partitions(timeout_s=self.SETTLE_S) == []  # the other is done; this one waits
            consumer.resume([(topic, first)])
            while len(got) < len(sent) and time.monotonic() < deadline:
                for r in consumer.poll_partitions(timeout_s=0.5, max_records=50):
                    for o, v in zip(r.offsets, r.values):
                        assert (r.partition, o) not in got
                        got[(r.partition, o)] = v
        assert got == sent

    def test_poll_partitions_respects_max_records(self, bus: Bus, topic: str, group_id: str) -> None:
        sent = {}
        for i in range(25):
            md = bus.send(topic, b"v%d" % i, key=b"k%d" % i).result(30)
            sent[(md.partition, md.offset)] = b"v%d" % i
        assert len({p for p, _ in sent}) == self.PARTITIONS
        with bus.consumer([topic], group_id) as consumer:
            polls = poll_partitions_until(consumer, len(sent), max_records=4)
            sizes = [sum(len(r.offsets) for r in batch) for batch in polls]
            assert max(sizes) <= 4, sizes
            assert sum(sizes) == len(sent)  # nothing lost between the polls, nothing returned twice
            assert check_columns(polls, topic) == sent
            assert consumer.poll(timeout_s=self.SETTLE_S) == []  # the positions are past everything returned
            with pytest.raises(ValueError):
                consumer.poll_partitions(max_records=0)
            with pytest.raises(ValueError):
                consumer.poll_partitions(timeout_s=-1)
        with pytest.raises(BusError):
            consumer.poll_partitions()

    def test_commit_after_poll_partitions_commits_past_what_it_returned(self, bus: Bus, topic: str,
                                                                          group_id: str) -> None:
        """commit() after a poll_partitions that returned fewer records than there are (max_records) commits past
        those returned, no further and no less: a new member of the group resumes right after them."""
        sent = {}
        for i in range(24):
            md = bus.send(topic, b"v%d" % i, key=b"k%d" % i).result(30)
            sent[(md.partition, md.offset)] = b"v%d" % i
        with bus.consumer([topic], group_id) as consumer:
            polls = poll_partitions_until(consumer, 1, max_records=5)
            consumer.commit()
        first = check_columns(polls, topic)
        assert 1 <= len(first) <= 5
        with bus.consumer([topic], group_id) as consumer:
            polls = poll_partitions_until(consumer, len(sent) - len(first))
            polls.append(consumer.poll_partitions(timeout_s=self.SETTLE_S))
        rest = check_columns(polls, topic)
        assert rest.keys().isdisjoint(first.keys())
        assert {**first, **rest} == sent

    def test_record_too_large_fails_with_bus_error(self, bus: Bus, topic: str) -> None:
        fut = bus.send(topic, b"x" * (2 * 1024 * 1024))
        with pytest.raises(BusError) as err:
            fut.result(30)
        assert not isinstance(err.value, BusUnavailable)

    def test_flush_resolves_every_future(self, bus: Bus, topic: str) -> None:
        futures = [bus.send(topic, b"%d" % i, key=b"%d" % (i % 7)) for i in range(2000)]
        bus.flush(60)
        assert all(f.done() and f.exception() is None for f in futures)

    def test_publish_from_asyncio(self, bus: Bus, topic: str) -> None:
        async def main() -> list[RecordMetadata]:
            return await asyncio.gather(*(bus.publish(topic, b"%d" % i, key=b"k") for i in range(100)))

        mds = asyncio.run(main())
        assert [md.offset for md in mds] == sorted(md.offset for md in mds)
        assert len({md.offset for md in mds}) == 100

    def test_send_from_many_threads(self, bus: Bus, topic: str, group_id: str) -> None:
        def worker(n: int) -> list[concurrent.futures.Future]:
            return [bus.send(topic, b"%d-%d" % (n, i), key=b"%d" % n) for i in range(100)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [f for fs in pool.map(worker, range(4)) for f in fs]
        for f in futures:
            f.result(30)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, 400)
        for n in range(4):
            assert [m.value for m in got if m.key == b"%d" % n] == [b"%d-%d" % (n, i) for i in range(100)]

    def test_send_after_close_fails(self, bus: Bus, topic: str) -> None:
        bus.send(topic, b"before").result(30)
        bus.close(10)
        bus.close(10)  # idempotent
        with pytest.raises(BusError):
            bus.send(topic, b"after").result(10)


    # -- send_batch: the same guarantees per record, one future for the batch

    def test_send_batch_places_records_like_send(self, bus: Bus, topic: str, group_id: str) -> None:
        records = [(b"v%d" % i, b"key-%d" % (i % 13) if i % 5 else None) for i in range(300)]
        outcomes = bus.send_batch(topic, records).result(30)
        assert len(outcomes) == len(records)
        assert all(isinstance(md, RecordMetadata) and md.topic == topic for md in outcomes)
        for md, (_, key) in zip(outcomes, records):
            if key is not None:
                assert md.partition == partition_for_key(key, self.PARTITIONS)
        assert len({(md.partition, md.offset) for md in outcomes}) == len(records)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, len(records))
        at = {(m.partition, m.offset): (m.value, m.key) for m in got}
        assert [at[(md.partition, md.offset)] for md in outcomes] == records

    def test_send_batch_keeps_the_order_of_a_key_with_send(self, bus: Bus, topic: str, group_id: str) -> None:
        expected = []
        for round_ in range(5):
            bus.send(topic, b"single-%d" % round_, key=b"k")
            batch = [(b"batch-%d-%d" % (round_, i), b"k") for i in range(20)]
            bus.send_batch(topic, batch)
            expected += [b"single-%d" % round_] + [v for v, _ in batch]
        bus.flush(30)
        with bus.consumer([topic], group_id) as consumer:
            got = poll_until(consumer, len(expected))
        assert [m.value for m in got] == expected

    def test_send_batch_checks_every_record_before_queuing_any(self, bus: Bus, topic: str, group_id: str) -> None:
        with pytest.raises(TypeError, match="value"):
            bus.send_batch(topic, [(b"fine", b"k"), ("text", b"k")])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="key"):
            bus.send_batch(topic, [(b"fine", "k")])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="topic"):
            bus.send_batch("", [(b"v", None)])
        assert bus.send_batch(topic, []).result(5) == []
        with bus.consumer([topic], group_id) as consumer:
            assert_only_new_records_arrive(bus, consumer, topic, self.SETTLE_S)

    def test_send_batch_fails_only_the_record_too_large(self, bus: Bus, topic: str) -> None:
        big = b"x" * (2 * 1024 * 1024)
        outcomes = bus.send_batch(topic, [(b"small-1", b"a"), (big, b"b"), (b"small-2", b"c")]).result(30)
        assert isinstance(outcomes[0], RecordMetadata) and isinstance(outcomes[2], RecordMetadata)
        assert isinstance(outcomes[1], BusError) and not isinstance(outcomes[1], BusUnavailable)

    def test_publish_batch_from_asyncio(self, bus: Bus, topic: str) -> None:
        async def main() -> list[list]:
            return await asyncio.gather(*(bus.publish_batch(topic, [(b"%d-%d" % (n, i), b"k%d" % n)
                                                                      for i in range(50)]) for n in range(4)))

        for outcomes in asyncio.run(main()):
            offsets = [md.offset for md in outcomes]
            assert offsets == sorted(offsets) and len(set(offsets)) == 50

    def test_send_batch_after_close_fails_every_record(self, bus: Bus, topic: str) -> None:
        bus.send(topic, b"before").result(30)
        bus.close(10)
        outcomes = bus.send_batch(topic, [(b"a", None), (b"b", b"k")]).result(10)
        assert len(outcomes) == 2 and all(isinstance(o, BusError) for o in outcomes)


class TestInMemoryBusContract(BusContract):
    @pytest.fixture
    def bus(self) -> InMemoryBus:
        bus = InMemoryBus()
        yield bus
        bus.close()


# --------------------------------------------------------------------------------------------- in-memory only


def test_send_resolves_before_returning_and_autocreates_topics() -> None:
    bus = InMemoryBus(default_partitions=2)
    fut = bus.send("fresh", b"v")
    assert fut.done() and not fut.cancel()
    assert fut.result().topic == "fresh" and bus.partitions("fresh") == 2
    with bus.consumer(["also-fresh"], "g"):
        assert bus.partitions("also-fresh") == 2


def test_unkeyed_records_spread_round_robin() -> None:
    bus = InMemoryBus()
    bus.ensure_topics([TopicSpec("t", partitions=3)])
    assert [bus.send("t", b"v").result().partition for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_range_assignment_splits_partitions_between_members() -> None:
    bus = InMemoryBus()
    bus.ensure_topics([TopicSpec("t", partitions=4)])
    for i in range(40):
        bus.send("t", b"%d" % i, key=b"%d" % i)
    a, b = bus.consumer(["t"], "g"), bus.consumer(["t"], "g")
    got_a, got_b = a.poll(0, max_records=1000), b.poll(0, max_records=1000)
    assert len(got_a) + len(got_b) == 40
    assert not {m.partition for m in got_a} & {m.partition for m in got_b}
    assert len({m.partition for m in got_a}) == len({m.partition for m in got_b}) == 2
    b.commit(got_b[:1])
    a.close()
    # The survivor takes over a's partitions from their committed offsets (none: everything again) and keeps
    # its position on its own.
    again = b.poll(0, max_records=1000)
    assert sorted((m.partition, m.offset) for m in again) == sorted((m.partition, m.offset) for m in got_a)
    b.close()


def test_retention_drops_the_oldest_and_a_lagging_consumer_skips_ahead() -> None:
    bus = InMemoryBus(retention_records=10)
    for i in range(100):
        bus.send("t", b"%d" % i)
    with bus.consumer(["t"], "g") as consumer:
        got = consumer.poll(0, max_records=1000)
    assert 10 <= len(got) <= 11
    assert got[-1].value == b"99" and got[-1].offset == 99
    assert [m.offset for m in got] == list(range(got[0].offset, 100))


def test_the_default_poll_partitions_groups_the_records_of_poll() -> None:
    """Consumer.poll_partitions for a consumer without its own: poll's arguments passed on, its records grouped by
    (topic, partition) in the order their first record came, each partition's records in poll's order."""

    class Polled(Consumer):
        def __init__(self, batches: list[list[Message]]) -> None:
            self.batches = batches
            self.calls: list[tuple[float, int]] = []

        def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Message]:
            self.calls.append((timeout_s, max_records))
            return self.batches.pop(0)

        def commit(self, messages: object = None) -> None: ...

        def close(self) -> None: ...

    def m(topic: str, partition: int, offset: int) -> Message:
        return Message(topic, partition, offset, b"key", b"%s-%d-%d" % (topic.encode(), partition, offset))

    consumer = Polled([[m("a", 1, 5), m("b", 1, 0), m("a", 1, 6), m("a", 0, 2), m("b", 1, 1), m("a", 1, 7)], []])
    assert consumer.poll_partitions(0.25, 7) == [
        PartitionRecords("a", 1, [5, 6, 7], [b"a-1-5", b"a-1-6", b"a-1-7"]),
        PartitionRecords("b", 1, [0, 1], [b"b-1-0", b"b-1-1"]),
        PartitionRecords("a", 0, [2], [b"a-0-2"]),
    ]
    assert consumer.poll_partitions() == []
    assert consumer.calls == [(0.25, 7), (1.0, 500)]


def test_poll_wakes_up_when_a_record_arrives() -> None:
    bus = InMemoryBus()
    consumer = bus.consumer(["t"], "g")
    timer = threading.Timer(0.2, lambda: bus.send("t", b"late"))
    timer.start()
    t = time.monotonic()
    got = consumer.poll(timeout_s=10)
    assert [m.value for m in got] == [b"late"] and time.monotonic() - t < 5
    consumer.close()


def test_max_record_bytes_counts_key_value_and_headers() -> None:
    bus = InMemoryBus(max_record_bytes=10)
    assert bus.send("t", b"x" * 10).result().offset == 0
    with pytest.raises(BusError, match="max_record_bytes"):
        bus.send("t", b"x" * 5, key=b"k" * 3, headers=[("h", b"vv")]).result()


def test_bus_from_url() -> None:
    assert isinstance(bus_from_url("memory://"), InMemoryBus)
    assert bus_from_url("memory://") is not bus_from_url("memory://")
    shared = bus_from_url("memory://embedded-test")
    assert bus_from_url("memory://embedded-test") is shared
    shared.close()
    assert bus_from_url("memory://embedded-test") is not shared  # a closed named bus is replaced
    with pytest.raises(ValueError, match="unknown bus URL"):
        bus_from_url("amqp://localhost")
    with pytest.raises(TypeError):
        bus_from_url(None)  # type: ignore[arg-type]


def test_importing_the_bus_does_not_import_kafka() -> None:
    code = (
        "import sys, rlhf.bus, rlhf.cache\n"
        "from rlhf.bus import InMemoryBus, bus_from_url, topics\n"
        "from rlhf.cache import InMemoryCache, cache_from_url\n"
        "heavy = [m for m in ('kafka', 'rlhf.bus.kafka', 'redis', 'rlhf.cache.redis') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "rlhf.bus.KafkaConfig\n"
        "assert 'kafka' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_platform_topics() -> None:
    specs = topics.platform_topics(partitions=6)
    assert [s.name for s in specs] == [
        "rlhf.responses.v1", "rlhf.feedback.v1", "rlhf.feedback.v1.dlq", "rlhf.prompts.v1", "rlhf.models.v1",
    ]
    assert {s.name: s.partitions for s in specs}[topics.MODELS] == 1
    assert {s.partitions for s in specs if s.name != topics.MODELS} == {6}
    with pytest.raises(ValueError):
        topics.platform_topics(partitions=0)
