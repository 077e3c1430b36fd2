"""Appending a whole batch of records to kafka-python's producer at once: the bus' ``send_batch`` fast path.

``KafkaProducer.send`` costs about 50 us of Python per record on top of what the broker needs: argument checks, a
pure-Python murmur2, one lock round per record, a ``FutureRecordMetadata`` with two callbacks per record, and one
callback chain per record when the broker answers. A service that receives events in batches (the feedback
service) pays that per event, more than the rest of its work together. This module appends a batch's records
straight into the producer's ``RecordAccumulator``:

* partitions for all keys at once (:mod:`rlhf.bus.partitioning`, the Java client's formula);
* one accumulator lock per partition per batch, records encoded by kafka-python's own ``MemoryRecordsBuilder``;
* one callback per (produce batch, send_batch call) instead of two per record.

Everything after the append is kafka-python's unchanged: its sender drains, sends, retries and sequences these
batches like any other (idempotent producer, acks=all), flush() waits for them, close() aborts them. Each record
still has an entry in the batch's ``_record_futures`` (a small :class:`_Slot`), so that kafka-python's split of a
too-large batch (``split_and_reenqueue``) rebinds our records like its own.

This reaches into kafka-python internals (``_accumulator``, ``_sender``, ``ProducerBatch``): :func:`supported`
checks for every one of them when the producer is created, and the bus falls back to per-record ``send`` when
a kafka-python release changes them. tests/integration/test_kafka_bus.py checks the path is taken with the pinned
release, and that its records are the same as ``send``'s (partition, order, key, value).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka.producer.producer_batch import ProducerBatch
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.structs import TopicPartition

from rlhf.bus.base import BatchResults, BusError, RecordMetadata
from rlhf.bus.partitioning import partitions_for_keys

log = logging.getLogger(__name__)

# Bytes a record adds to its value and key in a v2 batch, at most (length, attributes, deltas, header count).
_RECORD_OVERHEAD = 21 + 5 + 5 + 5


def supported(producer: Any) -> bool:
    """Whether this kafka-python producer has every internal the fast path uses (else: per-record ``send``)."""
    try:
        acc = producer._accumulator
        needed = (
            callable(acc._tp_lock), hasattr(acc, "_batches"), hasattr(acc, "_incomplete"),
            callable(acc._incomplete.add), callable(acc._appends_in_progress.increment),
            callable(acc._appends_in_progress.decrement), hasattr(acc, "_closed"),
            all(k in acc.config for k in ("message_version", "compression_attrs", "batch_size")),
            acc.config["message_version"] >= 2,
            callable(producer._sender.wakeup), callable(producer._metadata.partitions_for_topic),
            callable(producer._metadata.available_partitions_for_topic),
            "_record_futures" in ProducerBatch(TopicPartition("t", 0), None).__dict__,
            callable(getattr(MemoryRecordsBuilder, "append", None)),
            not (producer._transaction_manager and producer._transaction_manager.is_transactional()),
        )
        return all(needed)
    except Exception:  # any attribute missing: a different kafka-python
        return False


class _Slot:
    """One of our records inside a kafka-python batch, where kafka-python keeps a ``FutureRecordMetadata``.

    kafka-python only ever calls ``rebind`` on it: when it splits a batch the broker refused as too large, the
    record moves to a new batch (a new produce future, a new index in it)."""

    __slots__ = ("call", "index", "produce_future", "batch_index")

    def __init__(self, call: _Call, index: int, produce_future: Any, batch_index: int) -> None:
        self.call = call
        self.index = index  # position in the send_batch call
        self.produce_future = produce_future
        self.batch_index = batch_index  # position in kafka-python's batch

    def rebind(self, new_produce_future: Any, new_batch_index: int) -> None:
        self.produce_future = new_produce_future
        self.batch_index = new_batch_index
        self.call.watch(new_produce_future, [self])


class _Call:
    """The records of one ``send_batch`` call that landed in kafka-python batches, and how to report them."""

    def __init__(self, topic: str, results: BatchResults, to_error: Callable[[BaseException], BusError]) -> None:
        self.topic = topic
        self.results = results
        self.to_error = to_error

    def watch(self, produce_future: Any, slots: list[_Slot]) -> None:
        produce_future.add_callback(self._produced, produce_future, slots)
        produce_future.add_errback(self._failed, produce_future, slots)

    def _produced(self, produce_future: Any, slots: list[_Slot], value: tuple) -> None:
        base_offset, _, record_errors = value
        partition = produce_future.topic_partition.partition
        settled: list[tuple[int, RecordMetadata | BusError]] = []
        for slot in slots:
            if slot.produce_future is not produce_future:
                continue  # moved to another batch by a split; reported from there
            if record_errors is not None:
                settled.append((slot.index, self.to_error(record_errors(slot.batch_index))))
            else:
                offset = base_offset + slot.batch_index if base_offset != -1 else -1
                settled.append((slot.index, RecordMetadata(self.topic, partition, offset)))
        self.results.set_many(settled)

    def _failed(self, produce_future: Any, slots: list[_Slot], exc: BaseException) -> None:
        error = self.to_error(exc)
        self.results.set_many([(s.index, error) for s in slots if s.produce_future is produce_future])


class BatchAppender:
    """Appends ``send_batch`` records to one producer's accumulator (thread-safe, like ``KafkaProducer.send``)."""

    def __init__(self, producer: Any, max_request_size: int) -> None:
        self._producer = producer
        self._acc = producer._accumulator
        self._max_request_size = max_request_size

    def append(
        self,
        topic: str,
        records: Sequence[tuple[bytes, bytes | None]],
        results: BatchResults,
        to_error: Callable[[BaseException], BusError],
    ) -> None:
        """Queue ``(value, key)`` records of a topic whose partitions the producer knows; every record's outcome
        goes to ``results`` (its position in ``records``), now for one refused at once, later for the rest."""
        p, acc = self._producer, self._acc
        # 1. partitions: keyed records as the Java client places them, unkeyed ones together on one partition
        all_partitions = p._metadata.partitions_for_topic(topic)
        keyed = [i for i, (_, key) in enumerate(records) if key is not None]
        by_partition: dict[int, list[int]] = {}
        if keyed:
            parts = partitions_for_keys([records[i][1] for i in keyed], all_partitions)
            for i, part in zip(keyed, parts):
                by_partition.setdefault(part, []).append(i)
        if len(keyed) < len(records):
            pool = sorted(p._metadata.available_partitions_for_topic(topic) or all_partitions)
            unkeyed_partition = random.choice(pool)
            for i, (_, key) in enumerate(records):
                if key is None:
                    by_partition.setdefault(unkeyed_partition, []).append(i)
        # 2. append under the accumulator's lock of each partition
        call = _Call(topic, results, to_error)
        timestamp_ms = int(time.time() * 1000)
        config = acc.config
        wake = False
        refused: list[tuple[int, BusError]] = []
        acc._appends_in_progress.increment()  # close() waits for appends in progress before aborting batches
        try:
            for partition in sorted(by_partition):
                tp = TopicPartition(topic, partition)
                watched: dict[int, tuple[Any, list[_Slot]]] = {}  # id(produce future) -> (it, our slots in it)
                with acc._tp_lock(tp):
                    if acc._closed:
                        raise BusError("the Kafka producer is closed")
                    dq = acc._batches[tp]
                    for i in by_partition[partition]:
                        value, key = records[i]
                        size = len(value) + (len(key) if key is not None else 0) + _RECORD_OVERHEAD
                        if size > self._max_request_size:
                            refused.append((i, BusError(
                                f"send to {topic!r} failed: the record is {size} bytes, more than "
                                f"max_request_size_bytes={self._max_request_size}")))
                            continue
                        batch = dq[-1] if dq else None
                        meta = batch.records.append(timestamp_ms, key, value, None) if batch is not None else None
                        if meta is None:  # no open batch, or it is full: start one
                            builder = MemoryRecordsBuilder(
                                config["message_version"], config["compression_attrs"], config["batch_size"])
                            batch = ProducerBatch(tp, builder)
                            meta = builder.append(timestamp_ms, key, value, None)
                            dq.append(batch)
                            acc._incomplete.add(batch)
                            wake = True
                        batch.max_record_size = max(batch.max_record_size, meta.size)
                        slot = _Slot(call, i, batch.produce_future, meta.offset)
                        batch._record_futures.append(slot)
                        entry = watched.get(id(batch.produce_future))
                        if entry is None:
                            watched[id(batch.produce_future)] = (batch.produce_future, [slot])
                        else:
                            entry[1].append(slot)
                    if len(dq) > 1 or (dq and dq[-1].records.is_full()):
                        wake = True
                # 3. one callback per kafka-python batch this call put records in (outside the lock: a batch
                # that is already done calls back at once)
                for produce_future, slots in watched.values():
                    call.watch(produce_future, slots)
        finally:
            acc._appends_in_progress.decrement()
            if refused:
                results.set_many(refused)
            if wake:
                p._sender.wakeup()
