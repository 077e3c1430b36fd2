"""The trainer's dataset: conversion rules, the durable join, deduplication, offsets in the same transaction,
the held-out split fixed by event ids, the dead-letter outbox."""
from __future__ import annotations

import pytest

from rlhf.bus import topics
from rlhf.trainer import convert
from rlhf.trainer import dataset as dataset_module
from rlhf.trainer.dataset import Dataset
from rlhf.v1 import events_pb2, feedback_pb2
from support.trainer_records import (
    demonstration, edit, feedback_message, message, pairwise, ranking, response_message, served, stars, thumb,
)


@pytest.fixture
def dataset(tmp_path):
    ds = Dataset(str(tmp_path / "dataset.sqlite"), heldout_share=0.2, join_timeout_s=60)
    yield ds
    ds.close()


def responses(*specs):
    return [response_message(served(rid, prompt, text)) for rid, prompt, text in specs]


def test_each_kind_becomes_what_the_rules_say(dataset):
    dataset.store(responses(("r1", "cook rice", "rinse it"), ("r2", "cook rice", "burn it"),
                            ("r3", "cook rice", "boil it"), ("r4", "plan a picnic", "bring food")))
    out = dataset.store([
        feedback_message(ranking("e-rank", "r3", "r1", "r2")),
        feedback_message(pairwise("e-pair", "r1", "r2", feedback_pb2.PREFERENCE_STRENGTH_STRONG)),
        feedback_message(demonstration("e-demo", "fix a tap", "replace the washer")),
        feedback_message(edit("e-edit", "r4", "bring food and water")),
        feedback_message(edit("e-same", "r4", "bring food")),  # no change: a demonstration, no pair
    ])
    assert out.stored == {"ranking": 1, "pairwise": 1, "demonstration": 1, "edit": 2}
    got = {c.comparison.sources: c.comparison for c in dataset.comparisons()}
    assert got[("e-rank",)].responses == ("boil it", "rinse it", "burn it")
    assert got[("e-pair",)].responses == ("rinse it", "burn it") and got[("e-pair",)].margin == 1.0
    assert got[("e-edit",)].responses == ("bring food and water", "bring food")
    assert got[("e-edit",)].prompt.text == "plan a picnic"  # the product's prompt, not the formatted one
    assert ("e-same",) not in got
    demos = {(d.source, d.prompt.text, d.response) for d in dataset.demonstrations()}
    assert demos == {("e-demo", "fix a tap", "replace the washer"), ("e-edit", "plan a picnic", "bring food and water"),
                     ("e-same", "plan a picnic", "bring food")}


def test_ratings_of_one_prompt_become_pairs_and_ties_are_dropped(dataset):
    dataset.store(responses(("r1", "q", "good"), ("r2", "q", "bad"), ("r3", "q", "fine"), ("r9", "other", "x")))
    dataset.store([feedback_message(thumb("t1", "r1", True)), feedback_message(thumb("t2", "r2", False)),
                   feedback_message(thumb("t3", "r3", True)),  # ties with t1: no pair between r1 and r3
                   feedback_message(thumb("t9", "r9", False)),  # another prompt: never paired with these
                   feedback_message(stars("s1", "r3", 3))])  # 0.5: between up and down
    pairs = sorted((c.comparison.responses, c.comparison.sources) for c in dataset.comparisons())
    # t3 ties with t1 (both up); s1 (3 of 1..5 = 0.5) rates r3 again, which is never paired with itself
    assert pairs == sorted([(("good", "bad"), ("t1", "t2")), (("fine", "bad"), ("t2", "t3")),
                            (("good", "fine"), ("s1", "t1")), (("fine", "bad"), ("s1", "t2"))])


def test_feedback_waits_for_its_responses_then_joins_or_dead_letters(dataset):
    dataset.store([feedback_message(ranking("early", "a1", "a2")), feedback_message(ranking("late", "b1", "b2"))])
    assert dataset.sizes().get("feedback_pending") == 2 and dataset.count_comparisons() == 0
    dataset.store(responses(("a1", "q", "x"), ("a2", "q", "y"), ("b1", "q", "z")))  # b2 never comes
    assert [c.comparison.sources for c in dataset.comparisons()] == [("early",)]
    import time

    out = dataset.expire(now=time.time() + 61)
    assert out.dead == {"join_timeout": 1}
    [letter] = dataset.dead_letters()
    parsed = events_pb2.DeadLetter.FromString(letter.payload)
    assert parsed.event_id == "late" and "b2" in parsed.reason and parsed.source_topic == topics.FEEDBACK
    assert events_pb2.FeedbackRecord.FromString(parsed.payload).event.event_id == "late"
    dataset.dead_letters_sent([letter.id])
    assert dataset.dead_letters() == []
    assert dataset.dead_reason("late").startswith("responses b2 not seen")


def test_unusable_events_are_dead_lettered_and_not_trained_on(dataset):
    dataset.store(responses(("r1", "cook rice", "x"), ("r2", "plan a picnic", "y")))
    out = dataset.store([feedback_message(pairwise("cross", "r1", "r2")),
                         message(topics.FEEDBACK, b"\xff\xff not a record")])
    assert out.dead == {"different_prompts": 1, "unparsable": 1}
    assert dataset.count_comparisons() == 0
    reasons = sorted(events_pb2.DeadLetter.FromString(d.payload).reason for d in dataset.dead_letters())
    assert "different prompts" in reasons[1] and "cannot parse" in reasons[0]


def test_records_without_a_value_are_dead_lettered_with_their_offsets_stored(dataset):
    """A tombstone (a record whose value is null, as a compacting producer writes) on either topic is dead-lettered,
    and its offset stored: it neither fails the batch (which would then be read again forever) nor is lost."""
    out = dataset.store([message(topics.RESPONSES, None), message(topics.FEEDBACK, None),
                         response_message(served("r-ok", "q", "x"))])
    assert out.dead == {"unparsable": 2} and out.stored == {"response": 1}
    letters = [events_pb2.DeadLetter.FromString(d.payload) for d in dataset.dead_letters()]
    assert sorted(letter.source_topic for letter in letters) == sorted([topics.RESPONSES, topics.FEEDBACK])
    assert all("no value" in letter.reason and letter.payload == b"" for letter in letters)
    assert set(dataset.stored_offsets()) == {(topics.RESPONSES, 0), (topics.FEEDBACK, 0)}


def test_redelivered_and_duplicate_records_are_stored_once(dataset, tmp_path):
    batch = responses(("r1", "q", "x"), ("r2", "q", "y")) + [feedback_message(ranking("e1", "r1", "r2"))]
    first = dataset.store(batch)
    again = dataset.store(batch)  # the same offsets: skipped, not stored
    assert sum(first.stored.values()) == 3 and sum(again.stored.values()) == 0
    assert again.duplicates["redelivered"] == 3
    repeat = feedback_message(ranking("e1", "r1", "r2"))  # the same event_id at a new offset
    copy = dataset.store([repeat])
    assert copy.duplicates == {"ranking": 1}
    assert dataset.count_comparisons() == 1
    # the offsets are stored with the data and read back by a new instance (a restart)
    reopened = Dataset(dataset.path)
    assert reopened.stored_offsets() == dataset.stored_offsets()
    assert reopened.stored_offsets()[(topics.FEEDBACK, 0)] == repeat.offset + 1
    reopened.close()


def test_the_heldout_split_is_fixed_by_the_source_events():
    flags = [convert.heldout((f"event-{i}",), 0.2) for i in range(2000)]
    assert 0.17 < sum(flags) / len(flags) < 0.23
    assert convert.heldout(("a", "b"), 0.5) == convert.heldout(("b", "a"), 0.5)
    assert all(convert.heldout((f"event-{i}",), 0.2) == f for i, f in enumerate(flags))


def test_an_event_waiting_for_its_last_response_joins_the_ones_stored_before(dataset):
    """A ranking whose first response was stored in an earlier transaction and whose second arrives later (other
    partitions move at other speeds) is converted with both; this once raised and stalled the stream."""
    dataset.store(responses(("old", "q", "stored before")))
    dataset.store([feedback_message(ranking("late-join", "old", "new"))])
    assert dataset.sizes()["feedback_pending"] == 1
    dataset.store(responses(("new", "q", "arrived last")))
    [c] = dataset.comparisons()
    assert c.comparison.responses == ("stored before", "arrived last") and c.comparison.sources == ("late-join",)
    assert dict(dataset.feedback_events()) == {"late-join": "used"}


def test_batches_larger_than_a_statement_keep_their_order_and_store_a_resent_record_once(dataset):
    """Rows go in ``_ROWS_PER_INSERT`` to a statement: a batch of several full statements and a remainder keeps
    the stream's order (AUTOINCREMENT ids), and a response sent twice (another offset, inside a full statement)
    fails the plain INSERT attempt and is stored once by the retry with lookups."""
    n = 2 * dataset_module._ROWS_PER_INSERT + 7
    demos = [feedback_message(demonstration(f"d{i}", f"prompt {i}", f"answer {i}")) for i in range(n)]
    out = dataset.store(demos)
    assert out.stored == {"demonstration": n} and out.demonstrations == n
    assert [d.source for d in dataset.demonstrations()] == [f"d{i}" for i in range(n)]

    specs = [(f"r{i}", f"q{i // 2}", f"text {i}") for i in range(2 * n)]
    dataset.store(responses(*specs[:n]))
    batch = responses(*specs[n:])
    batch.insert(5, responses(specs[3])[0])  # r3, stored before, sent again at a new offset: in a full statement
    out = dataset.store(batch + [feedback_message(ranking(f"k{i}", f"r{2 * i}", f"r{2 * i + 1}")) for i in range(n)])
    assert out.stored["response"] == n and out.duplicates["response"] == 1 and out.stored["ranking"] == n
    assert dataset.sizes()["responses"] == 2 * n
    assert [c.comparison.sources for c in dataset.comparisons()] == [(f"k{i}",) for i in range(n)]


def test_versions_are_found_and_listed_past_any_page(dataset):
    for i in range(1234):  # many with the same creation time: pages break ties by insertion order
        dataset.put_version(f"v{i:04d}", "policy" if i % 3 else "reward", "saved", {"n": i})
    listed = [v["version"] for v in dataset.versions(limit=100_000)]
    assert [v["version"] for v in dataset.iter_versions(page=100)] == listed
    assert listed[0] == "v1233" and listed[-1] == "v0000"
    assert [v["n"] for v in dataset.iter_versions(kind="reward", page=7)] == list(range(1233, -1, -3))
    assert dataset.version("v0000")["n"] == 0 and dataset.version("v0000", kind="reward")["kind"] == "reward"
    assert dataset.version("v0000", kind="policy") is None and dataset.version("nope") is None


def test_a_dataset_of_the_first_schema_is_migrated_once_and_keeps_everything(tmp_path):
    """Schema 1 kept a ``waiting`` table (which responses pending feedback waits for) and copied every
    demonstration event into ``demonstrations``; schema 2 keeps the join index in memory (rebuilt from the pending
    rows) and reads demonstration events from their feedback rows. A schema-1 file opened now: its demonstrations
    are each there once, its pending event joins its response when that arrives."""
    import sqlite3

    path = str(tmp_path / "old.sqlite")
    pending = events_pb2.FeedbackRecord(event=ranking("old-rank", "old-a", "old-b")).SerializeToString()
    demo = events_pb2.FeedbackRecord(event=demonstration("old-demo", "fix a tap", "close the valve")).SerializeToString()
    with sqlite3.connect(path) as db:
        db.executescript(dataset_module.SCHEMA)
        db.execute("CREATE TABLE waiting(response_id TEXT, event_id TEXT, PRIMARY KEY(response_id, event_id))")
        db.executemany("INSERT INTO feedback VALUES(?,?,?,?,?,?,?,?,?)", [
            ("old-rank", "ranking", "pending", pending, 1.0, topics.FEEDBACK, 0, 0, ""),
            ("old-demo", "demonstration", "used", demo, 1.0, topics.FEEDBACK, 0, 1, "")])
        db.execute("INSERT INTO waiting VALUES('old-b', 'old-rank')")
        db.execute("INSERT INTO demonstrations(prompt, messages, response, source) "
                   "VALUES('fix a tap', '[]', 'close the valve', 'old-demo')")
        db.execute("INSERT INTO responses VALUES('old-a', 'q', '[]', ?, 'first', 'p1', 1.0)",
                   (convert.prompt_key("q"),))
        db.execute("INSERT INTO offsets VALUES(?, 0, 2)", (topics.FEEDBACK,))
    ds = Dataset(path)
    try:
        with sqlite3.connect(path) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "waiting" not in tables and ds.get_state("schema_version") == str(Dataset.SCHEMA_VERSION)
        assert [(d.source, d.response) for d in ds.demonstrations()] == [("old-demo", "close the valve")]
        assert ds.sizes()["demonstrations"] == 1
        out = ds.store(responses(("old-b", "q", "second")))
        assert out.comparisons == 1 and dict(ds.feedback_events())["old-rank"] == "used"
        assert [c.comparison.responses for c in ds.comparisons()] == [("first", "second")]
    finally:
        ds.close()
    again = Dataset(path)  # migrated once: opening it again changes nothing
    assert len(again.demonstrations()) == 1 and again.count_comparisons() == 1
    again.close()


def test_records_parsed_beforehand_are_stored_as_if_parsed_by_the_store(tmp_path):
    """parse_partitions (run on the consumer's thread) then store_partitions stores what store_partitions alone
    stores from the same records; parsed partitions are not parsed again."""
    from rlhf.bus.base import partition_records

    batch = partition_records(
        responses(("r1", "cook rice", "rinse it"), ("r2", "cook rice", "burn it"), ("r3", "plan", "go"))
        + [feedback_message(ranking("k1", "r1", "r2")), feedback_message(pairwise("p1", "r2", "r1")),
           feedback_message(thumb("t1", "r1", True)), feedback_message(thumb("t2", "r2", False)),
           feedback_message(edit("ed", "r3", "go now")), feedback_message(demonstration("d1", "q", "a")),
           feedback_message(ranking("wait", "r1", "r-later")), message(topics.FEEDBACK, b"\xff junk")])
    parsed = dataset_module.parse_partitions(batch)
    assert dataset_module.parse_partitions(parsed) == parsed and all(len(p.items) == len(p.offsets) for p in parsed)
    stores = [Dataset(str(tmp_path / f"{name}.sqlite")) for name in ("raw", "parsed")]
    outcomes = [stores[0].store_partitions(batch, now=5.0), stores[1].store_partitions(parsed, now=5.0)]
    assert outcomes[0] == outcomes[1]
    assert stores[0].sizes() == stores[1].sizes() and stores[0].sizes()["feedback_pending"] == 1
    assert [c.comparison for c in stores[0].comparisons()] == [c.comparison for c in stores[1].comparisons()]
    assert stores[0].demonstrations() == stores[1].demonstrations()
    for ds in stores:
        ds.close()
