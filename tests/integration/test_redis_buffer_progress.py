"""RedisRolloutBuffer's progress operations against a real Redis: the contract shared with the in-process buffer
(tests/unit/test_rollout_buffer_progress.py), a progress JSON of an older learner (no ``held``), and a waiter while
Redis is down."""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from rlhf.trainer.buffer import BufferUnavailable, LearnerProgress
from rlhf.trainer.buffer_redis import RedisRolloutBuffer
from unit.test_rollout_buffer_progress import PROGRESS_CONTRACT, Check


@pytest.fixture
def url(redis_url: str) -> str:
    return f"{redis_url}?key_prefix=test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def buffer(url: str) -> Iterator[RedisRolloutBuffer]:
    buf = RedisRolloutBuffer.from_url(url)
    yield buf
    buf.close()


@pytest.mark.parametrize("check", PROGRESS_CONTRACT, ids=lambda c: c.__name__.removeprefix("check_"))
def test_redis_buffer_keeps_the_progress_contract(check: Check, buffer: RedisRolloutBuffer) -> None:
    check(buffer)


def test_a_progress_without_held_is_read_with_none_held(buffer: RedisRolloutBuffer, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        old = {"step": 4, "version": "v1", "version_index": 1, "uri": "policy/v1", "run_id": "r", "state": "running",
               "saved_at": 1.0}
        client.set(f"{buffer.key}:progress", json.dumps(old))
    finally:
        client.close()
    progress, depth = buffer.progress_and_depth()
    assert progress == LearnerProgress(**old) and progress.held == 0 and depth == 0


def test_a_waiter_gets_buffer_unavailable_while_redis_is_down_then_waits_again(private_redis) -> None:
    buf = RedisRolloutBuffer.from_url(f"{private_redis.url}?key_prefix=test-wait:")
    try:
        seen = LearnerProgress(step=1, run_id="r", state="running")
        buf.publish_progress(seen)
        assert buf.wait_progress(seen, 0.2) == seen  # subscribed; nothing newer within the timeout
        private_redis.stop()
        with pytest.raises(BufferUnavailable):
            buf.wait_progress(seen, 0.5)
        private_redis.start()
        newer = LearnerProgress(step=2, run_id="r", state="running")
        buf.publish_progress(newer)
        assert buf.wait_progress(seen, 600.0) == newer  # a fresh subscription after the outage
    finally:
        buf.close()
