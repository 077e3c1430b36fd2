"""Read back what the services wrote to real Kafka topics (no consumer group: every partition, from the start or
from a point in time)."""
from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from rlhf.bus import topics
from rlhf.v1 import events_pb2


def read_topic(bootstrap: str, topic: str, stop, timeout_s: float = 60.0, settle_s: float = 0.0,
               since_s: float | None = None):
    """Yield (key, value) of every record of ``topic`` (written at ``since_s`` or later, epoch seconds, when given)
    until ``stop()`` is true (then ``settle_s`` more, so that duplicates arriving late are seen too) or
    ``timeout_s`` passes."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500)
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        if partitions is None:
            raise AssertionError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        if since_s is not None:  # skip what older runs (benchmarks, earlier tests) left on a long-lived broker
            starts = consumer.offsets_for_times({tp: int(since_s * 1000) for tp in tps})
            for tp in tps:
                if starts.get(tp) is None:
                    consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, starts[tp].offset)
        settle_until = None
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    yield record.key, record.value
            if settle_until is None and stop():
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and time.monotonic() >= settle_until and not batch:
                return
    finally:
        consumer.close()


# Records a test looks for were written during this test session: it started after this module was imported
# (a minute of margin for clocks). Older records (benchmarks, earlier sessions on a long-lived broker) are skipped.
SESSION_START_S = time.time() - 60.0


def read_feedback(bootstrap: str, event_ids: set[str], *, timeout_s: float = 60.0, settle_s: float = 0.5,
                  with_keys: bool = False):
    """The FeedbackRecords on rlhf.feedback.v1 whose event id is in ``event_ids`` (every copy, duplicates
    included), once all of them were seen or ``timeout_s`` passed. Only records written since the test session
    started are read: the topic is shared by every test and benchmark run against the broker."""
    found: list = []
    seen: set[str] = set()
    for key, value in read_topic(bootstrap, topics.FEEDBACK, lambda: seen >= event_ids, timeout_s, settle_s,
                                 since_s=SESSION_START_S):
        record = events_pb2.FeedbackRecord.FromString(value)
        if record.event.event_id in event_ids:
            seen.add(record.event.event_id)
            found.append((key, record) if with_keys else record)
    return found
