"""KafkaBus against a real broker (deploy/local/infra.py's Kafka 4.x, or RLHF_KAFKA_BOOTSTRAP).

The bus contract shared with the in-memory bus, then what only a real cluster shows: a dead or silent address,
a broker stopped and restarted under the producer, send_batch's fast path (its overhead against a raw producer is
measured in benchmarks/kafka_bus_overhead.py, not here).
The tests at the bottom without fixtures (config parsing, the lazy future) need no broker.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rlhf.bus import bus_from_url
from rlhf.bus.base import BusError, BusUnavailable, PartitionRecords, RecordMetadata, TopicSpec
from rlhf.bus.kafka import KafkaBus, KafkaConfig, KafkaGroupConsumer, _SendFuture
from rlhf.bus.partitioning import partition_for_key
from unit.test_memory_bus import BusContract, check_columns, poll_partitions_until, poll_quiet, poll_until


def kafka_config(bootstrap: str, **overrides: Any) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=bootstrap, client_id="rlhf-test", **overrides)


class TestKafkaBusContract(BusContract):
    SETTLE_S = 2.0  # a group join and a first fetch

    @pytest.fixture
    def bus(self, kafka_bootstrap: str) -> Iterator[KafkaBus]:
        bus = KafkaBus(kafka_config(kafka_bootstrap))
        yield bus
        bus.close(10)


@pytest.fixture
def bus(kafka_bootstrap: str) -> Iterator[KafkaBus]:
    bus = KafkaBus(kafka_config(kafka_bootstrap))
    yield bus
    bus.close(10)


def kafka_threads() -> int:
    return sum(t.name.startswith(("kafka-", "rlhf-kafka")) for t in threading.enumerate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """``host:port`` that accepts connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


# --------------------------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize("where", ["dead port", "silent server"])
def test_unreachable_cluster_fails_fast_and_never_blocks(where: str, silent_server: str, topic_name: str) -> None:
    address = f"127.0.0.1:{free_port()}" if where == "dead port" else silent_server
    threads_before = kafka_threads()
    block, request, delivery = 0.5, 0.6, 1.2
    bus = KafkaBus(kafka_config(address, max_block_s=block, request_timeout_s=request, delivery_timeout_s=delivery))
    try:
        t = time.monotonic()
        with pytest.raises(BusUnavailable):
            bus.ping(1.0)
        assert time.monotonic() - t < 1.5

        # send returns at once (the blocking part runs on the bus's own thread) and its future fails in bounded time
        t = time.monotonic()
        futures = [bus.send(topic_name, b"v%d" % i, key=b"k") for i in range(50)]
        assert time.monotonic() - t < 0.5
        for f in futures:
            with pytest.raises(BusUnavailable):
                f.result(timeout=10)
        assert time.monotonic() - t < 2 * block + delivery + 1.0

        async def publish() -> None:
            await bus.publish(topic_name, b"async")

        t = time.monotonic()
        with pytest.raises(BusUnavailable):
            asyncio.run(publish())
        assert time.monotonic() - t < 2 * block + 1.0

        t = time.monotonic()
        with pytest.raises(BusUnavailable):
            bus.consumer([topic_name], "g")
        with pytest.raises(BusUnavailable):
            bus.ensure_topics([TopicSpec(topic_name)])
        assert time.monotonic() - t < 2 * (block + 2 * request) + 1.0

        for _ in range(3):  # what a health check does, again and again
            with pytest.raises(BusUnavailable):
                bus.ping(0.3)
        bus.flush(1.0)  # nothing left to wait for
    finally:
        t = time.monotonic()
        bus.close(1.0)
        assert time.monotonic() - t < 3.0
    # Failed attempts leave no network threads behind (kafka-python 3.0 would, see rlhf.bus.kafka._construct).
    deadline = time.monotonic() + 5
    while kafka_threads() > threads_before:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------- broker outage


def test_broker_outage_fails_short_sends_retries_long_ones_and_recovers(
    kafka_bootstrap: str, kafka_broker, topic_name: str, group_id: str
) -> None:
    """While the broker is down: ping and sends with a short delivery timeout fail with BusUnavailable in time; a
    send with a long delivery timeout is retried and lands once the broker is back; new sends succeed again.
    The same for every record of a ``send_batch`` (its fast path)."""
    short = KafkaBus(kafka_config(kafka_bootstrap, delivery_timeout_s=3.0, request_timeout_s=2.0, max_block_s=2.0))
    patient = KafkaBus(kafka_config(kafka_bootstrap, delivery_timeout_s=90.0, request_timeout_s=5.0))
    closing = KafkaBus(kafka_config(kafka_bootstrap, delivery_timeout_s=90.0, request_timeout_s=5.0))
    try:
        short.ensure_topics([TopicSpec(topic_name, partitions=1)])
        assert short.send(topic_name, b"before", key=b"k").result(30).offset == 0
        patient.send(topic_name, b"patient-before", key=b"k").result(30)
        closing.send(topic_name, b"closing-before", key=b"k").result(30)

        kafka_broker.stop()
        t = time.monotonic()
        with pytest.raises(BusUnavailable):
            short.ping(2.0)
        failed = short.send(topic_name, b"lost", key=b"k")
        failed_batch = short.send_batch(topic_name, [(b"lost-batch-0", b"k"), (b"lost-batch-1", b"k")])
        retried = patient.send(topic_name, b"retried", key=b"k")
        retried_batch = patient.send_batch(topic_name, [(b"retried-batch-0", b"k"), (b"retried-batch-1", b"k")])
        abandoned = closing.send(topic_name, b"abandoned", key=b"k")
        abandoned_batch = closing.send_batch(topic_name, [(b"abandoned-batch", b"k")])
        with pytest.raises(BusUnavailable):
            failed.result(timeout=30)
        lost = failed_batch.result(timeout=30)
        assert len(lost) == 2 and all(isinstance(o, BusUnavailable) for o in lost), lost
        assert time.monotonic() - t < 3.0 + 2.0 + 2.0
        assert not retried.done() and not retried_batch.done()

        # Closing a bus while its broker is down: bounded, and its unsent record's future fails (never hangs).
        t = time.monotonic()
        closing.close(1.0)
        assert time.monotonic() - t < 10
        with pytest.raises(BusError):
            abandoned.result(timeout=5)
        [gone] = abandoned_batch.result(timeout=5)
        assert isinstance(gone, BusError)

        kafka_broker.start()
        retried.result(timeout=90)
        assert all(isinstance(o, RecordMetadata) for o in retried_batch.result(timeout=90))
        deadline = time.monotonic() + 30
        while True:  # the short bus's producer reconnects within its backoff (1 s at most)
            try:
                short.ping(2.0)
                after = short.send(topic_name, b"after", key=b"k").result(30)
                break
            except BusUnavailable:
                assert time.monotonic() < deadline, "the bus did not recover after the broker restart"
        assert after.offset == 6
    finally:
        short.close(5)
        patient.close(5)
        closing.close(1)
    reader = bus_from_url(f"kafka://{kafka_bootstrap}")
    with reader.consumer([topic_name], group_id) as consumer:
        got = poll_until(consumer, 7)
        got += poll_quiet(consumer, 1.0)
    reader.close()
    # Exactly once each, in order: the retried records were written once (idempotent producer), the failed and the
    # abandoned ones never.
    assert [m.value for m in got] == [b"before", b"patient-before", b"closing-before", b"retried",
                                      b"retried-batch-0", b"retried-batch-1", b"after"]


# --------------------------------------------------------------------------------------------- Kafka specifics


def test_ensure_topics_reports_impossible_specs_as_bus_error(bus: KafkaBus, topic_name: str) -> None:
    with pytest.raises(BusError, match="InvalidReplicationFactor") as err:
        bus.ensure_topics([TopicSpec(topic_name, replication_factor=3)])  # one broker here
    assert not isinstance(err.value, BusUnavailable)
    with pytest.raises(BusError, match="InvalidTopic"):
        bus.ensure_topics([TopicSpec("bad name with spaces")])


def test_first_send_to_an_unknown_topic_creates_it_without_blocking(bus: KafkaBus, topic_name: str) -> None:
    bus.ping(10)
    t = time.monotonic()
    fut = bus.send(topic_name, b"v")  # metadata unknown: goes through the slow path
    assert time.monotonic() - t < 0.2
    assert fut.result(30).topic == topic_name


def test_a_reader_joins_no_group_and_says_when_its_topic_is_missing(bus: KafkaBus, topic_name: str) -> None:
    bus.ensure_topics([TopicSpec(topic_name, partitions=2)])
    admin = bus._get_admin()
    before = {g["group_id"] for g in admin.list_groups()}
    with bus.reader([topic_name], client_id="rlhf-test-reader") as reader:
        bus.send(topic_name, b"x", key=b"k").result(30)
        assert [m.value for m in poll_until(reader, 1)] == [b"x"]
        reader.commit()  # a no-op: there is no group to commit to
    assert {g["group_id"] for g in admin.list_groups()} - before == set()  # no group made (or left behind)
    with pytest.raises(BusError, match="does not exist"):
        bus.reader([f"{topic_name}-missing"])


def test_bus_from_url_carries_config(kafka_bootstrap: str) -> None:
    bus = bus_from_url(f"kafka://{kafka_bootstrap}?client_id=from-url&linger_s=0.002")
    try:
        assert isinstance(bus, KafkaBus)
        assert bus.config.client_id == "from-url" and bus.config.linger_s == 0.002
        bus.ping(5)
    finally:
        bus.close()


def test_send_batch_appends_whole_batches_without_a_send_per_record(
    bus: KafkaBus, topic_name: str, group_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pinned kafka-python the fast path is taken (rlhf.bus.kafka_batch): KafkaProducer.send is never
    called, and the records land where send would have put them, with their keys and values."""
    bus.ensure_topics([TopicSpec(topic_name, partitions=4)])
    placed = [bus.send(topic_name, b"by-send-%d" % i, key=b"key-%d" % i).result(30) for i in range(40)]
    assert bus._appender is not None, "kafka_batch.supported() refused the pinned kafka-python"

    def no_send(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("send_batch called KafkaProducer.send")

    monkeypatch.setattr(bus._producer, "send", no_send)
    records = [(b"by-batch-%d" % i, b"key-%d" % i if i % 9 else None) for i in range(3000)]
    outcomes = bus.send_batch(topic_name, records).result(60)
    for i in range(40):
        if i % 9:
            assert outcomes[i].partition == placed[i].partition  # same key, same partition as send
    monkeypatch.undo()
    reader = KafkaBus(bus.config)
    try:
        with reader.consumer([topic_name], group_id) as consumer:
            got = poll_until(consumer, 40 + len(records))
    finally:
        reader.close()
    at = {(m.partition, m.offset): (m.value, m.key) for m in got}
    assert [at[(md.partition, md.offset)] for md in outcomes] == records


def test_send_batch_falls_back_to_send_without_the_fast_path(bus: KafkaBus, topic_name: str, group_id: str) -> None:
    bus.ensure_topics([TopicSpec(topic_name, partitions=3)])
    bus.send(topic_name, b"warm").result(30)
    bus._appender = None  # as with a kafka-python whose internals changed
    records = [(b"v%d" % i, b"k%d" % (i % 5)) for i in range(200)]
    outcomes = bus.send_batch(topic_name, records).result(60)
    assert [md.partition for md in outcomes] == [partition_for_key(k, 3) for _, k in records]


def test_send_batch_survives_the_broker_splitting_a_batch_too_large(
    kafka_bootstrap: str, topic_name: str, group_id: str
) -> None:
    """A topic whose max.message.bytes is below the producer's batches: the broker refuses them
    (MESSAGE_TOO_LARGE), kafka-python splits them and rebinds each record (our _Slot) to its new batch. Every
    record still resolves once, at the offset where it landed, in order."""
    bus = KafkaBus(kafka_config(kafka_bootstrap, linger_s=0.05))
    try:
        bus.ensure_topics([TopicSpec(topic_name, partitions=1, config=(("max.message.bytes", "3000"),))])
        bus.send(topic_name, b"warm", key=b"k").result(30)
        records = [(b"%04d-" % i + b"x" * 100, b"k") for i in range(300)]  # ~36 kB in one 256 kB batch
        outcomes = bus.send_batch(topic_name, records).result(60)
        assert all(isinstance(md, RecordMetadata) for md in outcomes), outcomes[:3]
        assert [md.offset for md in outcomes] == list(range(1, 301))
    finally:
        bus.close(10)
    reader = bus_from_url(f"kafka://{kafka_bootstrap}")
    try:
        with reader.consumer([topic_name], group_id) as consumer:
            got = poll_until(consumer, 301)
            got += poll_quiet(consumer, 0.5)
    finally:
        reader.close()
    assert [m.value for m in got] == [b"warm"] + [v for v, _ in records]


def test_poll_partitions_builds_its_columns_without_poll_or_a_message(
    bus: KafkaBus, topic_name: str, group_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KafkaGroupConsumer.poll_partitions reads kafka-python's records directly (not Consumer's default on top of
    poll, which builds a Message per record), and returns what poll returns to another group."""
    bus.ensure_topics([TopicSpec(topic_name, partitions=3)])
    records = [(b"v%d" % i, b"k%d" % (i % 7)) for i in range(300)]
    bus.send_batch(topic_name, records).result(60)
    with bus.consumer([topic_name], group_id) as consumer:
        by_poll = {(m.partition, m.offset): m.value for m in poll_until(consumer, len(records))}
    assert len(by_poll) == len(records)

    def no_message(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("poll_partitions built a Message")

    monkeypatch.setattr("rlhf.bus.kafka.Message", no_message)
    with bus.consumer([topic_name], group_id + "-columns") as consumer:
        assert isinstance(consumer, KafkaGroupConsumer)
        monkeypatch.setattr(consumer, "poll", no_message)
        polls = poll_partitions_until(consumer, len(records), max_records=64)
    assert max(sum(len(r.offsets) for r in batch) for batch in polls) <= 64
    assert check_columns(polls, topic_name) == by_poll


# --------------------------------------------------------------------------------------------- no broker needed


class FakeKafkaConsumer:
    """The part of kafka.KafkaConsumer that KafkaGroupConsumer.poll / poll_partitions / close use."""

    def __init__(self, result: dict | BaseException) -> None:
        self.result = result
        self.calls: list[tuple[int, int]] = []

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        self.calls.append((timeout_ms, max_records))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def close(self, autocommit: bool, timeout_ms: int) -> None:
        pass


def test_kafka_poll_partitions_maps_kafka_pythons_records_and_errors() -> None:
    import kafka.errors as kerr
    from kafka.consumer.fetcher import ConsumerRecord
    from kafka.structs import TopicPartition

    def record(partition: int, offset: int, value: bytes) -> ConsumerRecord:
        return ConsumerRecord("t", partition, -1, offset, 1_700_000_000_000, 0, b"key", value, [], None, 3,
                              len(value), -1)

    fake = FakeKafkaConsumer({
        TopicPartition("t", 2): [record(2, 7, b"x"), record(2, 8, b"y")],
        TopicPartition("t", 1): [],  # (kafka-python leaves these out; a partition without records is left out)
        TopicPartition("t", 0): [record(0, 3, b"z")],
    })
    consumer = KafkaGroupConsumer(fake, request_timeout_s=1.0)  # type: ignore[arg-type]
    assert consumer.poll_partitions(timeout_s=0.25, max_records=9) == [
        PartitionRecords("t", 2, [7, 8], [b"x", b"y"]),
        PartitionRecords("t", 0, [3], [b"z"]),
    ]
    assert fake.calls == [(250, 9)]
    # The same records as poll's.
    assert [(m.partition, m.offset, m.value) for m in consumer.poll()] == [(2, 7, b"x"), (2, 8, b"y"), (0, 3, b"z")]
    assert fake.calls[-1] == (1000, 500)

    for bad in ({"max_records": 0}, {"max_records": 1.5}, {"timeout_s": -1}):
        with pytest.raises(ValueError):
            consumer.poll_partitions(**bad)  # type: ignore[arg-type]
    assert len(fake.calls) == 2  # refused before reaching kafka-python

    fake.result = kerr.KafkaConnectionError("broker gone")
    with pytest.raises(BusUnavailable, match="poll failed: KafkaConnectionError.*broker gone") as unavailable:
        consumer.poll_partitions()
    assert isinstance(unavailable.value.__cause__, kerr.KafkaConnectionError)
    fake.result = kerr.IllegalStateError("not subscribed")
    with pytest.raises(BusError, match="poll failed: IllegalStateError") as err:
        consumer.poll_partitions()
    assert not isinstance(err.value, BusUnavailable)

    consumer.close()
    calls = len(fake.calls)
    with pytest.raises(BusError, match="closed consumer"):
        consumer.poll_partitions()
    assert len(fake.calls) == calls




def test_config_validation_says_what_to_fix() -> None:
    with pytest.raises(ValueError, match="bootstrap_servers"):
        KafkaConfig(bootstrap_servers="")
    with pytest.raises(ValueError, match="host:port"):
        KafkaConfig(bootstrap_servers="localhost")
    with pytest.raises(ValueError, match="delivery_timeout_s"):
        KafkaConfig(delivery_timeout_s=5, request_timeout_s=10)
    with pytest.raises(ValueError, match="max_block_s"):
        KafkaConfig(max_block_s=0)
    with pytest.raises(ValueError, match="compression"):
        KafkaConfig(compression="brotli")
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="fetch_partition_bytes"):
        KafkaConfig(fetch_partition_bytes=10)
    assert "hunter2" not in repr(KafkaConfig(sasl_password="hunter2", ssl_password="hunter2"))


def test_config_from_url() -> None:
    c = KafkaConfig.from_url("kafka://a:1,b:2?client_id=x&linger_s=0.01&batch_size_bytes=1000&ssl_check_hostname=false")
    assert (c.bootstrap_servers, c.client_id, c.linger_s, c.batch_size_bytes) == ("a:1,b:2", "x", 0.01, 1000)
    assert c.ssl_check_hostname is False
    kw = c.producer_kwargs()
    assert kw["acks"] == "all" and kw["enable_idempotence"] is True and kw["linger_ms"] == 10
    assert kw["bootstrap_servers"] == ["a:1", "b:2"]
    consumer = c.consumer_kwargs("g", None)
    assert consumer["enable_auto_commit"] is False and consumer["auto_offset_reset"] == "earliest"
    assert consumer["max_partition_fetch_bytes"] == c.reader_kwargs(None)["max_partition_fetch_bytes"] == 8 << 20
    tuned = KafkaConfig.from_url("kafka://a:1?fetch_partition_bytes=1048576&fast_fetch=false")
    assert tuned.consumer_kwargs("g", None)["max_partition_fetch_bytes"] == 1 << 20 and tuned.fast_fetch is False
    with pytest.raises(ValueError, match="unknown KafkaConfig field"):
        KafkaConfig.from_url("kafka://a:1?lingr_s=1")
    with pytest.raises(ValueError, match="not a float"):
        KafkaConfig.from_url("kafka://a:1?linger_s=soon")


class FakeKafkaFuture:
    """The part of kafka-python's record future that _SendFuture uses."""

    def __init__(self) -> None:
        self.is_done = False
        self.value: Any = None
        self.exception: BaseException | None = None
        self.callbacks: list = []
        self.errbacks: list = []

    def add_callback(self, f: Any) -> None:
        if not self.is_done:
            self.callbacks.append(f)
        elif self.exception is None:
            f(self.value)

    def add_errback(self, f: Any) -> None:
        if not self.is_done:
            self.errbacks.append(f)
        elif self.exception is not None:
            f(self.exception)

    def succeed(self, md: Any) -> None:
        self.value, self.is_done = md, True
        for f in self.callbacks:
            f(md)

    def fail(self, exc: BaseException) -> None:
        self.exception, self.is_done = exc, True
        for f in self.errbacks:
            f(exc)


class FakeMetadata:
    topic, partition, offset = "t", 2, 41


def test_send_future_behaves_like_a_future() -> None:
    import kafka.errors as kerr

    # resolved before anyone looked
    k = FakeKafkaFuture()
    k.succeed(FakeMetadata())
    f = _SendFuture("t", k)
    assert f.done() and not f.running() and f.result(0) == RecordMetadata("t", 2, 41)
    assert f.result() is f.result() and f.exception() is None

    # looked at first, resolved later from another thread
    k = FakeKafkaFuture()
    f = _SendFuture("t", k)
    seen: list = []
    f.add_done_callback(seen.append)
    f.add_done_callback(lambda _: 1 / 0)  # a failing callback is logged, not raised into the sender thread
    assert not f.done() and f.running() and not f.cancel() and not f.cancelled()
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(timeout=0.05)
    threading_pool = concurrent.futures.ThreadPoolExecutor(1)
    threading_pool.submit(k.succeed, FakeMetadata()).result()
    assert seen == [f] and f.result(1).offset == 41

    # blocking result() woken by the resolution
    k = FakeKafkaFuture()
    f = _SendFuture("t", k)
    timer = threading_pool.submit(lambda: (time.sleep(0.1), k.succeed(FakeMetadata())))
    assert f.result(timeout=5).partition == 2
    timer.result()

    # concurrent.futures.wait / as_completed reach into the base class: it is initialised on demand
    k = FakeKafkaFuture()
    f = _SendFuture("t", k)
    k.fail(kerr.KafkaTimeoutError("expired"))
    done, _ = concurrent.futures.wait([f], timeout=1)
    assert done == {f}
    assert list(concurrent.futures.as_completed([f], timeout=1)) == [f]
    with pytest.raises(BusUnavailable, match="expired"):
        f.result()
    assert isinstance(f.exception(), BusUnavailable) and "finished" in repr(f)

    k = FakeKafkaFuture()
    f = _SendFuture("t", k)
    waiter = threading_pool.submit(concurrent.futures.wait, [f], 5)
    time.sleep(0.05)
    k.succeed(FakeMetadata())
    assert waiter.result()[0] == {f}

    # asyncio.wrap_future (what Bus.publish does for any Future) and an error that is not about availability
    async def awaited() -> RecordMetadata:
        k2 = FakeKafkaFuture()
        fut = _SendFuture("t", k2)
        asyncio.get_running_loop().call_later(0.05, k2.fail, kerr.MessageSizeTooLargeError("big"))
        return await asyncio.wrap_future(fut)

    with pytest.raises(BusError, match="big") as err:
        asyncio.run(awaited())
    assert not isinstance(err.value, BusUnavailable)

    # slow path and immediate failures: ordinary futures
    f = _SendFuture("t")
    assert not f.done() and not f.cancel()
    k = FakeKafkaFuture()
    f._bind(k)
    k.succeed(FakeMetadata())
    assert f.result(0).offset == 41
    assert isinstance(_SendFuture("t")._fail(BusError("x")).exception(0), BusError)
    threading_pool.shutdown()
