"""The rollout-buffer contract (rlhf.trainer.buffer's docstrings), on the in-process buffer.

Each ``check_*`` function takes a fresh, empty buffer and asserts one part of the contract; ``CONTRACT`` lists them,
and tests/integration/test_redis_rollout_buffer.py runs the same list against a real Redis.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from rlhf.trainer.buffer import InMemoryRolloutBuffer, LearnerProgress, RolloutBuffer, open_buffer

Check = Callable[[RolloutBuffer], None]


def check_add_is_idempotent_by_batch_id(buf: RolloutBuffer) -> None:
    first = buf.add("b-1", b"one")
    assert isinstance(first, str) and first
    assert buf.add("b-1", b"one again") is None  # a worker retrying after a crash: stored once
    assert buf.depth() == 1
    (entry,) = buf.read("learner-0", count=10, block_s=0.0)
    assert (entry.entry_id, entry.batch_id, entry.payload, entry.deliveries) == (first, "b-1", b"one", 1)


def check_new_entries_oldest_first_once_each(buf: RolloutBuffer) -> None:
    ids = [buf.add(f"b-{i}", b"%d" % i) for i in range(3)]
    got = buf.read("learner-0", count=2, block_s=0.0)
    assert [e.entry_id for e in got] == ids[:2]
    assert [e.payload for e in got] == [b"0", b"1"]
    rest = buf.read("learner-0", count=10, block_s=0.0)
    assert [e.entry_id for e in rest] == ids[2:]
    # Delivered and not acknowledged entries are not new: a running learner holds them until its checkpoint.
    assert buf.read("learner-0", count=10, block_s=0.0) == []
    assert buf.read("learner-1", count=10, block_s=0.0) == []  # nor new to another consumer of the group


def check_pending_reads_own_unacknowledged_entries(buf: RolloutBuffer) -> None:
    ids = [buf.add(f"b-{i}", b"%d" % i) for i in range(3)]
    assert buf.read("learner-0", count=10, block_s=0.0, pending=True) == []  # nothing delivered yet
    buf.read("learner-0", count=3, block_s=0.0)
    pending = buf.read("learner-0", count=10, block_s=0.0, pending=True)
    assert [e.entry_id for e in pending] == ids  # oldest first
    assert [e.batch_id for e in pending] == ["b-0", "b-1", "b-2"]
    assert [e.deliveries for e in pending] == [2, 2, 2]
    assert [e.entry_id for e in buf.read("learner-0", count=2, block_s=0.0, pending=True)] == ids[:2]
    assert buf.read("learner-1", count=10, block_s=0.0, pending=True) == []  # another consumer's are not its own


def check_ack_removes_for_good(buf: RolloutBuffer) -> None:
    ids = [buf.add(f"b-{i}", b"x") for i in range(3)]
    buf.read("learner-0", count=2, block_s=0.0)  # delivered: ids[0], ids[1]; ids[2] never read
    assert buf.depth() == 3  # delivered or not, until acknowledged
    assert buf.ack([ids[0], ids[2]]) == 2
    assert buf.ack([ids[0]]) == 0  # already gone
    assert buf.ack([]) == 0
    assert buf.depth() == 1
    assert [e.entry_id for e in buf.read("learner-0", count=10, block_s=0.0, pending=True)] == [ids[1]]
    assert buf.read("learner-0", count=10, block_s=0.0) == []  # ids[2] was acknowledged before it was read
    assert buf.add("b-0", b"x") is None  # acknowledging does not forget the batch id


def check_depth_counts_added_and_not_acknowledged(buf: RolloutBuffer) -> None:
    assert buf.depth() == 0
    ids = [buf.add(f"b-{i}", b"x") for i in range(5)]
    buf.add("b-0", b"dup")
    assert buf.depth() == 5
    buf.read("learner-0", count=5, block_s=0.0)
    assert buf.depth() == 5
    buf.ack(ids)
    assert buf.depth() == 0


def check_blocking_read_returns_when_a_writer_adds(buf: RolloutBuffer) -> None:
    def writer() -> None:
        time.sleep(0.3)
        buf.add("late", b"arrived")

    thread = threading.Thread(target=writer)
    t = time.monotonic()
    thread.start()
    try:
        got = buf.read("learner-0", count=1, block_s=10.0)
    finally:
        thread.join()
    elapsed = time.monotonic() - t
    assert [e.payload for e in got] == [b"arrived"]
    assert 0.2 < elapsed < 5.0, elapsed  # woke on the add, not at the end of block_s


def check_read_waits_block_s_then_returns_nothing(buf: RolloutBuffer) -> None:
    t = time.monotonic()
    assert buf.read("learner-0", count=1, block_s=0.3) == []
    assert 0.25 < time.monotonic() - t < 3.0
    t = time.monotonic()
    assert buf.read("learner-0", count=1, block_s=10.0, pending=True) == []  # pending never waits
    assert time.monotonic() - t < 1.0


def check_progress_round_trip(buf: RolloutBuffer) -> None:
    assert buf.progress() == LearnerProgress()
    every_field = LearnerProgress(step=7, version="v-3", version_index=3, uri="versions/v-3", run_id="run-1",
                                  state="running", saved_at=1_796_000_000.25)
    buf.publish_progress(every_field)
    assert buf.progress() == every_field
    buf.publish_progress(LearnerProgress(step=8, state="paused"))
    assert buf.progress() == LearnerProgress(step=8, state="paused")  # replaced, not merged


def check_binary_and_1mb_payloads_round_trip(buf: RolloutBuffer) -> None:
    binary = bytes(range(256)) * 4
    big = bytes(range(256)) * 4096  # 1 MiB
    buf.add("binary", binary)
    buf.add("big", big)
    got = buf.read("learner-0", count=2, block_s=0.0)
    assert [e.payload for e in got] == [binary, big]


def check_ping_answers(buf: RolloutBuffer) -> None:
    buf.ping()


CONTRACT: list[Check] = [
    check_add_is_idempotent_by_batch_id,
    check_new_entries_oldest_first_once_each,
    check_pending_reads_own_unacknowledged_entries,
    check_ack_removes_for_good,
    check_depth_counts_added_and_not_acknowledged,
    check_blocking_read_returns_when_a_writer_adds,
    check_read_waits_block_s_then_returns_nothing,
    check_progress_round_trip,
    check_binary_and_1mb_payloads_round_trip,
    check_ping_answers,
]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__.removeprefix("check_"))
def test_in_memory_buffer_keeps_the_contract(check: Check) -> None:
    buf = InMemoryRolloutBuffer()
    try:
        check(buf)
    finally:
        buf.close()


def test_in_memory_dedupe_window_forgets_the_oldest_ids() -> None:
    buf = InMemoryRolloutBuffer(dedupe_window=2)
    for batch_id in ("a", "b", "c"):
        assert buf.add(batch_id, b"x") is not None
    assert buf.add("c", b"x") is None
    assert buf.add("a", b"x") is not None  # out of the window: stored again


def test_open_buffer_memory_and_bad_scheme() -> None:
    assert isinstance(open_buffer("memory://"), InMemoryRolloutBuffer)
    with pytest.raises(ValueError, match="memory:// or redis://"):
        open_buffer("kafka://localhost:9092")
