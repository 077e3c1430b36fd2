"""kafka-python's consumer with its fetched record batches decoded by :mod:`rlhf.bus.kafka_records` (its own
decoding is most of what reading costs: 3.8 us a record against 1.5 us to ConsumerRecords, benchmarks/README.md).

This reaches into kafka-python's internals, which the project otherwise avoids, at one seam: the fetcher builds a
``Fetcher.PartitionRecords`` for every partition's fetched bytes and reads its records from that object's
``_unpack_records`` generator. :func:`install` gives one consumer's fetcher a subclass whose generator decodes the
bytes itself, keeping the contract the fetcher relies on (``ConsumerRecord`` s, ``next_fetch_offset`` after each
record and past control batches and the last batch, ``leader_epoch``, ``records_read`` and ``bytes_read``, ``drain``
at the end). It is used only where its assumptions hold, else the client's own path decodes the fetch:
* kafka-python 3.0.x (pinned in pyproject.toml) with the attributes checked by :func:`install`;
* no key or value deserializer configured, and ``read_uncommitted`` isolation (read_committed filters aborted
  transactions: left to the client);
* every batch of the fetch in message format v2 (:func:`~rlhf.bus.kafka_records.v2_batches`).
tests/test_kafka_fetch.py reads the same records both ways from a real broker (keys, headers, compression, a
transactional producer's control batches) and asserts they are equal.

The second seam, :func:`unpark`, works around a bug of kafka-python 3.0.12's pause/resume (a resumed partition's
fetched records stranded for good) by clearing the fetcher's drained in-line slot; the bus's contract test of
pause and resume (tests/unit/test_memory_bus.py, run on Kafka by tests/integration/test_kafka_bus.py) fails
without it.
"""
from __future__ import annotations

import logging

import kafka
import kafka.errors as kerr
from kafka.consumer.fetcher import ConsumerRecord, Fetcher

from rlhf.bus import kafka_records

log = logging.getLogger(__name__)

_READ_UNCOMMITTED = 0  # kafka-python's IsolationLevel.READ_UNCOMMITTED (the wire protocol's value)
_Base = getattr(Fetcher, "PartitionRecords", None)
_new = tuple.__new__


def supported() -> bool:
    """Whether this kafka-python has the seam as :mod:`rlhf.bus.kafka_fetch` knows it."""
    return (kafka.__version__.startswith("3.0.") and isinstance(_Base, type)
            and callable(getattr(_Base, "_unpack_records", None))
            and ConsumerRecord._fields[:4] == ("topic", "partition", "leader_epoch", "offset")
            and len(ConsumerRecord._fields) == 13)  # (built with tuple.__new__: its fields as known here)


if supported():
    class FastPartitionRecords(_Base):  # type: ignore[misc, valid-type]
        """``Fetcher.PartitionRecords`` decoding v2 batches with :mod:`rlhf.bus.kafka_records`."""

        def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
            buffer = getattr(records, "_buffer", None)
            batches = None
            if (buffer is not None and key_deserializer is None and value_deserializer is None
                    and self.isolation_level == _READ_UNCOMMITTED):
                try:
                    batches = kafka_records.v2_batches(buffer)
                except kafka_records.CorruptRecords as e:
                    raise kerr.CorruptRecordError(f"partition {tp}: {e}") from e
            if batches is None:  # (not ours to decode: the client's way, from the untouched records)
                yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
                return
            topic, partition = tp.topic, tp.partition
            for batch in batches:
                header = batch.header
                if self.check_crcs and not kafka_records.crc_ok(buffer, batch):
                    raise kerr.CorruptRecordError(
                        f"Record batch for partition {tp} at offset {header.base_offset} failed crc check")
                self.leader_epoch = header.leader_epoch
                if header.is_control:  # a transaction marker: not a record for the application
                    self.next_fetch_offset = header.next_offset
                    continue
                try:
                    decoded = kafka_records.records(buffer, batch)
                except (kafka_records.CorruptRecords, IndexError) as e:
                    raise kerr.CorruptRecordError(
                        f"partition {tp}: the record batch at offset {header.base_offset} is corrupt: {e}") from e
                epoch, ts_type = header.leader_epoch, header.timestamp_type
                for offset, timestamp, key, value, headers, size in decoded:
                    self.records_read += 1
                    self.bytes_read += size
                    self.next_fetch_offset = offset + 1
                    # (tuple.__new__: the named tuple's own __new__ is a Python call, ~0.1 us a record)
                    yield _new(ConsumerRecord, (
                        topic, partition, epoch, offset, timestamp, ts_type, key, value, headers, None,
                        len(key) if key is not None else -1, len(value) if value is not None else -1,
                        sum(len(k.encode()) + (len(v) if v is not None else 0) for k, v in headers) if headers
                        else -1))
                # v2 keeps a batch's last offset even when compaction removed its last records: the next fetch
                # starts after the batch, not at a record that is gone
                self.next_fetch_offset = header.next_offset
            self.drain()
else:  # pragma: no cover - another kafka-python: its own decoding
    FastPartitionRecords = None  # type: ignore[assignment, misc]


def install(consumer: kafka.KafkaConsumer) -> bool:
    """Decode this consumer's fetches with :class:`FastPartitionRecords` (its fetcher only, not the class: other
    consumers of the process keep the client's decoding). False, logged once, where the seam is not as expected."""
    fetcher = getattr(consumer, "_fetcher", None)
    if FastPartitionRecords is None or not isinstance(fetcher, Fetcher):
        log.info("kafka-python %s: fetched records are decoded by the client itself", kafka.__version__)
        return False
    fetcher.PartitionRecords = FastPartitionRecords
    return True


def unpark(consumer: kafka.KafkaConsumer) -> None:
    """Let a resumed partition's parked records be returned (call before each poll of a consumer that pauses).

    kafka-python 3.0.12 keeps the records it had fetched of a partition when it is paused (KAFKA-7548), parked
    until it is resumed, and restores them only into an empty in-line slot (``_next_partition_records is None``).
    But the slot is left holding the last partition's records once they are drained, not None, so after any other
    partition's records were returned the parked ones are never restored, and the partition, which has parked
    records, is never fetched again either: it stalls for good (seen in the trainer, which pauses its feedback
    partitions). A drained records object in the slot is cleared here, as the fetcher treats it (both are falsy to
    it), so that the restore sees the slot empty. The bus's pause/resume contract test (tests/unit/test_memory_bus.py,
    run on a real broker by tests/integration/test_kafka_bus.py) fails without it."""
    fetcher = getattr(consumer, "_fetcher", None)
    if not getattr(fetcher, "_paused_partition_records", None):
        return
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current:
        fetcher._next_partition_records = None


def installed(consumer: kafka.KafkaConsumer) -> bool:
    fetcher = getattr(consumer, "_fetcher", None)
    return FastPartitionRecords is not None and getattr(fetcher, "PartitionRecords", None) is FastPartitionRecords
