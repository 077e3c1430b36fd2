"""rlhf.bus.kafka_fetch against a real broker: the bus's consumers (their fetches decoded by rlhf.bus.kafka_records)
read exactly what a plain kafka-python consumer reads from the same partitions: keys, null values, headers, large
records, a gzip producer's batches, and a transactional producer's committed and aborted records with the control
batches (transaction markers) between them, which neither returns."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import kafka
import pytest

from rlhf.bus import kafka_fetch
from rlhf.bus.base import RebalanceListener, TopicSpec
from rlhf.bus.kafka import KafkaBus, KafkaConfig

pytestmark = pytest.mark.integration


@pytest.fixture
def bus(kafka_bootstrap: str) -> Iterator[KafkaBus]:
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka_bootstrap, client_id="rlhf-test"))
    yield bus
    bus.close(10)


def records(n: int, tag: str) -> list[tuple]:
    """(key, value, headers) of every shape kafka-python's producer sends: null keys, null values (not both), empty
    ones, headers, 20 KB values."""
    out = []
    for i in range(n):
        key = None if i % 3 == 0 else f"{tag}-k{i}".encode()
        value = None if i % 10 == 1 and key is not None else (b"" if i % 13 == 0 else f"{tag}-v{i}-".encode() * (1 + (i * 7) % 40))
        if i % 17 == 0:
            value = bytes(20_000)
        headers = [("trace", f"{tag}{i}".encode()), ("\u00e9", b"")] if i % 4 == 0 else []
        out.append((key, value, headers))
    return out


def produce(bootstrap: str, topic: str) -> None:
    plain = kafka.KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip", linger_ms=5)
    for key, value, headers in records(300, "gzip"):
        plain.send(topic, key=key, value=value, headers=headers, partition=0 if key is None else None)
    plain.flush(30)
    plain.close(10)
    tx = kafka.KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:6]}")
    tx.init_transactions()
    for outcome in ("commit", "abort", "commit"):
        tx.begin_transaction()
        for key, value, headers in records(40, outcome):
            tx.send(topic, key=key, value=value, headers=headers)
        tx.flush(30)
        tx.commit_transaction() if outcome == "commit" else tx.abort_transaction()
    tx.close(10)


def read_plain(bootstrap: str, topic: str, partitions: list[int]) -> list[tuple]:
    """A kafka-python consumer with the client's own decoding (read_uncommitted, its default)."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [kafka.TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)
    out: list[tuple] = []
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for rs in consumer.poll(timeout_ms=500).values():
            out += [(r.partition, r.offset, r.key, r.value, tuple(r.headers), r.timestamp) for r in rs]
    consumer.close()
    assert not kafka_fetch.installed(consumer)
    return sorted(out)


def test_the_bus_reads_what_kafka_python_reads(bus: KafkaBus, kafka_bootstrap: str) -> None:
    topic = f"test-fetch-{uuid.uuid4().hex[:8]}"
    bus.ensure_topics([TopicSpec(topic, partitions=3)])
    produce(kafka_bootstrap, topic)
    expected = read_plain(kafka_bootstrap, topic, [0, 1, 2])
    assert len(expected) == 300 + 3 * 40  # (read_uncommitted: the aborted transaction's records too)

    reader = bus.reader([topic])
    assert kafka_fetch.installed(reader._c)
    got: list[tuple] = []
    deadline = time.monotonic() + 60
    while len(got) < len(expected) and time.monotonic() < deadline:
        got += [(m.partition, m.offset, m.key, m.value, m.headers, m.timestamp_ms) for m in reader.poll(0.5, 100)]
    assert reader.poll(1.0) == []  # nothing more: the control batches are not records
    reader.close()
    assert sorted(got) == expected

    class FromStart(RebalanceListener):
        def on_assigned(self, partitions):
            return {tp: 0 for tp in partitions}

        def on_revoked(self, partitions):
            return {}

        def on_lost(self, partitions):
            pass

    member = bus.consumer([topic], f"g-{uuid.uuid4().hex[:6]}", listener=FromStart())
    assert kafka_fetch.installed(member._c)
    columns: dict[int, list] = {}
    deadline = time.monotonic() + 60
    while sum(map(len, columns.values())) < len(expected) and time.monotonic() < deadline:
        for part in member.poll_partitions(0.5, 2000):
            columns.setdefault(part.partition, []).extend(zip(part.offsets, part.values))
    member.close()
    assert sorted((p, o, v) for p, rs in columns.items() for o, v in rs) == [(p, o, v) for p, o, _, v, _, _ in expected]


def test_the_clients_own_decoding_when_asked(kafka_bootstrap: str) -> None:
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka_bootstrap, client_id="rlhf-test", fast_fetch=False))
    try:
        topic = f"test-fetch-{uuid.uuid4().hex[:8]}"
        bus.ensure_topics([TopicSpec(topic, partitions=1)])
        bus.send(topic, b"v", b"k").result(30)
        reader = bus.reader([topic])
        assert not kafka_fetch.installed(reader._c)
        deadline, got = time.monotonic() + 30, []
        while not got and time.monotonic() < deadline:
            got = reader.poll(0.5)
        reader.close()
        assert [(m.key, m.value) for m in got] == [(b"k", b"v")]
    finally:
        bus.close(10)
