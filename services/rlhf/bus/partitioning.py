"""Kafka's key partitioning (the Java client's default): ``toPositive(murmur2(key)) % partitions``.

Keys that share a partition with the Java client's (and kafka-python's ``DefaultPartitioner``) keep their order
next to records that other producers send. kafka-python computes murmur2 in pure Python, about 5 us per key; this
module has the same hash per key (:func:`murmur2`, for the in-process bus) and for a whole batch of keys at once
with numpy (:func:`murmur2_many`, for :mod:`rlhf.bus.kafka_batch`), 32-bit lanes wrapping like Java's ``int``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_SEED = 0x9747B28C
_MIX = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """32-bit MurmurHash2 as Kafka's producers use it to place a keyed record (seed 0x9747b28c), unsigned."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _MIX) & _MASK
        k ^= k >> 24
        k = (k * _MIX) & _MASK
        h = ((h * _MIX) & _MASK) ^ k
    rest = length & 3
    if rest:
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * _MIX) & _MASK
    h ^= h >> 13
    h = (h * _MIX) & _MASK
    h ^= h >> 15
    return h


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` among ``partitions`` (numbered 0..n-1)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2_many(keys: Sequence[bytes]) -> np.ndarray:
    """:func:`murmur2` of each key, as uint32, shape ``(len(keys),)``: the 4-byte blocks of all keys mixed at once,
    then one numpy step per block of the longest key instead of a Python loop per key. (numpy is imported here, not
    with the module: the in-process bus, and so every ``import rlhf.bus``, needs only :func:`murmur2`, and numpy's
    import is ~0.1 s of a fresh process's start, e.g. the trainer's store process.)"""
    import numpy as np

    _M, _R = np.uint32(_MIX), np.uint32(24)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)  # (N,)
    width = (int(lengths.max()) // 4 + 1) * 4  # whole blocks, with room for a key's 1-3 tail bytes
    raw = np.frombuffer(b"".join(bytes(k).ljust(width, b"\0") for k in keys), dtype=np.uint8).reshape(n, width)
    blocks = lengths >> 2  # (N,) full blocks per key
    with np.errstate(over="ignore"):
        k = raw.view("<u4").astype(np.uint32)  # (N, W/4) little-endian blocks, like the Java loop reads them
        k *= _M
        k ^= k >> _R
        k *= _M
        h = np.uint32(_SEED) ^ lengths.astype(np.uint32)  # (N,)
        for i in range(int(blocks.max())):
            h = np.where(blocks > i, (h * _M) ^ k[:, i], h)
        # The 1-3 bytes after the full blocks; the padding after a key is zeros, so xor-ing all three bytes
        # equals xor-ing the ones the key has.
        tail = lengths & ~3
        rows = np.arange(n)
        last = (raw[rows, tail].astype(np.uint32) | (raw[rows, tail + 1].astype(np.uint32) << np.uint32(8))
                | (raw[rows, tail + 2].astype(np.uint32) << np.uint32(16)))
        h = np.where(lengths & 3, (h ^ last) * _M, h)
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
    return h.astype(np.uint32)


# Below this many keys the per-key loop is faster: numpy's calls cost about 75 us whatever the batch size.
NUMPY_FROM_KEYS = 32


def partitions_for_keys(keys: Sequence[bytes], partitions: Sequence[int]) -> list[int]:
    """The partition of each key among ``partitions`` (all of the topic's), as the Java client picks it."""
    ordered = sorted(partitions)
    n = len(ordered)
    if not n:
        raise ValueError("the topic has no partitions")
    if n == 1:
        return [ordered[0]] * len(keys)
    if len(keys) < NUMPY_FROM_KEYS:
        return [ordered[(murmur2(k) & 0x7FFFFFFF) % n] for k in keys]
    idx = (murmur2_many(keys) & 0x7FFFFFFF) % n  # (uint32 array op a Python int: stays uint32)
    return [ordered[i] for i in idx.tolist()]
