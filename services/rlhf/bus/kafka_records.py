"""Kafka's record batches (message format v2, the only one Kafka 4 writes) decoded from a fetch's bytes, for the
consumers whose reading is their bottleneck (the trainer's, benchmarks/README.md): kafka-python decodes every field
of every record through a chain of properties and calls, ~7 us a record here, most of a raw consumer's CPU; this
walks the bytes once, ~0.8 us a record (the fetcher's whole path to ConsumerRecords: 1.5 against 3.8 us).

The wire format is Kafka's (https://kafka.apache.org/documentation/#recordbatch), not kafka-python's classes, so this
module imports nothing of the client; :mod:`rlhf.bus.kafka_fetch` plugs it into kafka-python's fetcher. A buffer
holding anything else than complete v2 batches (the legacy formats v0/v1, a batch it cannot decompress) is reported
by :func:`v2_batches` returning None: the caller then decodes it the client's way.

Batch (61-byte header, then its records, compressed as a whole when the attributes say so)::

    baseOffset int64, batchLength int32, partitionLeaderEpoch int32, magic int8, crc uint32 (crc32c of the rest),
    attributes int16, lastOffsetDelta int32, baseTimestamp int64, maxTimestamp int64, producerId int64,
    producerEpoch int16, baseSequence int32, recordCount int32

Record (all integers zigzag varints, lengths -1 for null)::

    length, attributes int8, timestampDelta, offsetDelta, keyLength, key, valueLength, value,
    headerCount, [headerKeyLength, headerKey (UTF-8), headerValueLength, headerValue]
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

HEADER = struct.Struct(">qiibIhiqqqhii")
LOG_OVERHEAD = 12  # baseOffset and batchLength: the bytes batchLength does not count
MAGIC_AT = 16  # where the magic byte is in every format (v0 and v1 too)
CRC_FROM = 21  # the crc covers the batch from its attributes on

COMPRESSION_MASK = 0x07
LOG_APPEND_TIME_MASK = 0x08
TRANSACTIONAL_MASK = 0x10
CONTROL_MASK = 0x20


class CorruptRecords(ValueError):
    """Bytes that are not what the format says (a record longer than its batch, a bad crc, negative counts)."""


class BatchHeader(NamedTuple):
    base_offset: int
    length: int  # batchLength: the batch's bytes after LOG_OVERHEAD
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    count: int

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_MASK)

    @property
    def timestamp_type(self) -> int:
        """0: the producer's create time; 1: the broker's log-append time (every record's is ``max_timestamp``)."""
        return 1 if self.attributes & LOG_APPEND_TIME_MASK else 0


class Batch(NamedTuple):
    header: BatchHeader
    start: int  # where the batch starts in the buffer
    end: int  # where it ends


def v2_batches(buffer: bytes | bytearray | memoryview) -> list[Batch] | None:
    """The complete batches of a fetch's bytes, in order (a partial batch at the end, cut by the fetch's size limit,
    is left out: the next fetch starts at it). None when a batch is not v2: decode those the client's way."""
    out: list[Batch] = []
    pos, size, unpack = 0, len(buffer), HEADER.unpack_from
    while pos + MAGIC_AT < size:  # (fewer bytes: a batch cut short, whatever its format)
        if buffer[pos + MAGIC_AT] != 2:
            return None
        length = int.from_bytes(buffer[pos + 8:pos + LOG_OVERHEAD], "big", signed=True)
        end = pos + LOG_OVERHEAD + length
        if end > size:
            break
        if length < HEADER.size - LOG_OVERHEAD:
            raise CorruptRecords(f"a record batch at byte {pos} of the fetch has length {length}")
        out.append(Batch(BatchHeader._make(unpack(buffer, pos)), pos, end))
        pos = end
    return out


def _varint(buf, pos: int) -> tuple[int, int]:
    """A zigzag varint at ``pos``: (value, the position after it)."""
    b = buf[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), pos + 1
        shift += 7
        if shift > 63:
            raise CorruptRecords("a varint longer than 64 bits")


class Record(NamedTuple):
    """The fields of a record, in the order :func:`records` returns them as plain tuples (``Record._make`` names
    them)."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    size: int  # its length: its bytes in the batch after the length's varint (kafka-python's size_in_bytes)


def decompress(codec: int) -> Callable[[bytes], bytes]:
    """The decompressor of a batch's codec (attributes & 7: 1 gzip, 2 snappy, 3 lz4, 4 zstd), from kafka-python's
    public ``kafka.codec`` (whose optional packages it needs); raises :class:`CorruptRecords` for an unknown one."""
    from kafka import codec as c

    found = {1: c.gzip_decode, 2: c.snappy_decode, 3: c.lz4_decode, 4: c.zstd_decode}.get(codec)
    if found is None:
        raise CorruptRecords(f"unknown compression codec {codec}")
    return found


def records(buffer: bytes | bytearray | memoryview, batch: Batch) -> list[tuple]:
    """The records of one batch (decompressed first if it is), each with its absolute offset and timestamp: plain
    tuples in :class:`Record`'s order (a named tuple a record cost ~0.2 us more, of ~1.2)."""
    header = batch.header
    pos, end = batch.start + HEADER.size, batch.end
    codec = header.attributes & COMPRESSION_MASK
    if codec:
        data = decompress(codec)(bytes(memoryview(buffer)[pos:end]))
        if not isinstance(data, bytes):
            data = bytes(data)
        pos, end = 0, len(data)
    elif isinstance(buffer, bytes):
        data = buffer  # (its slices are the keys and values: no copy but theirs)
    else:
        data, pos, end = bytes(memoryview(buffer)[pos:end]), 0, end - pos
    base_offset, base_ts = header.base_offset, header.base_timestamp
    append_time = header.max_timestamp if header.attributes & LOG_APPEND_TIME_MASK else None
    out: list[tuple] = []
    append = out.append
    # The varints of a record's length, timestamp delta, offset delta and key and value lengths are one or two
    # bytes in all but rare records: those are read inline (a call each was a fifth of the decoding), the rest by
    # _varint. (u >> 1) ^ -(u & 1) undoes the zigzag.
    for _ in range(header.count):
        b = data[pos]
        if b < 0x80:
            length, pos = (b >> 1) ^ -(b & 1), pos + 1
        elif (c := data[pos + 1]) < 0x80:
            u = (b & 0x7F) | (c << 7)
            length, pos = (u >> 1) ^ -(u & 1), pos + 2
        else:
            length, pos = _varint(data, pos)
        record_end = pos + length
        if length < 0 or record_end > end:
            raise CorruptRecords(f"a record of batch {base_offset} runs past its batch ({length} bytes)")
        pos += 1  # attributes: unused in v2
        b = data[pos]
        if b < 0x80:
            ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        elif (c := data[pos + 1]) < 0x80:
            u = (b & 0x7F) | (c << 7)
            ts_delta, pos = (u >> 1) ^ -(u & 1), pos + 2
        else:
            ts_delta, pos = _varint(data, pos)
        b = data[pos]
        if b < 0x80:
            offset_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        elif (c := data[pos + 1]) < 0x80:
            u = (b & 0x7F) | (c << 7)
            offset_delta, pos = (u >> 1) ^ -(u & 1), pos + 2
        else:
            offset_delta, pos = _varint(data, pos)
        b = data[pos]
        if b == 1:  # null key (-1)
            key, pos = None, pos + 1
        else:
            if b < 0x80:
                n, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                n, pos = _varint(data, pos)
            if n >= 0:
                key, pos = data[pos:pos + n], pos + n
            else:
                key = None
        b = data[pos]
        if b < 0x80:
            n, pos = (b >> 1) ^ -(b & 1), pos + 1
        elif (c := data[pos + 1]) < 0x80:
            u = (b & 0x7F) | (c << 7)
            n, pos = (u >> 1) ^ -(u & 1), pos + 2
        else:
            n, pos = _varint(data, pos)
        if n >= 0:
            value, pos = data[pos:pos + n], pos + n
        else:
            value = None
        b = data[pos]
        headers: list[tuple[str, bytes | None]] = []
        if b == 0:
            pos += 1
        else:
            count, pos = _varint(data, pos)
            if count < 0:
                raise CorruptRecords(f"a record of batch {base_offset} has {count} headers")
            for _ in range(count):
                n, pos = _varint(data, pos)
                if n < 0:
                    raise CorruptRecords(f"a header key of batch {base_offset} has length {n}")
                h_key = data[pos:pos + n].decode("utf-8")
                pos += n
                n, pos = _varint(data, pos)
                if n >= 0:
                    h_value, pos = data[pos:pos + n], pos + n
                else:
                    h_value = None
                headers.append((h_key, h_value))
        if pos != record_end:
            raise CorruptRecords(f"a record of batch {base_offset} is {length} bytes long but holds {pos - record_end + length}")
        append((base_offset + offset_delta, append_time if append_time is not None else base_ts + ts_delta,
                key, value, headers, length))
    return out


def crc_ok(buffer: bytes | bytearray | memoryview, batch: Batch) -> bool:
    """Whether the batch's crc32c matches its bytes (the ``crc32c`` package, in C, as kafka-python uses it)."""
    from kafka.record.util import calc_crc32c

    return calc_crc32c(memoryview(buffer)[batch.start + CRC_FROM:batch.end]) == batch.header.crc
