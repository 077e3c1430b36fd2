"""The trainer's consumption path: the batched durable join, offsets read inside the storing transaction, the store
process, and the pipelined consumer (one batch stored while the next is polled) over the in-memory bus."""
from __future__ import annotations

import sqlite3
import time

import pytest

from rlhf.bus import InMemoryBus, topics
from rlhf.bus.base import Message
from rlhf.trainer.consume import FeedbackConsumer, _InlineStore
from rlhf.trainer.dataset import Dataset, StoreFailed, StoreProcess, partition_records
from support.trainer_records import (
    demonstration, feedback_message, feedback_record, pairwise, ranking, response_message, served, thumb,
)


@pytest.fixture
def dataset(tmp_path):
    ds = Dataset(str(tmp_path / "dataset.sqlite"), heldout_share=0.2, join_timeout_s=60)
    yield ds
    ds.close()


def test_many_events_waiting_for_responses_join_in_one_batch(dataset):
    """Rankings stored before their responses wait; one batch of responses converts every event whose responses
    are now all stored, and only those (the batched join: a few queries per batch)."""
    n = 300
    dataset.store([feedback_message(ranking(f"w{i}", f"a{i}", f"b{i}")) for i in range(n)])
    assert dataset.sizes()["feedback_pending"] == n
    # every a, and the b of the even events only
    dataset.store([response_message(served(f"a{i}", f"q{i}", f"first {i}")) for i in range(n)]
                  + [response_message(served(f"b{i}", f"q{i}", f"second {i}")) for i in range(0, n, 2)])
    states = dict(dataset.feedback_events())
    assert sorted(e for e, s in states.items() if s == "used") == sorted(f"w{i}" for i in range(0, n, 2))
    got = {c.comparison.sources: c.comparison.responses for c in dataset.comparisons()}
    assert got[("w4",)] == ("first 4", "second 4") and len(got) == n // 2
    assert sorted(dataset._join.waiting) == sorted(f"b{i}" for i in range(1, n, 2))  # the odd ones wait for b only
    # A writer opened now rebuilds that from the pending rows (as after a restart) and joins the rest.
    fresh = Dataset(dataset.path, heldout_share=0.2)
    out = fresh.store([response_message(served(f"b{i}", f"q{i}", f"second {i}")) for i in range(1, n, 2)])
    fresh.close()
    assert out.comparisons == n // 2 and not out.dead
    assert set(dict(dataset.feedback_events()).values()) == {"used"} and dataset.count_comparisons() == n


def test_writers_taking_turns_on_one_file_join_what_the_other_left_pending(dataset):
    """Each writer keeps the pending feedback in memory; a transaction of another writer that changed it (the store
    process after the consumer's inline store, a restarted trainer, expire) makes that copy stale, and it is read
    again from the file: nothing waits forever, nothing is converted twice."""
    other = Dataset(dataset.path)
    dataset.store([feedback_message(ranking("e1", "r1", "r2")), feedback_message(ranking("e2", "r3", "r4"))])
    assert other.store([response_message(served("r1", "q1", "a")), response_message(served("r2", "q1", "b")),
                        feedback_message(ranking("e3", "r5", "r6"))]).comparisons == 1  # e1, pending in the other
    assert dataset.store([response_message(served("r3", "q2", "c")), response_message(served("r5", "q3", "e"))]
                         ).comparisons == 0  # e2 and e3 still wait for r4, r6 (e3 was stored by the other)
    out = other.store([response_message(served("r4", "q2", "d")), response_message(served("r6", "q3", "f"))])
    assert out.comparisons == 2 and dataset.count_comparisons() == 3
    assert set(dict(dataset.feedback_events()).values()) == {"used"}
    assert dataset.store([response_message(served("r7", "q4", "g"))]).comparisons == 0  # nothing converted twice
    assert dataset.count_comparisons() == 3
    other.close()


def test_a_failed_transaction_leaves_the_join_index_as_the_file_has_it(dataset, monkeypatch):
    """The join index changes during a transaction; one that fails is rolled back, and so is what it did to the
    index: the events it resolved still wait, and are converted once the batch is stored."""
    dataset.store([feedback_message(ranking("e1", "r1", "r2"))])
    batch = [response_message(served("r1", "q", "a")), response_message(served("r2", "q", "b"))]
    real = Dataset._bump_join

    def failing(db, index):
        real(db, index)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Dataset, "_bump_join", staticmethod(failing))
    with pytest.raises(sqlite3.OperationalError):
        dataset.store(batch)
    monkeypatch.undo()
    assert dict(dataset.feedback_events()) == {"e1": "pending"} and dataset.count_comparisons() == 0
    assert dataset.store(batch).comparisons == 1
    assert dict(dataset.feedback_events()) == {"e1": "used"}


def test_a_waiting_event_that_became_unusable_is_dead_lettered_when_its_responses_arrive(dataset):
    dataset.store([feedback_message(pairwise("cross", "x1", "x2")), feedback_message(thumb("t", "x1", True))])
    out = dataset.store([response_message(served("x1", "cook rice", "a")),
                         response_message(served("x2", "plan a picnic", "b"))])
    assert out.dead == {"different_prompts": 1}
    assert dict(dataset.feedback_events()) == {"cross": "dead", "t": "used"}
    assert "different prompts" in dataset.dead_reason("cross")


def test_a_second_writer_with_stale_offsets_stores_nothing_twice(dataset):
    """The offsets that skip redelivered records are read inside the storing transaction, so another instance on
    the same file (a store process, a trainer restarted while the old one's last batch was committing) whose cache
    is older still stores a record once."""
    other = Dataset(dataset.path)  # opened before anything was stored
    batch = [response_message(served("r1", "q", "x")), response_message(served("r2", "q", "y")),
             feedback_message(ranking("e1", "r1", "r2")), feedback_message(demonstration("d1", "p", "ideal"))]
    first = dataset.store(batch)
    assert sum(first.stored.values()) == 4 and first.offsets == dataset.stored_offsets()
    again = other.store(batch)
    assert again.duplicates == {"redelivered": 4} and not again.stored
    assert dataset.count_comparisons() == 1 and len(dataset.demonstrations()) == 1
    other.close()


def test_records_stored_before_at_other_offsets_are_looked_up_and_stored_once(dataset):
    """A batch is first stored as new without looking its ids up; one id stored before (sent again by a producer:
    a new offset) rolls that attempt back, and the batch is stored again with the lookups: the new records once,
    the old ones counted as duplicates, nothing derived twice."""
    first = dataset.store([response_message(served("o1", "q", "x")), response_message(served("o2", "q", "y")),
                           feedback_message(demonstration("od", "p", "ideal")),
                           feedback_message(ranking("ow", "o1", "o9"))])  # waits for o9
    assert first.stored == {"response": 2, "demonstration": 1, "ranking": 1}
    again = dataset.store([response_message(served("o2", "q", "y")), response_message(served("o9", "q", "z")),
                           feedback_message(demonstration("od", "p", "ideal")),
                           feedback_message(demonstration("nd", "p", "new")),
                           feedback_message(ranking("ok", "o1", "o2"))])
    assert again.stored == {"response": 1, "demonstration": 1, "ranking": 1}
    assert again.duplicates == {"response": 1, "demonstration": 1}
    assert again.comparisons == 2 and again.demonstrations == 1  # "ow" joined o9, "ok" its stored responses
    assert len(dataset.demonstrations()) == 2 and dataset.count_comparisons() == 2
    assert dict(dataset.feedback_events()) == {"od": "used", "ow": "used", "nd": "used", "ok": "used"}
    assert dataset.sizes()["responses"] == 3
    assert not dataset._join.pending and not dataset._join.waiting


def test_responses_named_later_are_read_from_the_recent_ones_or_else_from_the_file(dataset):
    """The writer keeps the responses of its last transactions (a bounded number): feedback naming them needs no
    query; ones it dropped are read from the file."""
    dataset.RECENT_RESPONSES = 2
    dataset.store([response_message(served(f"c{i}", "q", f"text {i}")) for i in range(4)])
    assert sorted(dataset._recent) == ["c2", "c3"]
    out = dataset.store([feedback_message(ranking("old", "c0", "c1")), feedback_message(ranking("new", "c3", "c2"))])
    assert out.comparisons == 2 and sorted(dataset._recent) == ["c0", "c1"]  # read from the file, the newest now
    got = {c.comparison.sources: c.comparison.responses for c in dataset.comparisons()}
    assert got == {("old",): ("text 0", "text 1"), ("new",): ("text 3", "text 2")}


def test_the_consumer_stores_on_its_thread_until_the_store_process_is_up(tmp_path, monkeypatch):
    """A store process takes a fresh interpreter's imports to start: batches polled before it is up are stored on
    the consumer's thread, the later ones by the process."""
    bus = InMemoryBus()
    bus.ensure_topics(topics.platform_topics(partitions=2))
    ds = Dataset(str(tmp_path / "dataset.sqlite"))
    up = {"now": False}
    started = StoreProcess.started
    monkeypatch.setattr(StoreProcess, "started", lambda self: up["now"] and started(self))
    where = []
    for cls in (StoreProcess, _InlineStore):
        submit = cls.submit
        monkeypatch.setattr(cls, "submit", lambda self, messages, *a, _s=submit, _c=cls: (
            where.append(_c.__name__), _s(self, messages, *a))[1])
    consumer = FeedbackConsumer(bus, ds, group="g", max_records=5, poll_timeout_s=0.05, housekeeping_s=0.1)
    _produce(bus, events=[demonstration(f"d{i}", f"p{i}", f"ideal {i}") for i in range(10)])
    consumer.start()
    try:
        _wait(lambda: ds.sizes().get("feedback_used") == 10, "the first events, stored on the thread")
        assert set(where) == {"_InlineStore"} and isinstance(consumer._store, StoreProcess)
        up["now"] = True  # (from the process's own start on)
        later = 0
        deadline = time.monotonic() + 30
        while "StoreProcess" not in where and time.monotonic() < deadline:
            _produce(bus, events=[demonstration(f"e{later}", "p", f"ideal {later}")])
            later += 1
            time.sleep(0.05)
        _wait(lambda: ds.sizes().get("feedback_used") == 10 + later, "the later events")
        assert "StoreProcess" in where and where[-1] == "StoreProcess" and not consumer.last_error
    finally:
        consumer.stop()
        ds.close()
        bus.close()
    assert len(ds.demonstrations()) == 10 + later


def test_the_store_process_stores_in_one_transaction_and_advances_the_offsets(dataset):
    store = StoreProcess(dataset)
    try:
        deadline = time.monotonic() + 30
        while not store.started() and time.monotonic() < deadline:  # up once its dataset is open
            time.sleep(0.01)
        assert store.started()
        batch = [response_message(served("p1", "q", "x")), response_message(served("p2", "q", "y")),
                 feedback_message(ranking("pe", "p1", "p2")), feedback_message(ranking("pw", "p1", "p3"))]
        out = store.store(batch)
        assert out.stored == {"response": 2, "ranking": 2} and out.comparisons == 1
        assert dataset.stored_offsets() == {(topics.RESPONSES, batch[1].partition): batch[1].offset + 1,
                                            (topics.FEEDBACK, batch[3].partition): batch[3].offset + 1}
        assert dict(dataset.feedback_events()) == {"pe": "used", "pw": "pending"}  # written by the other process
        store.submit(partition_records(batch))  # delivered again: skipped by its offsets
        deadline = time.monotonic() + 30
        while not store.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.ready() and store.result().duplicates == {"redelivered": 4}
        bad = Message(topics.FEEDBACK, 0, 10**9, None, b"\xff\xff not a record")
        assert store.store([bad]).dead == {"unparsable": 1}
    finally:
        store.close()
    assert not store.alive


def _started(store):
    deadline = time.monotonic() + 30
    while not store.started() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.started()


def _when_ready(store):
    deadline = time.monotonic() + 30
    while not store.ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    return store.ready()


def test_the_store_process_takes_two_batches_and_answers_each_in_order(dataset):
    """Two batches in flight: each one's result is seen as ready when it is, without another batch sent (the
    replies are framed and read from the raw pipe, so a reply read along with the one before is not missed)."""
    from rlhf.bus.base import PartitionRecords

    store = StoreProcess(dataset)
    try:
        _started(store)
        first = partition_records([response_message(served(f"f{i}", "q", f"x{i}")) for i in range(50)])
        second = partition_records([feedback_message(ranking("fr", "f1", "f2")),
                                    feedback_message(demonstration("fd", "p", "ideal"))])
        store.submit(first)
        store.submit(second)
        with pytest.raises(RuntimeError):  # at most MAX_IN_FLIGHT
            store.submit([PartitionRecords(topics.RESPONSES, 0, [10**9], [b""])])
        assert _when_ready(store) and store.result().stored == {"response": 50}
        assert _when_ready(store), "the second result, already written, was not seen"
        out = store.result()
        assert out.stored == {"ranking": 1, "demonstration": 1} and out.comparisons == 1 and store.in_flight == 0
    finally:
        store.close()


def test_a_batch_after_one_that_failed_is_not_stored(dataset):
    """A batch that fails in the store process is not stored; nor is one sent after it (storing it would move
    the offsets past the failed batch's records, which would then never be stored)."""
    from rlhf.trainer.dataset import ParsedPartition

    store = StoreProcess(dataset)
    try:
        _started(store)
        broken = [ParsedPartition(topics.RESPONSES, 0, [0], [b"x"], [12345])]  # no parsed item: storing it raises
        store.submit(broken)
        store.submit(partition_records([response_message(served("after", "q", "x"))]))
        with pytest.raises(StoreFailed, match="TypeError"):
            store.result()
        with pytest.raises(StoreFailed, match="a batch before it failed"):
            store.result()
    finally:
        store.close()
    assert dataset.sizes()["responses"] == 0 and dataset.stored_offsets() == {}


def test_a_store_process_that_died_fails_its_batch_and_stores_nothing(dataset):
    store = StoreProcess(dataset)
    store._proc.kill()
    store._proc.wait(30)
    with pytest.raises(StoreFailed):
        store.store([response_message(served("k1", "q", "x"))])
    store.close()
    assert dataset.sizes()["responses"] == 0 and dataset.stored_offsets() == {}


def _produce(bus, responses=(), events=()):
    for r in responses:
        bus.send(topics.RESPONSES, r.SerializeToString(), r.response_id.encode()).result(5)
    for e in events:
        bus.send(topics.FEEDBACK, feedback_record(e).SerializeToString(), e.event_id.encode()).result(5)


def _wait(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("store_process", [False, True], ids=["thread", "process"])
def test_the_pipelined_consumer_stores_every_record_once_and_commits_after_storing(tmp_path, store_process):
    bus = InMemoryBus()
    bus.ensure_topics(topics.platform_topics(partitions=2))
    ds = Dataset(str(tmp_path / "dataset.sqlite"))
    stored = []
    consumer = FeedbackConsumer(bus, ds, group="g", max_records=7, poll_timeout_s=0.05, housekeeping_s=0.1,
                                store_process=store_process, on_stored=stored.append)
    rankings = [ranking(f"k{i}", f"r{2 * i}", f"r{2 * i + 1}") for i in range(20)]
    demos = [demonstration(f"d{i}", f"p{i}", f"ideal {i}") for i in range(30)]
    _produce(bus, events=rankings[:10])  # these wait for their responses
    consumer.start()
    try:
        _produce(bus, [served(f"r{i}", f"q{i // 2}", f"answer {i}") for i in range(40)], rankings[10:] + demos)
        _wait(lambda: ds.sizes().get("feedback_used") == 50, "every event used")
        _wait(lambda: sum(consumer.consumed.values()) == 90, "every record counted")
        assert not consumer.last_error
        # stop: the batch in flight is finished and committed, the store process ends
        consumer.stop()
        assert consumer._store is None
        assert ds.count_comparisons() == 20 and len(ds.demonstrations()) == 30
        assert sum(o.comparisons for o in stored) == 20 and len(stored) >= 90 // 7
        assert bus._groups["g"].committed == ds.stored_offsets()  # advisory, and never ahead of the dataset
        # a restart reads nothing again: the dataset's offsets win, and every record is stored once
        again = FeedbackConsumer(bus, ds, group="g2", poll_timeout_s=0.05, store_process=store_process)
        again.start()
        _produce(bus, events=[demonstration("late", "p", "after the restart")])
        _wait(lambda: dict(ds.feedback_events()).get("late") == "used", "the new event")
        again.stop()
        assert sum(again.consumed.values()) == 1
        assert len(dict(ds.feedback_events())) == 51 and ds.sizes()["responses"] == 40
    finally:
        consumer.stop()
        ds.close()
        bus.close()


def test_the_page_cache_and_checkpoint_interval_reach_every_connection_and_the_store_process(tmp_path):
    ds = Dataset(str(tmp_path / "tuned.sqlite"), cache_mb=8, checkpoint_pages=123)
    try:
        db = ds._db()
        assert db.execute("PRAGMA cache_size").fetchone() == (-8 * 1024,)
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone() == (123,)
        store = StoreProcess(ds)
        try:
            _started(store)  # (it parsed its arguments and opened the file)
            assert store._proc.args[-2:] == ["8", "123"] and store.alive
        finally:
            store.close()
    finally:
        ds.close()


def test_an_event_that_expired_leaves_the_join_index_whole(dataset):
    """expire() dead-letters an event whose responses never came: it leaves the writer's index, including the lists
    of what waits for those responses (which may never come), and a response arriving later converts nothing."""
    dataset.store([feedback_message(ranking("gone", "never1", "never2")), feedback_message(ranking("kept", "k1", "k2"))],
                  now=100.0)
    dataset.store([feedback_message(ranking("late", "k1", "never3"))], now=150.0)
    assert sorted(dataset._join.waiting) == ["k1", "k2", "never1", "never2", "never3"]
    out = dataset.expire(now=100.0 + 61)  # join_timeout_s 60: "gone" and "kept" expire, "late" waits on
    assert out.dead == {"join_timeout": 2}
    assert "never1, never2 not seen" in dataset.dead_reason("gone")
    assert sorted(dataset._join.waiting) == ["k1", "never3"] and sorted(dataset._join.pending) == ["late"]
    assert dataset.store([response_message(served("k1", "q", "a")), response_message(served("k2", "q", "b"))]
                         ).comparisons == 0
    assert dict(dataset.feedback_events()) == {"gone": "dead", "kept": "dead", "late": "pending"}


def test_a_backlog_is_read_responses_first_so_that_no_feedback_waits(tmp_path):
    """A backlog whose rankings were written before their responses (a trainer down meanwhile): while the responses
    lag by more than ``responses_ahead`` records the feedback partitions are paused, so every ranking finds its
    responses stored; without it (0) rankings wait as pending rows for responses read later."""
    for ahead, waits in ((5, False), (0, True)):
        bus = InMemoryBus()
        bus.ensure_topics(topics.platform_topics(partitions=2))
        ds = Dataset(str(tmp_path / f"dataset-{ahead}.sqlite"))
        pending: list[int] = []
        consumer = FeedbackConsumer(bus, ds, group="g", max_records=10, poll_timeout_s=0.05, housekeeping_s=60,
                                    store_process=False, responses_ahead=ahead,
                                    on_stored=lambda outcome: pending.append(ds.sizes().get("feedback_pending", 0)))
        _produce(bus, events=[ranking(f"k{i}", f"r{2 * i}", f"r{2 * i + 1}") for i in range(40)])
        _produce(bus, [served(f"r{i}", f"q{i // 2}", f"answer {i}") for i in range(80)])
        consumer.start()
        try:
            _wait(lambda: ds.count_comparisons() == 40, "every ranking converted")
            assert not consumer.last_error
            assert (max(pending) > 0) is waits, pending
        finally:
            consumer.stop()
            ds.close()
            bus.close()


def test_feedback_waits_for_the_responses_at_most_responses_ahead_s_at_a_time(tmp_path):
    """A responses topic that never catches up does not starve the feedback: paused at most responses_ahead_s at a
    time, then read as long before it may be paused again."""
    bus = InMemoryBus()
    bus.ensure_topics(topics.platform_topics(partitions=1))
    ds = Dataset(str(tmp_path / "dataset.sqlite"))
    consumer = FeedbackConsumer(bus, ds, group="g", max_records=5, poll_timeout_s=0.05, housekeeping_s=60,
                                store_process=False, responses_ahead=10, responses_ahead_s=0.3)
    _produce(bus, [served(f"r{i}", "q", f"answer {i}") for i in range(40)])
    # The responses lag stays far above 10 records: the consumer is slowed to a batch per 50 ms here.
    original = consumer._step
    consumer._step = lambda c: (time.sleep(0.05), original(c))[1]
    _produce(bus, [served(f"s{i}", "q", f"more {i}") for i in range(5000)], [demonstration("d1", "p", "ideal")])
    started = time.monotonic()
    consumer.start()
    try:
        _wait(lambda: dict(ds.feedback_events()).get("d1") == "used", "the feedback read despite the lag")
        waited = time.monotonic() - started
        assert 0.25 <= waited < 3.0, waited
        assert ds.sizes()["responses"] < 5040  # (read before the responses caught up)
    finally:
        consumer.stop()
        ds.close()
        bus.close()
