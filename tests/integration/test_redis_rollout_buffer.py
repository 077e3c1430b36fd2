"""RedisRolloutBuffer against a real Redis: the contract shared with the in-process buffer
(tests/unit/test_rollout_buffer.py), then what only a real server shows: a restarted learner, two writers, what is
stored under which key, a deleted stream, error replies, and Redis going away and coming back.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from rlhf.trainer.buffer import BufferError, BufferUnavailable, LearnerProgress, RolloutBuffer, open_buffer
from rlhf.trainer.buffer_redis import RedisRolloutBuffer
from unit.test_rollout_buffer import CONTRACT, Check


@pytest.fixture
def url(redis_url: str) -> str:
    """The shared Redis with a key prefix of this test's own (no collisions with other tests or sessions)."""
    return f"{redis_url}?key_prefix=test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def make(url: str) -> Iterator[Callable[..., RedisRolloutBuffer]]:
    """Buffers on ``url`` (closed after the test); each call is another client object, as another process."""
    made: list[RedisRolloutBuffer] = []

    def make(at: str = url, **kwargs) -> RedisRolloutBuffer:
        buf = RedisRolloutBuffer.from_url(at, **kwargs)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client, to look at what the buffer wrote."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__.removeprefix("check_"))
def test_redis_buffer_keeps_the_contract(check: Check, make: Callable[..., RedisRolloutBuffer]) -> None:
    check(make())


def test_a_restarted_learner_gets_its_unacknowledged_entries_with_their_delivery_count(make) -> None:
    before = make()
    ids = [before.add(f"b-{i}", b"%d" % i) for i in range(3)]
    assert [e.entry_id for e in before.read("learner-0", count=2, block_s=0.0)] == ids[:2]
    before.close()  # the learner dies holding ids[0] and ids[1]

    after = make()
    pending = after.read("learner-0", count=10, block_s=0.0, pending=True)
    assert [(e.entry_id, e.batch_id, e.deliveries) for e in pending] == [(ids[0], "b-0", 2), (ids[1], "b-1", 2)]
    assert [e.entry_id for e in after.read("learner-0", count=10, block_s=0.0)] == ids[2:]
    assert after.ack(ids) == 3
    assert after.read("learner-0", count=10, block_s=0.0, pending=True) == []
    assert after.depth() == 0


def test_one_batch_added_by_two_clients_is_stored_once(make) -> None:
    a, b = make(), make()
    assert a.add("same", b"from a") is not None
    assert b.add("same", b"from b") is None
    assert a.depth() == b.depth() == 1

    # Racing: eight workers retry one batch at the same moment; the script lets exactly one store it.
    clients = [make() for _ in range(8)]
    start = threading.Barrier(len(clients))
    results: list[str | None] = []

    def add(buf: RolloutBuffer) -> None:
        start.wait()
        results.append(buf.add("raced", b"x"))

    threads = [threading.Thread(target=add, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert a.depth() == 2


def test_open_buffer_on_redis_and_what_it_stores(url: str, server: redis.Redis) -> None:
    prefix = url.split("key_prefix=")[1]
    buf = open_buffer(url, stream="rollouts")
    assert isinstance(buf, RedisRolloutBuffer)
    pubsub = server.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(f"{prefix}rollouts:progress")
        entry_id = buf.add("b-1", b"payload")
        stream = f"{prefix}rollouts"
        assert server.xlen(stream) == 1
        assert server.xrange(stream) == [(entry_id.encode(), {b"batch_id": b"b-1", b"payload": b"payload"})]
        seen_ttl_s = server.ttl(f"{stream}:seen:b-1")
        assert 7 * 86400 - 60 < seen_ttl_s <= 7 * 86400  # the idempotency mark expires (dedupe_ttl_s: 7 days)
        assert [g["name"] for g in server.xinfo_groups(stream)] == [b"learner"]

        progress = LearnerProgress(step=3, version="v-1", version_index=1, run_id="r", state="running")
        buf.publish_progress(progress)
        assert json.loads(server.get(f"{stream}:progress"))["version"] == "v-1"
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
        assert message is not None and json.loads(message["data"])["step"] == 3

        assert buf.ack([entry_id]) == 1
        assert server.xlen(stream) == 0  # acknowledged entries are deleted, not only acknowledged
        assert server.xpending(stream, "learner")["pending"] == 0
    finally:
        pubsub.close()
        buf.close()


def test_a_deleted_stream_gets_its_group_back(make, url: str, server: redis.Redis) -> None:
    buf = make()
    buf.add("b-1", b"x")
    assert len(buf.read("learner-0", count=1, block_s=0.0)) == 1
    server.delete(buf.key)  # someone flushed the stream: NOGROUP on the next group command
    assert buf.read("learner-0", count=1, block_s=0.0) == []
    assert buf.read("learner-0", count=1, block_s=0.0, pending=True) == []
    buf.add("b-2", b"y")
    assert [e.batch_id for e in buf.read("learner-0", count=1, block_s=0.0)] == ["b-2"]


def test_entries_deleted_without_ack_leave_the_pending_list(make, server: redis.Redis) -> None:
    buf = make()
    ids = [buf.add(f"b-{i}", b"x") for i in range(3)]
    buf.read("learner-0", count=3, block_s=0.0)
    server.xdel(buf.key, ids[1])  # e.g. an XTRIM: its PEL entry stays, with no fields
    pending = buf.read("learner-0", count=10, block_s=0.0, pending=True)
    assert [e.entry_id for e in pending] == [ids[0], ids[2]]
    assert server.xpending(buf.key, "learner")["pending"] == 2


def test_a_run_of_deleted_entries_does_not_hide_the_live_pending_ones(make, server: redis.Redis) -> None:
    buf = make()
    ids = [buf.add(f"b-{i}", b"x") for i in range(5)]
    buf.read("learner-0", count=5, block_s=0.0)
    server.xdel(buf.key, *ids[:3])  # more deleted entries ahead of the live ones than one read asks for
    pending = buf.read("learner-0", count=2, block_s=0.0, pending=True)
    assert [e.entry_id for e in pending] == ids[3:]
    assert server.xpending(buf.key, "learner")["pending"] == 2


def test_an_error_reply_is_buffer_error_not_unavailable(make, server: redis.Redis) -> None:
    buf = make()
    server.set(buf.key, b"not a stream")
    try:
        with pytest.raises(BufferError, match="WRONGTYPE") as err:
            buf.add("b-1", b"x")
        assert not isinstance(err.value, BufferUnavailable)
        buf.ping()  # the connection is still good
    finally:
        server.delete(buf.key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_redis_is_unavailable_without_leaking_the_password() -> None:
    port = free_port()
    buf = RedisRolloutBuffer.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
    try:
        t = time.monotonic()
        with pytest.raises(BufferUnavailable, match=f"127.0.0.1:{port}") as err:
            buf.add("b-1", b"x")
        assert time.monotonic() - t < 5
        assert "s3cret" not in str(err.value) and "s3cret" not in repr(buf)
    finally:
        buf.close()


def test_redis_stopped_is_unavailable_promptly_and_the_same_buffer_recovers(private_redis) -> None:
    buf = RedisRolloutBuffer.from_url(f"{private_redis.url}?key_prefix=outage:")
    try:
        kept = buf.add("before", b"x")
        assert [e.entry_id for e in buf.read("learner-0", count=1, block_s=0.0)] == [kept]

        private_redis.stop()
        calls: dict[str, Callable[[], object]] = {
            "add": lambda: buf.add("during", b"x"),
            "read": lambda: buf.read("learner-0", count=1, block_s=1.0),
            "read pending": lambda: buf.read("learner-0", count=1, block_s=0.0, pending=True),
            "ack": lambda: buf.ack([kept]),
            "depth": buf.depth,
            "progress": buf.progress,
            "publish_progress": lambda: buf.publish_progress(LearnerProgress(step=1)),
            "ping": buf.ping,
        }
        for name, call in calls.items():
            t = time.monotonic()
            with pytest.raises(BufferUnavailable, match=f"127.0.0.1:{private_redis.port}"):
                call()
            assert time.monotonic() - t < 5, f"{name} took {time.monotonic() - t:.1f}s to fail"

        private_redis.start()  # without persistence: an empty Redis, which the buffer must simply use again
        buf.ping()
        entry_id = buf.add("after", b"y")
        assert entry_id is not None
        assert [e.batch_id for e in buf.read("learner-0", count=1, block_s=1.0)] == ["after"]
        assert buf.ack([entry_id]) == 1
        assert buf.depth() == 0
    finally:
        buf.close()


def test_a_hung_redis_is_unavailable_within_the_socket_timeout_and_the_buffer_recovers(private_redis) -> None:
    buf = RedisRolloutBuffer.from_url(f"{private_redis.url}?key_prefix=hang:")
    try:
        kept = buf.add("before", b"x")
        private_redis.pause()  # SIGSTOP: the server keeps its socket open and never answers
        try:
            for name, call in {"add": lambda: buf.add("during", b"x"), "depth": buf.depth,
                               "read": lambda: buf.read("learner-0", count=1, block_s=0.5)}.items():
                t = time.monotonic()
                with pytest.raises(BufferUnavailable, match=f"127.0.0.1:{private_redis.port}"):
                    call()
                assert time.monotonic() - t < 15, f"{name} hung {time.monotonic() - t:.1f}s"
        finally:
            private_redis.resume()
        # the server was only frozen: what it held is still there, and the same buffer goes on. (It may still run
        # the commands that timed out once it resumes: the read may have delivered the entry to learner-0's pending
        # list, and "during" may be stored; a worker's retry of it is deduplicated by its batch id.)
        held = buf.read("learner-0", count=10, block_s=0.0, pending=True) + buf.read("learner-0", count=10,
                                                                                      block_s=1.0)
        assert kept in [e.entry_id for e in held]
        assert buf.add("after", b"y") is not None
    finally:
        buf.close()
