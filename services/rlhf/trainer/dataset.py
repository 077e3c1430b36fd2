"""The trainer's dataset: every feedback event and served response consumed, what they became, and the offsets they
came from, in one SQLite file on the trainer's volume.

Why SQLite (WAL mode): one trainer owns its dataset, so an embedded database with real transactions is the simplest
store that makes "a record and its offset" one atomic write; it needs no server, survives SIGKILL (WAL with
``synchronous=NORMAL`` loses at most the last transactions on a power loss, never on a process crash, and Kafka still
holds those records: the offsets go back with them), and readers (status, the reward-model trainer) do not block the
writer. Kafka stays the replayable source: delete the file and the trainer rebuilds it from the topics.

One :meth:`Dataset.store` call is one transaction:

1. skip records at offsets below the stored ones (redelivered after a crash or a rebalance);
2. responses (rlhf.responses.v1): stored once per ``response_id``; feedback waiting for them is converted now;
3. feedback (rlhf.feedback.v1): stored once per ``event_id``; converted when every response it names is stored
   (the durable join, not Redis records that expire), else it waits (``pending``) until its responses arrive or
   ``join_timeout_s`` passes; an event that cannot be used is ``dead`` and its dead letter goes to the outbox;
4. the next offset of every partition in the batch.

The outbox is published to rlhf.feedback.v1.dlq after the transaction (at least once, keyed by event id: a dead letter
published twice after a crash is the same event twice, which DLQ readers deduplicate by ``event_id``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import pickle
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from google.protobuf.message import DecodeError
from json.encoder import encode_basestring_ascii as _encode_str

from rlhf.bus import topics
from rlhf.bus.base import Message, PartitionRecords, TopicPartition, partition_records
from rlhf.trainer import convert
from rlhf.trainer.convert import Comparison, Demonstration, Prompt, RatingValue, StoredResponse, Unusable
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets(topic TEXT, partition INTEGER, next_offset INTEGER, PRIMARY KEY(topic, partition));
CREATE TABLE IF NOT EXISTS responses(response_id TEXT PRIMARY KEY, prompt TEXT, messages TEXT, prompt_key TEXT,
    text TEXT, policy_version TEXT, stored_at REAL);
CREATE INDEX IF NOT EXISTS responses_version ON responses(policy_version, stored_at);
CREATE TABLE IF NOT EXISTS feedback(event_id TEXT PRIMARY KEY, kind TEXT, state TEXT, payload BLOB, stored_at REAL,
    topic TEXT, partition INTEGER, "offset" INTEGER, reason TEXT);
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback(stored_at) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS ratings(event_id TEXT PRIMARY KEY, response_id TEXT, prompt_key TEXT, value REAL, text TEXT);
CREATE INDEX IF NOT EXISTS ratings_prompt ON ratings(prompt_key);
CREATE TABLE IF NOT EXISTS comparisons(id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT, messages TEXT,
    responses TEXT, margin REAL, sources TEXT, heldout INTEGER);
CREATE TABLE IF NOT EXISTS demonstrations(id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT, messages TEXT,
    response TEXT, source TEXT);
CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT, payload BLOB);
CREATE TABLE IF NOT EXISTS versions(version TEXT PRIMARY KEY, kind TEXT, status TEXT, created_at REAL, record TEXT);
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT);
"""

PENDING, USED, DEAD = "pending", "used", "dead"


@dataclasses.dataclass
class StoreOutcome:
    """What one :meth:`Dataset.store` did, for metrics."""

    consumed: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by topic
    stored: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by kind
    duplicates: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by kind
    dead: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by reason class
    comparisons: int = 0
    demonstrations: int = 0
    offsets: dict = dataclasses.field(default_factory=dict)  # the next offsets stored, by partition


@dataclasses.dataclass(frozen=True)
class StoredComparison:
    id: int
    comparison: Comparison
    heldout: bool


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    id: int
    event_id: str
    payload: bytes  # a serialized rlhf.v1.DeadLetter


def reason_class(reason: str) -> str:
    """A low-cardinality label for a dead-letter reason (the metric's ``reason``)."""
    for needle, label in (("not seen on", "join_timeout"), ("different prompts", "different_prompts"),
                          ("cannot parse", "unparsable"), ("no kind", "no_kind"), ("same text", "same_text")):
        if needle in reason:
            return label
    return "unusable"


_CHUNK = 500  # host parameters per IN (...) query (SQLite allows 32766 since 3.32; small chunks stay fast)


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield list(items[i:i + _CHUNK])


def _existing(db: sqlite3.Connection, table: str, column: str, ids: Sequence[str]) -> list[str]:
    found: list[str] = []
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        found += [v for (v,) in db.execute(f"SELECT {column} FROM {table} WHERE {column} IN ({marks})", chunk)]
    return found


def _json_strs(strings: Sequence[str]) -> str:
    """``json.dumps`` of a list of str (the same text), without the encoder's per-call set-up."""
    return "[" + ", ".join(map(_encode_str, strings)) + "]"


def _messages_json(prompt: Prompt) -> str:
    return json.dumps(prompt.messages) if prompt.messages else "[]"


def _letter(event_id: str, payload: bytes, topic: str, partition: int, offset: int, reason: str) -> bytes:
    letter = events_pb2.DeadLetter(event_id=event_id, source_topic=topic, source_partition=partition,
                                   source_offset=offset, payload=payload, reason=reason)
    letter.at.GetCurrentTime()
    return letter.SerializeToString()


class ParsedPartition(NamedTuple):
    """A partition's records as the store takes them (:func:`parse_partitions`): the records, and what the store
    needs of each, read from its bytes."""

    topic: str
    partition: int
    offsets: list[int]
    values: list[bytes]
    items: list
    """One a record. rlhf.responses.v1: ``(response_id, its StoredResponse's fields)``; rlhf.feedback.v1:
    ``(event_id, kind, the response ids it needs, "")``, or ``(event_id, kind, (), why it cannot be used)``; another
    topic: None. A record that is not even that: its dead-letter reason (a str). Plain tuples: they cross the store
    process's pipe (a NamedTuple pickles at four times a tuple's cost)."""


def parse_partitions(batch: Sequence[PartitionRecords | ParsedPartition]) -> list[ParsedPartition]:
    """What the store needs of each record, read from its bytes (those already parsed are kept). Stateless (no
    dataset, no other record), so it runs where CPU is to spare: the consumer's thread parses a batch while the
    store process stores the ones before (:meth:`StoreProcess.submit`), and the process, the pipeline's slowest
    stage, parses nothing but the few kinds it converts from the whole event (ratings, pairs, edits)."""
    out: list[ParsedPartition] = []
    for part in batch:
        if isinstance(part, ParsedPartition):
            out.append(part)
            continue
        topic, partition, offsets, values = part
        if topic == topics.RESPONSES:
            items = _response_items(values)
        elif topic == topics.FEEDBACK:
            items = _feedback_items(values)
        else:
            items = [None] * len(values)
        out.append(ParsedPartition(topic, partition, offsets, values, items))
    return out


def _unreadable(value: bytes | None, message: str) -> str:
    if value is None:
        return f"cannot parse the record as {message}: it has no value (a tombstone)"
    return f"cannot parse the record as {message}"


def _response_items(values: Sequence[bytes]) -> list:
    parse, fields = events_pb2.ServedResponse.FromString, convert.stored_response_fields
    items: list = []
    append = items.append
    for value in values:
        try:
            served = parse(value)
        except (DecodeError, TypeError):  # (TypeError: a record without a value, None)
            append(_unreadable(value, "rlhf.v1.ServedResponse"))
            continue
        response_id = served.response_id
        if response_id:
            append((response_id, fields(served)))
        else:
            append("the served response has no response_id")
    return items


def _feedback_items(values: Sequence[bytes]) -> list:
    parse, needed_responses = events_pb2.FeedbackRecord.FromString, convert.needed_responses
    items: list = []
    append = items.append
    for value in values:
        try:
            event = parse(value).event
        except (DecodeError, TypeError):
            append(_unreadable(value, "rlhf.v1.FeedbackRecord"))
            continue
        event_id = event.event_id
        if not event_id:
            append("the feedback event has no event_id")
            continue
        kind = event.WhichOneof("kind") or "none"
        if kind == "demonstration":  # (needs no response: most of a stream)
            append((event_id, kind, (), ""))
            continue
        try:
            append((event_id, kind, needed_responses(event, kind), ""))
        except Unusable as e:
            append((event_id, kind, (), e.reason))
    return items


class _Rows:
    """The rows of one transaction, by table, as plain tuples (no dataclass per record: building rows is most of a
    record's cost), written at its end with a few multi-row statements per table (:func:`_insert_rows`).

    ``assumed_new``: the batch's responses and feedback events are taken to be new without looking them up (the
    usual case: records below the stored offsets were skipped already) and written with plain ``INSERT``
    statements, so that one stored before (the same id at another offset, e.g. sent twice by a producer) fails the
    batch with an :class:`sqlite3.IntegrityError` instead of being stored twice; :meth:`Dataset.store` then stores
    it again, looking up what is stored (``assumed_new=False``). The lookups were ~7% of storing a batch."""

    def __init__(self, now: float, assumed_new: bool = False) -> None:
        self.now = now
        self.assumed_new = assumed_new
        self.responses: dict[str, StoredResponse] = {}  # stored in this batch
        self.known: dict[str, StoredResponse] = {}  # stored before, looked up for this batch
        self.feedback: list[tuple] = []  # new feedback rows
        self.updates: list[tuple[str, str, str]] = []  # (state, reason, event_id) of feedback that waited
        self.ratings: list[RatingValue] = []
        self.comparisons: list[tuple] = []
        self.demonstrations: list[tuple] = []  # derived from edits
        self.plain_demonstrations = 0  # demonstration events: their feedback rows are the data (see demonstrations())
        self.outbox: list[tuple[str, bytes]] = []

    def response(self, response_id: str) -> StoredResponse | None:
        found = self.responses.get(response_id)
        return found if found is not None else self.known.get(response_id)

    def outbox_letter(self, event_id: str, payload: bytes, topic: str, partition: int, offset: int, reason: str,
                      out: StoreOutcome) -> None:
        self.outbox.append((event_id or f"{topic}:{partition}:{offset}",
                            _letter(event_id, payload, topic, partition, offset, reason)))
        out.dead[reason_class(reason)] += 1

    def dead_letter(self, value: bytes, topic: str, partition: int, offset: int, reason: str,
                    out: StoreOutcome) -> None:
        """A record that is not even a readable event: only its dead letter is kept."""
        self.outbox_letter("", value, topic, partition, offset, reason, out)

    def write(self, db: sqlite3.Connection) -> None:
        insert = "INSERT" if self.assumed_new else "INSERT OR IGNORE"
        if self.responses:
            now = self.now
            _insert_rows(db, f"{insert} INTO responses VALUES", 7, [
                (rid, r.prompt, r.messages_json, r.prompt_key, r.text, r.policy_version, now)
                for rid, r in self.responses.items()])
        if self.feedback:
            _insert_rows(db, f"{insert} INTO feedback VALUES", 9, self.feedback)
        if self.updates:
            db.executemany("UPDATE feedback SET state=?, reason=? WHERE event_id=?", self.updates)
        if self.ratings:
            db.executemany("INSERT OR IGNORE INTO ratings VALUES(?,?,?,?,?)",
                           [(r.event_id, r.response_id, r.prompt_key, r.value, r.text) for r in self.ratings])
        if self.comparisons:
            _insert_rows(db, "INSERT INTO comparisons(prompt, messages, responses, margin, sources, heldout) VALUES",
                         6, self.comparisons)
        if self.demonstrations:
            _insert_rows(db, "INSERT INTO demonstrations(prompt, messages, response, source) VALUES", 4,
                         self.demonstrations)
        if self.outbox:
            db.executemany("INSERT INTO outbox(event_id, payload) VALUES(?,?)", self.outbox)


class _Pending(NamedTuple):
    """A feedback event stored as pending: what it needs, and its record (converted or dead-lettered from it)."""

    kind: str
    needed: tuple[str, ...] | None  # (None: its payload is unreadable, left to expire())
    payload: bytes  # the rlhf.v1.FeedbackRecord
    topic: str
    partition: int
    offset: int


class _JoinIndex:
    """The pending feedback of the dataset, by the responses it still waits for: the writer's in-memory copy of
    what the ``pending`` rows say, so that joining a batch's responses to the feedback that waited for them needs
    no query and no index rows (an index table written and deleted per waiting event was most of a batch's cost
    when its rankings had arrived before their responses, as on any backlog read from several partitions).

    Valid while ``version`` equals the dataset's ``join_version`` (the ``state`` table): every transaction that
    changes what waits for what (feedback made pending, a response it waited for stored, its wait ended) moves that
    on (``changed``), so another writer of the file (the store process, the
    consumer's inline store, ``expire``) makes this copy stale, and it is rebuilt from the pending rows at the
    next transaction (:meth:`Dataset._join_index`). It is changed during a transaction and dropped if that fails."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.pending: dict[str, _Pending] = {}
        self.missing: dict[str, set[str]] = {}  # event_id -> the response ids it still waits for
        self.waiting: dict[str, list[str]] = {}  # response_id -> the events that wait for it
        self.ready: list[str] = []  # pending with nothing missing (found so when rebuilt): converted next
        self.changed = False  # by this transaction (reset at its start)

    def add(self, event_id: str, pending: _Pending, missing: Iterable[str]) -> None:
        missing = set(missing)
        self.changed = True
        self.pending[event_id] = pending
        if not missing:
            self.ready.append(event_id)
            return
        self.missing[event_id] = missing
        for r in missing:
            self.waiting.setdefault(r, []).append(event_id)

    def arrived(self, response_ids: Iterable[str]) -> list[str]:
        """These responses are stored now: the events that waited for nothing else (and those found ready), taken
        out of the index."""
        ready, self.ready = self.ready, []
        waiting, missing = self.waiting, self.missing
        for r in response_ids:
            events = waiting.pop(r, None)
            if events is None:
                continue
            self.changed = True
            for event_id in events:
                left = missing.get(event_id)
                if left is not None:
                    left.discard(r)
                    if not left:
                        del missing[event_id]
                        ready.append(event_id)
        return ready

    def pop(self, event_id: str) -> _Pending | None:
        """Take an event out of the index (converted, or dead: then the responses it still waited for may never
        come, and it leaves their ``waiting`` lists too)."""
        for r in self.missing.pop(event_id, ()):
            events = self.waiting.get(r)
            if events is not None:
                events.remove(event_id)
                if not events:
                    del self.waiting[r]
        self.changed = True
        return self.pending.pop(event_id, None)


_VERSION_COLUMNS = "version, kind, status, created_at, record"

_ROWS_PER_INSERT = 64  # rows per multi-row INSERT (a statement per chunk size, cached by the connection)


def _insert_rows(db: sqlite3.Connection, head: str, width: int, rows: Sequence[tuple]) -> None:
    """``head`` (``INSERT ... VALUES``) for every row, ``_ROWS_PER_INSERT`` rows a statement: one statement step,
    parameter list and GIL release per chunk instead of per row (``executemany`` of one row's statement costs about
    a fifth more per row). Rows go in in order, so AUTOINCREMENT ids follow it."""
    one = "(" + ",".join("?" * width) + ")"
    full = len(rows) - len(rows) % _ROWS_PER_INSERT
    if full:
        sql = head + ",".join([one] * _ROWS_PER_INSERT)
        chain = itertools.chain.from_iterable
        db.executemany(sql, [tuple(chain(rows[i:i + _ROWS_PER_INSERT])) for i in range(0, full, _ROWS_PER_INSERT)])
    if full < len(rows):
        db.executemany(head + one, rows[full:])


class Dataset:
    """The SQLite dataset; one writer thread (the consumer), any number of reader threads."""

    RECENT_RESPONSES = 20_000

    def __init__(self, path: str, *, heldout_share: float = 0.1, join_timeout_s: float = 300.0,
                 cache_mb: int = 64, checkpoint_pages: int = 10_000) -> None:
        self.path = path
        self.cache_mb = cache_mb
        """SQLite's page cache of each connection, in MiB (PRAGMA cache_size; pages are allocated as used, so a
        reader's connection does not take it all)."""
        self.checkpoint_pages = checkpoint_pages
        """PRAGMA wal_autocheckpoint of each connection (TrainerConfig.dataset_checkpoint_pages)."""
        self.heldout_share = heldout_share
        self.join_timeout_s = join_timeout_s
        self._local = threading.local()
        self._offsets_lock = threading.Lock()
        self._db().executescript(SCHEMA)  # IF NOT EXISTS: idempotent (executescript commits by itself)
        self._migrate()
        self._offsets: dict[TopicPartition, int] = {
            (t, p): o for t, p, o in self._db().execute("SELECT topic, partition, next_offset FROM offsets")}
        self._recent: dict[str, StoredResponse] = {}
        """Responses committed by this instance's transactions or read in them, newest last (at most
        ``RECENT_RESPONSES``): feedback usually names responses stored a batch or two before it, and a stored
        response never changes, so these need no query. Used by the writer thread only."""
        self._join: _JoinIndex | None = None  # the pending feedback (:class:`_JoinIndex`), loaded when first needed

    SCHEMA_VERSION = 2
    """1: the first; 2: no ``waiting`` table (the join index is in memory, :class:`_JoinIndex`), and demonstration
    events are not copied into ``demonstrations`` (their feedback rows are the data)."""

    def _schema_version(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM state WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 1

    def _migrate(self) -> None:
        """A dataset written by an older trainer brought to :attr:`SCHEMA_VERSION` (once: a read, then nothing)."""
        if self._schema_version(self._db()) >= self.SCHEMA_VERSION:
            return
        with self._tx() as db:
            version = self._schema_version(db)  # (again: another process may have migrated it meanwhile)
            if version >= self.SCHEMA_VERSION:
                return
            if version < 2:
                db.execute("DROP TABLE IF EXISTS waiting")
                db.execute("DELETE FROM demonstrations WHERE source IN "
                           "(SELECT event_id FROM feedback WHERE kind='demonstration')")
            db.execute("INSERT INTO state VALUES('schema_version', ?) ON CONFLICT(key) DO UPDATE SET "
                       "value=excluded.value", (str(self.SCHEMA_VERSION),))

    # ------------------------------------------------------------------------------------------ connections

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute(f"PRAGMA cache_size={-1024 * int(self.cache_mb)}")  # (negative: KiB)
            db.execute(f"PRAGMA wal_autocheckpoint={int(self.checkpoint_pages)}")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> Dataset._Tx:
        return Dataset._Tx(self._db())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ------------------------------------------------------------------------------------------ offsets

    def stored_offsets(self) -> dict[TopicPartition, int]:
        """The next offset to read of every partition stored so far (any thread)."""
        with self._offsets_lock:
            return dict(self._offsets)

    def mark_start(self, positions: dict[TopicPartition, int]) -> None:
        """Record where reading starts for partitions the dataset has never stored (a new dataset's first
        assignment), so that from then on its own offsets decide for every partition it holds."""
        known = self.stored_offsets()
        new = {tp: o for tp, o in positions.items() if tp not in known}
        if not new:
            return
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO offsets VALUES(?,?,?)", [(t, p, o) for (t, p), o in new.items()])
        with self._offsets_lock:
            for tp, o in new.items():
                self._offsets.setdefault(tp, o)

    # ------------------------------------------------------------------------------------------ storing

    def store(self, messages: Sequence[Message], now: float | None = None) -> StoreOutcome:
        """:meth:`store_partitions` of these records (grouped by partition, in their order)."""
        return self.store_partitions(partition_records(messages), now)

    def store_partitions(self, batch: Sequence[PartitionRecords | ParsedPartition],
                         now: float | None = None) -> StoreOutcome:
        """Steps 1-4 of the module docstring, in one transaction, for a poll's records as columns (one
        :class:`~rlhf.bus.base.PartitionRecords` per partition: no object per record), parsed first unless they
        are already (:func:`parse_partitions`). Rows are gathered per table
        and written together at the end (:func:`_insert_rows`), and lookups are one query per batch, not per record.
        The records are first stored as new without looking their ids up (a savepoint); should one have been stored
        before, that attempt is rolled back and the batch stored again with the lookups (see :class:`_Rows`)."""
        now = time.time() if now is None else now
        parsed = parse_partitions(batch)
        try:
            rows, out, new_offsets = self._store(parsed, now)
        except BaseException:
            self._join = None  # changed for a transaction that did not commit: rebuilt from the rows next time
            raise
        self.advance(new_offsets)
        self._remember(rows.known)  # (committed now)
        self._remember(rows.responses)
        out.comparisons, out.demonstrations = len(rows.comparisons), len(rows.demonstrations) + rows.plain_demonstrations
        out.offsets = new_offsets
        return out

    def _store(self, batch: Sequence[ParsedPartition], now: float
               ) -> tuple[_Rows, StoreOutcome, dict[TopicPartition, int]]:
        with self._tx() as db:
            # The offsets as this transaction sees them (not the cache): another writer (a store process of a
            # trainer restarted meanwhile) may have stored more since this instance read them.
            known = {(t, p): o for t, p, o in db.execute("SELECT topic, partition, next_offset FROM offsets")}
            new_offsets: dict[TopicPartition, int] = {}
            responses: list[ParsedPartition] = []
            feedback: list[ParsedPartition] = []
            redelivered = consumed_responses = consumed_feedback = 0
            for part in batch:  # 1.
                tp = (part.topic, part.partition)
                start = known.get(tp, 0)
                if part.offsets and part.offsets[0] < start:  # (some) delivered again: below the stored offset
                    kept = [k for k in zip(part.offsets, part.values, part.items) if k[0] >= start]
                    redelivered += len(part.offsets) - len(kept)
                    part = ParsedPartition(part.topic, part.partition, [k[0] for k in kept], [k[1] for k in kept],
                                           [k[2] for k in kept])
                if not part.offsets:
                    continue
                end = max(part.offsets) + 1
                if end > max(start, new_offsets.get(tp, 0)):
                    new_offsets[tp] = end
                if part.topic == topics.FEEDBACK:
                    feedback.append(part)
                    consumed_feedback += len(part.offsets)
                elif part.topic == topics.RESPONSES:
                    responses.append(part)
                    consumed_responses += len(part.offsets)
            db.execute("SAVEPOINT assumed_new")
            try:
                rows, out = self._store_records(db, responses, feedback, now, assumed_new=True)
            except sqlite3.IntegrityError:  # one was stored before, at another offset: look them up this time
                db.execute("ROLLBACK TO assumed_new")
                self._join = None  # (changed by the attempt rolled back)
                rows, out = self._store_records(db, responses, feedback, now, assumed_new=False)
            db.execute("RELEASE assumed_new")
            if redelivered:
                out.duplicates["redelivered"] += redelivered
            if consumed_responses:
                out.consumed[topics.RESPONSES] += consumed_responses
            if consumed_feedback:
                out.consumed[topics.FEEDBACK] += consumed_feedback
            db.executemany(  # 4.
                "INSERT INTO offsets VALUES(?,?,?) ON CONFLICT(topic, partition) DO UPDATE SET "
                "next_offset=max(next_offset, excluded.next_offset)",
                [(t, p, o) for (t, p), o in new_offsets.items()])
        return rows, out, new_offsets

    def _store_records(self, db: sqlite3.Connection, responses: Sequence[ParsedPartition],
                       feedback: Sequence[ParsedPartition], now: float, assumed_new: bool) -> tuple[_Rows, StoreOutcome]:
        """Steps 2 and 3 for the records above the stored offsets: their rows, written, and what they did."""
        out = StoreOutcome()
        rows = _Rows(now, assumed_new)
        index = self._join_index(db)
        index.changed = False
        arrived = self._store_responses(db, responses, rows, out)  # 2.
        self._store_feedback(db, feedback, index, rows, out)  # 3.
        if arrived or index.ready:
            self._resolve_waiting(db, index, arrived, rows, out)
        if index.changed:
            self._bump_join(db, index)
        rows.write(db)
        return rows, out

    # ------------------------------------------------------------------------------------------ the join index

    def _join_index(self, db: sqlite3.Connection) -> _JoinIndex:
        """The pending feedback, as this transaction sees it: the index kept in memory if no other writer changed
        pending feedback since (its version is the stored one), else rebuilt from the pending rows."""
        version = self._join_version(db)
        if self._join is None or self._join.version != version:
            self._join = self._load_join(db, version)
        return self._join

    @staticmethod
    def _join_version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM state WHERE key='join_version'").fetchone()
        return int(row[0]) if row else 0

    def _load_join(self, db: sqlite3.Connection, version: int) -> _JoinIndex:
        index = _JoinIndex(version)
        events = self._read_pending(db)
        for event_id, pending, missing in events:
            if pending.needed is not None:  # (it was read when stored); else left to expire(), which dead-letters it
                index.add(event_id, pending, missing)
        if events:
            log.info("join index: %d pending feedback events (%d ready) read from the dataset", len(events),
                     len(index.ready))
        return index

    @staticmethod
    def _read_pending(db: sqlite3.Connection, stored_before: float | None = None
                      ) -> list[tuple[str, _Pending, list[str]]]:
        """The pending feedback events (stored before ``stored_before``, when given), each with the responses it
        still waits for, read from their rows and one lookup of the stored responses."""
        parse = events_pb2.FeedbackRecord.FromString
        sql = f"SELECT event_id, kind, payload, topic, partition, \"offset\" FROM feedback WHERE state='{PENDING}'"
        rows = db.execute(sql, ()) if stored_before is None else db.execute(sql + " AND stored_at < ?",
                                                                           (stored_before,))
        events: list[tuple[str, _Pending]] = []
        for event_id, kind, payload, topic, partition, offset in rows:
            needed: tuple[str, ...] | None
            try:
                needed = convert.needed_responses(parse(payload).event, kind)
            except (DecodeError, Unusable):
                needed = None
            events.append((event_id, _Pending(kind, needed, payload, topic, partition, offset)))
        wanted = list({r for _, p in events for r in p.needed or ()})
        stored = set(_existing(db, "responses", "response_id", wanted)) if wanted else set()
        return [(event_id, p, [r for r in p.needed or () if r not in stored]) for event_id, p in events]

    @staticmethod
    def _bump_join(db: sqlite3.Connection, index: _JoinIndex) -> None:
        """Pending feedback changed in this transaction: other writers' indexes are stale from its commit on."""
        index.version += 1
        db.execute("INSERT INTO state VALUES('join_version', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (str(index.version),))

    def advance(self, offsets: dict[TopicPartition, int]) -> None:
        """Note offsets stored (and committed) by another writer of this file, e.g. a :class:`StoreProcess`."""
        with self._offsets_lock:
            for tp, o in offsets.items():
                if o > self._offsets.get(tp, 0):
                    self._offsets[tp] = o

    def _store_responses(self, db: sqlite3.Connection, parts: Sequence[ParsedPartition], rows: _Rows,
                         out: StoreOutcome) -> list[str]:
        """2.: the responses not stored before (by response_id); returns their ids."""
        parsed = rows.responses
        duplicates = 0
        make = StoredResponse._make
        for topic, partition, offsets, values, items in parts:
            for offset, value, item in zip(offsets, values, items):
                if item.__class__ is str:  # (its dead-letter reason)
                    rows.dead_letter(value, topic, partition, offset, item, out)
                    continue
                response_id = item[0]
                if response_id in parsed:
                    duplicates += 1
                    continue
                parsed[response_id] = make(item[1])
        existing = _existing(db, "responses", "response_id", list(parsed)) if parsed and not rows.assumed_new else []
        for rid in existing:  # the stored one is looked up when feedback needs it
            del parsed[rid]
        duplicates += len(existing)
        if duplicates:
            out.duplicates["response"] += duplicates
        if parsed:
            out.stored["response"] += len(parsed)
        return list(parsed)

    def _store_feedback(self, db: sqlite3.Connection, parts: Sequence[ParsedPartition], index: _JoinIndex,
                        rows: _Rows, out: StoreOutcome) -> None:
        """3.: events not stored before (by event_id), converted when their responses are all stored."""
        records: list[tuple[bytes, str, int, int, tuple[str, str, tuple[str, ...], str]]] = []
        seen: set[str] = set()
        for topic, partition, offsets, values, items in parts:
            for offset, value, item in zip(offsets, values, items):
                if item.__class__ is str:  # (its dead-letter reason)
                    rows.dead_letter(value, topic, partition, offset, item, out)
                    continue
                event_id = item[0]
                if event_id in seen:
                    out.duplicates[item[1]] += 1
                    continue
                seen.add(event_id)
                records.append((value, topic, partition, offset, item))
        if not records:
            return
        existing = set() if rows.assumed_new else set(_existing(db, "feedback", "event_id", list(seen)))
        stored: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        waiting: list[tuple[bytes, str, int, int, str, str, tuple[str, ...]]] = []
        now, feedback_rows = rows.now, rows.feedback
        for value, topic, partition, offset, (event_id, kind, needed, unusable) in records:
            if event_id in existing:
                duplicates[kind] = duplicates.get(kind, 0) + 1
                continue
            stored[kind] = stored.get(kind, 0) + 1
            if kind == "demonstration":  # needs no response, and its row is the supervised data (most of a stream)
                rows.plain_demonstrations += 1
                feedback_rows.append((event_id, kind, USED, value, now, topic, partition, offset, ""))
            elif unusable:
                feedback_rows.append((event_id, kind, DEAD, value, now, topic, partition, offset, unusable))
                rows.outbox_letter(event_id, value, topic, partition, offset, unusable, out)
            else:
                waiting.append((value, topic, partition, offset, event_id, kind, needed))
        out.stored.update(stored)
        out.duplicates.update(duplicates)
        if not waiting:
            return
        wanted = {r for *_, ids in waiting for r in ids if r not in rows.responses}
        if wanted:
            rows.known.update(self._responses(db, list(wanted)))
        for value, topic, partition, offset, event_id, kind, needed in waiting:
            missing = [r for r in needed if rows.response(r) is None]
            if missing:
                feedback_rows.append((event_id, kind, PENDING, value, now, topic, partition, offset, ""))
                index.add(event_id, _Pending(kind, needed, value, topic, partition, offset), missing)
                continue
            state, reason = self._convert(db, value, event_id, kind, needed, rows)
            feedback_rows.append((event_id, kind, state, value, now, topic, partition, offset, reason))
            if state == DEAD:
                rows.outbox_letter(event_id, value, topic, partition, offset, reason, out)

    def _remember(self, responses: dict[str, StoredResponse]) -> None:
        recent = self._recent
        recent.update(responses)
        if len(recent) > self.RECENT_RESPONSES:
            for rid in list(itertools.islice(recent, len(recent) - self.RECENT_RESPONSES)):
                del recent[rid]

    def _responses(self, db: sqlite3.Connection, response_ids: Sequence[str]) -> dict[str, StoredResponse]:
        """The stored responses of these ids (those stored)."""
        recent = self._recent
        out = {rid: recent[rid] for rid in response_ids if rid in recent}
        if len(out) < len(response_ids):
            out.update(self._query_responses(db, [rid for rid in response_ids if rid not in out]))
        return out

    def _query_responses(self, db: sqlite3.Connection, response_ids: Sequence[str]) -> dict[str, StoredResponse]:
        out: dict[str, StoredResponse] = {}
        for chunk in _chunks(response_ids):
            marks = ",".join("?" * len(chunk))
            for rid, *row in db.execute(
                    f"SELECT response_id, prompt, messages, prompt_key, text, policy_version FROM responses "
                    f"WHERE response_id IN ({marks})", chunk):
                out[rid] = StoredResponse(*row)
        return out

    def _convert(self, db: sqlite3.Connection, payload: bytes, event_id: str, kind: str, needed: Sequence[str],
                 rows: _Rows) -> tuple[str, str]:
        """An event (its rlhf.v1.FeedbackRecord) whose responses are all stored: its derived rows; (state,
        dead-letter reason). A ranking is converted from its stored responses alone; the other kinds are parsed
        again here, for what :func:`parse_partitions` did not keep (a pair's strength, a rating's value, an
        edit's text)."""
        stored = [rows.response(r) for r in needed]
        if None in stored:  # stored by earlier transactions and not looked up yet
            rows.known.update(self._responses(db, [r for r, s in zip(needed, stored) if s is None]))
            stored = [rows.response(r) for r in needed]
        try:
            event = None if kind == "ranking" else events_pb2.FeedbackRecord.FromString(payload).event
            if kind in ("pairwise", "ranking"):  # the usual kinds: rows straight from the stored responses
                texts, margin = convert.preference(event, kind, needed, stored)
                if len(set(texts)) == len(texts):  # two responses with the same text teach nothing
                    sources = (event_id,)
                    rows.comparisons.append((stored[0].prompt, stored[0].messages_json, _json_strs(texts), margin,
                                             _json_strs(sources), int(convert.heldout(sources, self.heldout_share))))
                return USED, ""
            responses = {r: s.response(r) for r, s in zip(needed, stored)}
            earlier: list[RatingValue] = []
            if kind == "rating" and needed:
                key = stored[0].prompt_key
                earlier = [RatingValue(*row) for row in db.execute(
                    "SELECT event_id, response_id, prompt_key, value, text FROM ratings WHERE prompt_key=?", (key,))]
                earlier += [r for r in rows.ratings if r.prompt_key == key]
            derived = convert.convert(event, responses, earlier, needed)
        except Unusable as e:
            return DEAD, e.reason
        except Exception as e:  # noqa: BLE001 - a bug must not stall the stream: dead-lettered with its payload
            log.exception("converting feedback event %s failed", event_id)
            return DEAD, f"conversion failed ({type(e).__name__}: {e}); the payload can be replayed once fixed"
        if derived.rating is not None:
            rows.ratings.append(derived.rating)
        for c in derived.comparisons:
            if len(set(c.responses)) == len(c.responses):
                rows.comparisons.append((c.prompt.text, _messages_json(c.prompt), json.dumps(c.responses), c.margin,
                                         json.dumps(c.sources), int(convert.heldout(c.sources, self.heldout_share))))
        for d in derived.demonstrations:
            rows.demonstrations.append((d.prompt.text, _messages_json(d.prompt), d.response, d.source))
        return USED, ""

    def _resolve_waiting(self, db: sqlite3.Connection, index: _JoinIndex, arrived: Sequence[str], rows: _Rows,
                         out: StoreOutcome) -> None:
        """Feedback that waited for responses that have now arrived is converted, once nothing it needs is missing
        (the join index says which: no query but for responses stored before this writer's recent ones)."""
        ready = index.arrived(arrived)
        if not ready:
            return
        todo: list[tuple[str, _Pending]] = []
        for event_id in ready:
            pending = index.pop(event_id)
            if pending is not None:
                todo.append((event_id, pending))
        wanted = {r for _, pending in todo for r in pending.needed if rows.response(r) is None}
        if wanted:
            rows.known.update(self._responses(db, list(wanted)))
        for event_id, p in todo:
            state, reason = self._convert(db, p.payload, event_id, p.kind, p.needed, rows)
            rows.updates.append((state, reason, event_id))
            if state == DEAD:
                rows.outbox_letter(event_id, p.payload, p.topic, p.partition, p.offset, reason, out)

    def expire(self, now: float | None = None) -> StoreOutcome:
        """Feedback that waited longer than ``join_timeout_s`` for its responses goes to the dead-letter outbox."""
        now = time.time() if now is None else now
        out = StoreOutcome()
        with self._tx() as db:
            expired = self._read_pending(db, stored_before=now - self.join_timeout_s)
            if not expired:
                return out
            rows = _Rows(now)
            for event_id, p, missing in expired:
                reason = (f"responses {', '.join(missing)} not seen on {topics.RESPONSES} within "
                          f"{self.join_timeout_s:.0f}s")
                rows.updates.append((DEAD, reason, event_id))
                rows.outbox_letter(event_id, p.payload, p.topic, p.partition, p.offset, reason, out)
            version = self._join_version(db)
            current = self._join is not None and self._join.version == version
            index = self._join if current else _JoinIndex(version)  # (a stale one is rebuilt when next needed)
            for event_id, *_ in expired:
                index.pop(event_id)
            self._bump_join(db, index)
            rows.write(db)
            if not current:
                self._join = None
        return out

    # ------------------------------------------------------------------------------------------ the outbox

    def dead_letters(self, limit: int = 500) -> list[DeadLetter]:
        return [DeadLetter(i, e, p) for i, e, p in self._db().execute(
            "SELECT id, event_id, payload FROM outbox ORDER BY id LIMIT ?", (limit,))]

    def dead_letters_sent(self, ids: Sequence[int]) -> None:
        if ids:
            with self._tx() as db:
                db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])

    # ------------------------------------------------------------------------------------------ reading

    def comparisons(self, after_id: int = 0) -> list[StoredComparison]:
        rows = self._db().execute("SELECT id, prompt, messages, responses, margin, sources, heldout FROM comparisons "
                                  "WHERE id > ? ORDER BY id", (after_id,))
        return [StoredComparison(i, Comparison(Prompt(p, tuple(tuple(x) for x in json.loads(msgs))),
                                               tuple(json.loads(resp)), tuple(json.loads(src)), margin), bool(h))
                for i, p, msgs, resp, margin, src, h in rows]

    def last_comparison_id(self) -> int:
        return int(self._db().execute("SELECT coalesce(max(id), 0) FROM comparisons").fetchone()[0])

    def count_comparisons(self, after_id: int = 0) -> int:
        return int(self._db().execute("SELECT count(*) FROM comparisons WHERE id > ?", (after_id,)).fetchone()[0])

    def demonstrations(self) -> list[Demonstration]:
        """The supervised data: demonstration events (read from their feedback rows, where they are stored once),
        then the demonstrations derived from edits (the ``demonstrations`` table), each in the order stored."""
        db = self._db()
        parse = events_pb2.FeedbackRecord.FromString
        plain = [convert.demonstration_of(parse(payload).event) for (payload,) in db.execute(
            f"SELECT payload FROM feedback WHERE kind='demonstration' AND state='{USED}' ORDER BY rowid")]
        return plain + [Demonstration(Prompt(p, tuple(tuple(x) for x in json.loads(msgs))), r, s) for p, msgs, r, s in
                        db.execute("SELECT prompt, messages, response, source FROM demonstrations ORDER BY id")]

    def sizes(self) -> dict[str, int]:
        """Rows by kind: responses, feedback events by state, comparisons (pairs, rankings), demonstrations."""
        db = self._db()
        out = {"responses": db.execute("SELECT count(*) FROM responses").fetchone()[0]}
        for state, n in db.execute("SELECT state, count(*) FROM feedback GROUP BY state"):
            out[f"feedback_{state}"] = n
        out["pairs"] = db.execute("SELECT count(*) FROM comparisons WHERE json_array_length(responses) = 2").fetchone()[0]
        out["rankings"] = db.execute("SELECT count(*) FROM comparisons WHERE json_array_length(responses) > 2"
                                     ).fetchone()[0]
        out["demonstrations"] = db.execute(
            f"SELECT (SELECT count(*) FROM feedback WHERE kind='demonstration' AND state='{USED}') + "
            f"(SELECT count(*) FROM demonstrations)").fetchone()[0]
        return out

    def feedback_events(self) -> Iterator[tuple[str, str]]:
        """(event_id, state) of every feedback event stored."""
        yield from self._db().execute("SELECT event_id, state FROM feedback ORDER BY event_id")

    def dead_reason(self, event_id: str) -> str | None:
        row = self._db().execute("SELECT reason FROM feedback WHERE event_id=? AND state=?", (event_id, DEAD)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------------------------------ versions

    def put_version(self, version: str, kind: str, status: str, record: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO versions VALUES(?,?,?,?,?) ON CONFLICT(version) DO UPDATE SET status=excluded.status, "
                       "record=excluded.record", (version, kind, status, time.time(), json.dumps(record)))

    @staticmethod
    def _version_record(v: str, k: str, s: str, t: float, rec: str) -> dict:
        return {**json.loads(rec), "version": v, "kind": k, "status": s, "created_at": t}

    def version(self, name: str, kind: str | None = None) -> dict | None:
        """One version's record (as :meth:`versions` gives it), however many came after it; None if there is none
        of that name (and kind)."""
        row = self._db().execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version=?", (name,)).fetchone()
        if row is None or (kind and row[1] != kind):
            return None
        return self._version_record(*row)

    def iter_versions(self, kind: str | None = None, status: str | None = None,
                      page: int = 500) -> Iterator[dict]:
        """Every version, newest first (each the record given to put_version plus ``version``, ``kind``,
        ``status``, ``created_at``), read ``page`` at a time: a search may reach past the newest thousand, since a
        day of PPO saves thousands of policy versions."""
        sql = f"SELECT {_VERSION_COLUMNS}, rowid FROM versions WHERE 1=1"
        args: list = []
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        if status:
            sql += " AND status=?"
            args.append(status)
        page = max(1, page)
        after: tuple[float, int] | None = None
        while True:
            keyset = " AND (created_at < ? OR (created_at = ? AND rowid < ?))" if after else ""
            rows = self._db().execute(
                sql + keyset + " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                [*args, *((after[0], after[0], after[1]) if after else ()), page]).fetchall()
            for *row, _ in rows:
                yield self._version_record(*row)
            if len(rows) < page:
                return
            after = (rows[-1][3], rows[-1][5])

    def versions(self, kind: str | None = None, status: str | None = None, limit: int = 100) -> list[dict]:
        """The newest ``limit`` of :meth:`iter_versions` (one query)."""
        return list(itertools.islice(self.iter_versions(kind, status, page=limit), max(0, limit)))

    # ------------------------------------------------------------------------------------------ served traffic

    def served_count(self, policy_version: str, since: float) -> int:
        """Responses of ``policy_version`` stored since ``since`` (Unix time)."""
        return int(self._db().execute("SELECT COUNT(*) FROM responses WHERE policy_version=? AND stored_at>=?",
                                      (policy_version, since)).fetchone()[0])

    def served_responses(self, policy_version: str, since: float, limit: int) -> list[tuple[str, str]]:
        """(prompt, text) of the newest ``limit`` plain-prompt responses of ``policy_version`` since ``since``."""
        rows = self._db().execute(
            "SELECT prompt, text FROM responses WHERE policy_version=? AND stored_at>=? AND prompt != '' "
            "ORDER BY stored_at DESC LIMIT ?", (policy_version, since, limit))
        return [(p, t) for p, t in rows if t.strip()]

    def feedback_stored_between(self, after: float, until: float) -> list[float]:
        """stored_at of the feedback events stored in (after, until] and used (converted)."""
        rows = self._db().execute("SELECT stored_at FROM feedback WHERE stored_at>? AND stored_at<=? AND state=?",
                                  (after, until, USED))
        return [t for (t,) in rows]

    def get_state(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO state VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))


# ---------------------------------------------------------------------------------------------- a store process


_STARTED = b"\x01"  # what a store process writes first (a frame), once its dataset is open


def _frame(data: bytes) -> bytes:
    """A reply of the store process: its length (4 bytes, little-endian), then the bytes."""
    return len(data).to_bytes(4, "little") + data


class _Frames:
    """The store process's replies, read from the raw pipe into a buffer of our own: whether the oldest has arrived
    is known without blocking (a buffered file reading one reply may also read the next, which ``select`` on the
    pipe then no longer sees)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False  # the process's end of the pipe closed

    def _complete(self) -> bool:
        buffer = self.buffer
        return len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "little")

    def _read(self) -> None:
        chunk = os.read(self.fd, 1 << 16)
        if chunk:
            self.buffer += chunk
        else:
            self.closed = True

    def arrived(self) -> bool:
        """Whether the next frame is here (or none will come): :meth:`next` would not wait."""
        while not self._complete() and not self.closed and select.select([self.fd], [], [], 0)[0]:
            self._read()
        return self._complete() or self.closed

    def next(self) -> bytes | None:
        """The next frame, waiting for it; None once the pipe closed before it."""
        while not self._complete():
            if self.closed:
                return None
            self._read()
        n = int.from_bytes(self.buffer[:4], "little")
        frame = bytes(self.buffer[4:4 + n])
        del self.buffer[:4 + n]
        return frame


class StoreFailed(Exception):
    """The store process failed a batch, or exited; the batch is not stored (its offsets are not either)."""


class StoreProcess:
    """:meth:`Dataset.store` in a process of its own, so that parsing, converting and SQLite's writes run beside
    the consumer's Kafka reads instead of after them (one Python thread cannot do both at once: both hold the GIL).

    Up to :attr:`MAX_IN_FLIGHT` batches at a time: :meth:`submit` sends one (into a pipe wide enough for both, so
    that sending never waits for the process and the process never waits for the next batch), :meth:`result`
    waits for the oldest's :class:`StoreOutcome` (the process has committed its transaction then; batches are stored
    in the order sent) and advances ``dataset``'s offsets. The process is ``python -m
    rlhf.trainer.dataset --serve`` on the same file (SQLite serialises it with this process's writers); it exits
    when its stdin closes: on :meth:`close`, or when this process dies however it dies (a batch it had begun is
    committed whole or not at all, with its offsets)."""

    def __init__(self, dataset: Dataset) -> None:
        import rlhf

        self.dataset = dataset
        root = str(Path(rlhf.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.trainer.dataset", "--serve", dataset.path, repr(dataset.heldout_share),
             repr(dataset.join_timeout_s), str(dataset.cache_mb), str(dataset.checkpoint_pages)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.in_flight = 0  # batches sent whose result was not read
        self._up = False  # _STARTED was read
        self._replies = _Frames(self._proc.stdout.fileno())  # (the raw pipe: self._proc.stdout is never read)
        self._widen(self._proc.stdin.fileno())

    PIPE_BYTES = 1 << 20
    """The request pipe's capacity (Linux's default 64 KiB holds a fifth of a 2,000-record batch: sending one then
    waited until the process, busy storing the one before, read the rest)."""

    @classmethod
    def _widen(cls, fd: int) -> None:
        """The pipe's capacity to :attr:`PIPE_BYTES`, or as much as this system allows (a narrower pipe only makes
        sending wait)."""
        import fcntl

        setter = getattr(fcntl, "F_SETPIPE_SZ", None)  # (Linux)
        if setter is None:
            return
        try:
            limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except (OSError, ValueError):
            limit = cls.PIPE_BYTES
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setter, min(cls.PIPE_BYTES, limit))

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    MAX_IN_FLIGHT = 2
    """One stored while the next waits in the process: with one, the process idled between a batch's result and the
    next batch (~15% of its time, benchmarks/README.md)."""

    def submit(self, batch: Sequence[PartitionRecords | ParsedPartition], now: float | None = None) -> None:
        """Send a poll's records (as :meth:`Dataset.store_partitions` takes them) to be stored, parsed here
        (:func:`parse_partitions`: on the caller's thread, while the process stores the batches before)."""
        if self.in_flight >= self.MAX_IN_FLIGHT:
            raise RuntimeError(f"StoreProcess.submit: {self.in_flight} batches in flight, their results not read")
        # Plain tuples of lists a partition: pickled and read back at C speed, no object per record.
        columns = [tuple(part) for part in parse_partitions(batch)]
        try:
            pickle.dump((columns, now), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise StoreFailed(f"the store process exited (code {self._proc.poll()}): {e}") from e
        self.in_flight += 1

    def started(self) -> bool:
        """Whether the process is up, its dataset open (a fresh interpreter's imports take ~0.3 s; a batch submitted
        before waits for them). Raises :class:`StoreFailed` if it exited instead."""
        if not self._up and self._replies.arrived():
            self._read_started()
        return self._up

    def _read_started(self) -> None:
        if self._replies.next() != _STARTED:
            raise StoreFailed(f"the store process exited at its start (code {self._proc.poll()})")
        self._up = True

    def ready(self) -> bool:
        """Whether the oldest batch in flight has its result (or the process exited): :meth:`result` would not
        wait."""
        if not self._up:
            try:
                if not self.started():
                    return False
            except StoreFailed:
                return True  # result() raises it
        return self._replies.arrived()

    def result(self) -> StoreOutcome:
        if not self.in_flight:
            raise RuntimeError("StoreProcess.result: no batch in flight")
        self.in_flight -= 1
        if not self._up:
            self._read_started()
        try:
            frame = self._replies.next()
            if frame is None:
                raise EOFError("the pipe closed")
            ok, value = pickle.loads(frame)
        except (EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise StoreFailed(f"the store process exited (code {self._proc.poll()})") from e
        if not ok:
            raise StoreFailed(value)
        self.dataset.advance(value.offsets)
        return value

    def store(self, messages: Sequence[Message], now: float | None = None) -> StoreOutcome:
        self.submit(partition_records(messages), now)
        return self.result()

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for the batches in flight (if any; their results are dropped) and end the process."""
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdout.close()
        self.in_flight = 0


def _serve(path: str, heldout_share: float, join_timeout_s: float, cache_mb: int, checkpoint_pages: int) -> int:
    """The store process: batches from stdin, their outcomes to stdout, until stdin closes (the next batch is
    already in the pipe when one is stored: :meth:`StoreProcess._widen`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the trainer, which closes our stdin
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries only replies
    dataset = Dataset(path, heldout_share=heldout_share, join_timeout_s=join_timeout_s, cache_mb=cache_mb,
                      checkpoint_pages=checkpoint_pages)
    make = ParsedPartition._make
    gc.freeze()  # what the imports made is never garbage: collections of the rows' young objects skip it (~1%)
    try:
        try:
            replies.write(_frame(_STARTED))
            replies.flush()
        except BrokenPipeError:  # the trainer is gone already
            return 0
        failed = ""
        while True:
            try:
                columns, now = pickle.load(requests)
            except EOFError:
                return 0
            if failed:  # a batch after one that failed is not stored: its offsets would pass the failed one's records
                reply = (False, f"not stored: a batch before it failed ({failed})")
            else:
                try:
                    reply = (True, dataset.store_partitions(list(map(make, columns)), now))
                except Exception as e:  # noqa: BLE001 - reported to the trainer, which reads them again
                    log.exception("storing a batch failed")
                    failed = f"{type(e).__name__}: {e}"
                    reply = (False, failed)
            try:
                replies.write(_frame(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)))
                replies.flush()
            except BrokenPipeError:  # the trainer is gone; what was stored stays stored
                return 0
    finally:
        dataset.close()


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--serve":
        logging.basicConfig(level=logging.WARNING)
        from rlhf.trainer import dataset as _module  # its classes, not __main__'s, in what is pickled

        raise SystemExit(_module._serve(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
                                        int(sys.argv[6])))
    raise SystemExit("usage: python -m rlhf.trainer.dataset --serve PATH HELDOUT_SHARE JOIN_TIMEOUT_S CACHE_MB "
                     "CHECKPOINT_PAGES")
