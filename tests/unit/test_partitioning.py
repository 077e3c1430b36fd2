"""Kafka's key partitioning: the per-key and the batched (numpy) murmur2 agree with kafka-python's (the Java
client's), for every key length modulo 4 and for partition lists that are not 0..n-1."""
from __future__ import annotations

import random
import uuid

import numpy as np
import pytest
from kafka.cluster import ClusterMetadata
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_murmur2

from rlhf.bus.partitioning import (
    NUMPY_FROM_KEYS, murmur2, murmur2_many, partition_for_key, partitions_for_keys,
)

EDGE_KEYS = [b"", b"a", b"ab", b"abc", b"abcd", b"abcde", "ünïcode".encode(), bytes(range(256)), b"x" * 1001,
             b"\xff" * 7, b"\x00" * 9]


def random_keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))) for _ in range(n)]


def test_murmur2_matches_kafka_python() -> None:
    for data in EDGE_KEYS + random_keys(300):
        assert murmur2(data) == kafka_murmur2(data) & 0xFFFFFFFF, data
    for _ in range(200):
        key = uuid.uuid4().bytes
        assert partition_for_key(key, 7) == (kafka_murmur2(key) & 0x7FFFFFFF) % 7


def test_batched_murmur2_equals_the_per_key_one() -> None:
    keys = EDGE_KEYS + random_keys(2000, seed=1)
    hashes = murmur2_many(keys)
    assert hashes.dtype == np.uint32 and hashes.shape == (len(keys),)
    assert hashes.tolist() == [murmur2(k) for k in keys]
    assert murmur2_many([]).shape == (0,)
    assert murmur2_many([b"only"]).tolist() == [murmur2(b"only")]
    assert murmur2_many([bytearray(b"ba"), memoryview(b"mv")]).tolist() == [murmur2(b"ba"), murmur2(b"mv")]


@pytest.mark.parametrize("partitions", [[0], [0, 1, 2], list(range(7)), [3, 1, 2, 0, 5, 4], [2, 5, 9]])
def test_partitions_for_keys_match_kafka_pythons_default_partitioner(partitions: list[int]) -> None:
    class Cluster(ClusterMetadata):  # just enough metadata for DefaultPartitioner
        def topics(self, exclude_internal_topics: bool = True) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(partitions)

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return set(partitions)

    keys = random_keys(500, seed=len(partitions)) + EDGE_KEYS
    expected = [DefaultPartitioner().partition("t", k, k, None, None, Cluster()) for k in keys]
    assert partitions_for_keys(keys, partitions) == expected  # the numpy path
    few = keys[:NUMPY_FROM_KEYS - 1]
    assert partitions_for_keys(few, partitions) == expected[:len(few)]  # the per-key path


def test_partitions_for_keys_needs_a_partition() -> None:
    with pytest.raises(ValueError, match="no partitions"):
        partitions_for_keys([b"k"], [])
