"""The rollout buffer's progress operations (rlhf.trainer.buffer's docstrings) on the in-process buffer: ``ack`` with
the progress in one operation, ``progress_and_depth``, ``wait_progress`` woken by a publication.

Each ``check_*`` function takes a fresh, empty buffer; ``PROGRESS_CONTRACT`` lists them, and
tests/integration/test_redis_buffer_progress.py runs the same list against a real Redis.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from rlhf.trainer.buffer import InMemoryRolloutBuffer, LearnerProgress, RolloutBuffer

Check = Callable[[RolloutBuffer], None]


def check_ack_replaces_the_progress_with_the_removal(buf: RolloutBuffer) -> None:
    ids = [buf.add(f"b-{i}", b"%d" % i) for i in range(3)]
    buf.read("learner-0", count=2, block_s=0.0)
    buf.publish_progress(LearnerProgress(step=2, version="v0", run_id="r", state="running", held=2))
    assert buf.progress_and_depth() == (LearnerProgress(step=2, version="v0", run_id="r", state="running", held=2), 3)
    after = LearnerProgress(step=2, version="v1", version_index=1, run_id="r", state="running", held=0)
    assert buf.ack(ids[:2], progress=after) == 2
    assert buf.progress_and_depth() == (after, 1)
    # No entries: the progress is still replaced.
    later = LearnerProgress(step=3, version="v1", version_index=1, run_id="r", state="running", held=1)
    assert buf.ack([], progress=later) == 0
    assert buf.progress() == later
    # Without a progress, ack leaves it as it was.
    assert buf.ack(ids[2:]) == 1
    assert buf.progress_and_depth() == (later, 0)


def check_wait_progress_returns_at_once_when_the_progress_differs(buf: RolloutBuffer) -> None:
    published = LearnerProgress(step=1, version="v0", run_id="r", state="running")
    buf.publish_progress(published)
    assert buf.wait_progress(LearnerProgress(), 600.0) == published  # a long timeout: returning at all is the check
    assert buf.wait_progress(published, 0.0) == published  # nothing newer, no time to wait: the current one


def check_wait_progress_wakes_on_a_publication(buf: RolloutBuffer) -> None:
    seen = LearnerProgress(step=1, version="v0", run_id="r", state="running")
    buf.publish_progress(seen)
    got: list[LearnerProgress] = []
    waiting = threading.Thread(target=lambda: got.append(buf.wait_progress(seen, 600.0)), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got, "nothing new was published: it waits"
    newer = LearnerProgress(step=2, version="v0", run_id="r", state="running", held=1)
    buf.publish_progress(newer)
    waiting.join(60.0)  # far below the wait's own 600 s: only the publication ends it this early
    assert not waiting.is_alive() and got == [newer]


def check_wait_progress_wakes_on_an_ack_with_progress(buf: RolloutBuffer) -> None:
    entry = buf.add("b-0", b"0")
    buf.read("learner-0", count=1, block_s=0.0)
    seen = LearnerProgress(step=1, run_id="r", state="running", held=1)
    buf.publish_progress(seen)
    got: list[LearnerProgress] = []
    waiting = threading.Thread(target=lambda: got.append(buf.wait_progress(seen, 600.0)), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()
    checkpointed = LearnerProgress(step=1, version="v1", version_index=1, run_id="r", state="running", held=0)
    buf.ack([entry], progress=checkpointed)
    waiting.join(60.0)
    assert got == [checkpointed]
    assert buf.progress_and_depth() == (checkpointed, 0)


PROGRESS_CONTRACT: list[Check] = [
    check_ack_replaces_the_progress_with_the_removal,
    check_wait_progress_returns_at_once_when_the_progress_differs,
    check_wait_progress_wakes_on_a_publication,
    check_wait_progress_wakes_on_an_ack_with_progress,
]


@pytest.mark.parametrize("check", PROGRESS_CONTRACT, ids=lambda c: c.__name__.removeprefix("check_"))
def test_in_memory_buffer_keeps_the_progress_contract(check: Check) -> None:
    check(InMemoryRolloutBuffer())


def test_progress_without_held_reads_as_none_held() -> None:
    """A progress published by an older learner (no ``held``) counts every entry as still ahead (conservative)."""
    assert LearnerProgress(step=3).held == 0
