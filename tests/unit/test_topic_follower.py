"""TopicFollower: the one retry loop of the model-event followers and the prompt feed. A failing poll or handle makes
a new reader that goes on after the last handled record: nothing handled twice, nothing skipped."""
from __future__ import annotations

import threading
import time

from rlhf.bus.base import TopicSpec
from rlhf.bus.follower import TopicFollower
from rlhf.bus.memory import InMemoryBus

TOPIC = "t.v1"


class FlakyBus(InMemoryBus):
    """Its readers' polls fail while ``down`` is set; counts the readers made and where they started."""

    def __init__(self) -> None:
        super().__init__(default_partitions=2)
        self.down = threading.Event()
        self.starts: list[dict] = []

    def reader(self, topic_names, *, client_id, start_at=None):
        self.starts.append(dict(start_at or {}))
        inner = super().reader(topic_names, client_id=client_id, start_at=start_at)
        bus = self

        class Reader:
            def poll(self, timeout_s, max_records=None):
                if bus.down.is_set():
                    raise ConnectionError("broker down")
                return inner.poll(timeout_s, max_records=max_records)

            def close(self):
                inner.close()

        return Reader()


class Collect(TopicFollower):
    def __init__(self, bus, *, fail_values=(), **kwargs):
        super().__init__(bus, [TOPIC], client_id="test", poll_timeout_s=0.05, max_records=3, retry_s=0.05, **kwargs)
        self.seen: list[bytes] = []
        self.fail_values = set(fail_values)
        self.idled = threading.Event()

    def handle(self, messages):
        for m in messages:
            if m.value in self.fail_values:
                self.fail_values.discard(m.value)
                raise RuntimeError("cannot use it yet")
        self.seen += [m.value for m in messages]
        return True

    def idle(self):
        self.idled.set()


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def send(bus, values):
    for v in values:
        bus.send(TOPIC, v, key=v)


def test_a_failing_poll_or_handle_retries_from_after_the_last_handled_record():
    bus = FlakyBus()
    bus.ensure_topics([TopicSpec(TOPIC, partitions=2)])
    values = [f"r{i}".encode() for i in range(20)]
    follower = Collect(bus, fail_values={b"r7"})
    send(bus, values[:10])
    follower.start()
    try:
        assert wait_for(lambda: len(follower.seen) == 10), follower.seen
        bus.down.set()
        assert wait_for(lambda: "broker down" in follower.last_error)
        send(bus, values[10:])
        bus.down.clear()
        assert wait_for(lambda: len(follower.seen) == 20), follower.seen
        assert wait_for(lambda: follower.last_error == "")
    finally:
        follower.stop()
    assert sorted(follower.seen) == sorted(values)  # each once: none twice, none skipped
    assert len(bus.starts) >= 3  # the first reader, one after the failed handle, one after the outage
    assert bus.starts[0] == {} and sum(bus.starts[-1].values()) == 10  # the last one started after what was handled


def test_an_empty_poll_is_idle_and_a_handle_that_says_stop_ends_the_thread_without_advancing():
    bus = FlakyBus()
    bus.ensure_topics([TopicSpec(TOPIC, partitions=2)])

    class StopAtOnce(Collect):
        def handle(self, messages):
            return False

    follower = StopAtOnce(bus)
    follower.start()
    assert follower.idled.wait(5)
    send(bus, [b"a", b"b"])
    follower._thread.join(5)
    assert not follower._thread.is_alive() and follower._next == {}
    follower.stop()
