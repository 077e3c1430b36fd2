"""rlhf.bus.kafka_records (Kafka's v2 record batches decoded from bytes) and rlhf.bus.kafka_fetch (kafka-python's
fetcher reading them): equal to kafka-python's own decoding, record for record, on batches kafka-python's builder
writes (keys, null values, headers, multi-byte lengths, gzip, log-append time, control batches, a batch cut short),
and kafka-python's fetcher contract (offsets after partial takes, a fetch offset inside a batch, drain).
tests/integration/test_kafka_fetch.py reads the same records both ways from a real broker."""
from __future__ import annotations

import os
import struct

import pytest
from kafka.consumer.fetcher import Fetcher
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition

from rlhf.bus import kafka_fetch, kafka_records

TP = TopicPartition("t", 0)


def build(records, *, offset: int = 0, compression: int = 0) -> bytes:
    """One v2 batch of (timestamp, key, value, headers) written by kafka-python's builder."""
    builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1 << 30, offset=offset)
    for timestamp, key, value, headers in records:
        builder.append(timestamp=timestamp, key=key, value=value, headers=headers)
    builder.close()
    return bytes(builder.buffer())


def mixed(n: int, start: int = 1_700_000_000_000) -> list:
    """Records with every shape the format allows: null and empty keys and values, lengths of one to three varint
    bytes, headers (a null value, a non-ASCII key), timestamp deltas past a byte."""
    out = []
    for i in range(n):
        key = None if i % 3 == 0 else (b"" if i % 7 == 0 else f"key-{i}".encode())
        value = None if i % 11 == 0 else (b"" if i % 13 == 0 else os.urandom((i * 37) % 300 + (20_000 if i % 17 == 0
                                                                                               else 0)))
        headers = [] if i % 4 else [("trace", b"abc"), ("\u00e9t\u00e9", None), ("n", str(i).encode())]
        out.append((start + i * 97, key, value, headers))
    return out


def client_records(buffer: bytes) -> list[tuple]:
    """What kafka-python's own classes read from the bytes: (offset, timestamp, key, value, headers)."""
    records, out = MemoryRecords(buffer), []
    while (batch := records.next_batch()) is not None:
        if batch.magic == 2 and batch.is_control_batch:
            continue
        out += [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]
    return out


def ours(buffer: bytes) -> list[tuple]:
    batches = kafka_records.v2_batches(buffer)
    assert batches is not None
    return [(r.offset, r.timestamp, r.key, r.value, r.headers) for b in batches if not b.header.is_control
            for r in map(kafka_records.Record._make, kafka_records.records(buffer, b))]


def set_attributes(batch: bytes, set_bits: int) -> bytes:
    """The batch with attribute bits set and its crc32c recomputed (as a broker writing them would)."""
    data = bytearray(batch)
    attributes = struct.unpack_from(">h", data, 21)[0] | set_bits
    struct.pack_into(">h", data, 21, attributes)
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    return bytes(data)


def test_records_equal_the_clients_for_every_shape_and_codec():
    plain = build(mixed(400), offset=1000)
    gzipped = build(mixed(150), offset=1400, compression=1)  # (gzip: in the standard library)
    buffer = plain + gzipped
    assert ours(buffer) == client_records(buffer)
    assert [r[0] for r in ours(buffer)] == list(range(1000, 1550))
    # Keys and values are bytes (what kafka-python gives) from any buffer type; long keys and offset deltas past
    # the inline one- and two-byte varints.
    assert ours(bytearray(buffer)) == ours(memoryview(buffer)) == ours(buffer)
    assert {type(v) for r in ours(memoryview(buffer)) for v in (r[2], r[3]) if v is not None} == {bytes}
    wide = build([(i * 300_000, os.urandom(200 + i), os.urandom(i * 50), []) for i in range(400)], offset=9000)
    assert ours(wide) == client_records(wide)


def test_a_batch_cut_short_by_the_fetch_size_is_left_for_the_next_fetch():
    first, second = build(mixed(10)), build(mixed(10), offset=10)
    batches = kafka_records.v2_batches(first + second[:-5])
    assert batches is not None and len(batches) == 1 and batches[0].header.next_offset == 10
    assert kafka_records.v2_batches(first[:40]) == []  # not even a whole header


def test_log_append_time_gives_every_record_the_batchs_time():
    batch = set_attributes(build(mixed(5)), kafka_records.LOG_APPEND_TIME_MASK)
    decoded = ours(batch)
    assert decoded == client_records(batch)
    assert {r[1] for r in decoded} == {kafka_records.v2_batches(batch)[0].header.max_timestamp}


def test_legacy_formats_are_left_to_the_client():
    builder = MemoryRecordsBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    builder.append(timestamp=1, key=None, value=b"v", headers=[])
    builder.close()
    assert kafka_records.v2_batches(bytes(builder.buffer())) is None
    assert kafka_records.v2_batches(build(mixed(3)) + bytes(builder.buffer())) is None


def test_corrupt_bytes_are_reported_not_misread():
    batch = bytearray(build(mixed(20)))
    batches = kafka_records.v2_batches(bytes(batch))
    assert kafka_records.crc_ok(bytes(batch), batches[0])
    batch[-3] ^= 0xFF  # a flipped byte in the last record: the crc says so
    assert not kafka_records.crc_ok(bytes(batch), kafka_records.v2_batches(bytes(batch))[0])
    lying = bytearray(build([(1, None, b"x" * 10, [])]))
    lying[kafka_records.HEADER.size] = 0x7E  # the record says it is 63 bytes long: past its batch
    with pytest.raises(kafka_records.CorruptRecords, match="past its batch"):
        kafka_records.records(bytes(lying), kafka_records.v2_batches(bytes(lying))[0])


def take_all(parts, n=None) -> list:
    out = []
    while parts:  # (as the fetcher asks: a drained one is not taken from)
        out += parts.take(n)
    return out


def test_the_fetchers_contract_is_kept():
    """FastPartitionRecords against kafka-python's own class on the same bytes: the same ConsumerRecords, in takes
    of any size; the same next_fetch_offset after each take (past a control batch and a batch's last offset);
    the same read counters; drained at the end; a fetch offset inside a batch skips the records before it."""
    assert kafka_fetch.supported()
    control = set_attributes(build([(5, b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00", [])], offset=300),
                             kafka_records.CONTROL_MASK)
    buffer = build(mixed(300)) + control + build(mixed(50), offset=301, compression=1)
    for fetch_offset, take in ((0, None), (0, 7), (120, 64), (300, 5)):
        plain = Fetcher.PartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
        fast = kafka_fetch.FastPartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
        while plain:
            assert fast
            assert fast.take(take) == plain.take(take)
            assert fast.next_fetch_offset == plain.next_fetch_offset
        assert (fast.records_read, fast.bytes_read) == (plain.records_read, plain.bytes_read)
        assert not fast and not plain  # drained
        assert fast.next_fetch_offset == 351


def test_deserializers_and_read_committed_are_left_to_the_client():
    buffer = build(mixed(20))

    class Upper:
        def deserialize(self, topic, headers, data):
            return None if data is None else data.upper()

    plain = take_all(Fetcher.PartitionRecords(0, TP, MemoryRecords(buffer), value_deserializer=Upper()))
    fast = take_all(kafka_fetch.FastPartitionRecords(0, TP, MemoryRecords(buffer), value_deserializer=Upper()))
    raw = take_all(Fetcher.PartitionRecords(0, TP, MemoryRecords(buffer)))
    assert fast == plain and fast[1].value == raw[1].value.upper() != raw[1].value
    committed = kafka_fetch.FastPartitionRecords(0, TP, MemoryRecords(buffer), isolation_level=1)
    assert take_all(committed) == take_all(Fetcher.PartitionRecords(0, TP, MemoryRecords(buffer)))


def test_a_corrupt_batch_raises_the_clients_error():
    import kafka.errors as kerr

    batch = bytearray(build(mixed(20)))
    batch[-3] ^= 0xFF
    with pytest.raises(kerr.CorruptRecordError, match="crc"):
        take_all(kafka_fetch.FastPartitionRecords(0, TP, MemoryRecords(bytes(batch)), check_crcs=True))
