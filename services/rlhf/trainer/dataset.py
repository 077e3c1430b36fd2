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
import dataclasses
import json
import sqlite3
import threading
import logging
import time
from collections.abc import Iterator, Sequence

from google.protobuf.message import DecodeError

from rlhf.bus import topics
from rlhf.bus.base import Message, TopicPartition
from rlhf.trainer import convert
from rlhf.trainer.convert import Comparison, Demonstration, Prompt, RatingValue, Response, Unusable
from rlhf.v1 import events_pb2, feedback_pb2

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets(topic TEXT, partition INTEGER, next_offset INTEGER, PRIMARY KEY(topic, partition));
CREATE TABLE IF NOT EXISTS responses(response_id TEXT PRIMARY KEY, prompt TEXT, messages TEXT, prompt_key TEXT,
    text TEXT, policy_version TEXT, stored_at REAL);
CREATE INDEX IF NOT EXISTS responses_version ON responses(policy_version, stored_at);
CREATE TABLE IF NOT EXISTS feedback(event_id TEXT PRIMARY KEY, kind TEXT, state TEXT, payload BLOB, stored_at REAL,
    topic TEXT, partition INTEGER, "offset" INTEGER, reason TEXT);
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback(stored_at) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS waiting(response_id TEXT, event_id TEXT, PRIMARY KEY(response_id, event_id));
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


def _messages_json(prompt: Prompt) -> str:
    return json.dumps(prompt.messages) if prompt.messages else "[]"


def _letter(event_id: str, payload: bytes, topic: str, partition: int, offset: int, reason: str) -> bytes:
    letter = events_pb2.DeadLetter(event_id=event_id, source_topic=topic, source_partition=partition,
                                   source_offset=offset, payload=payload, reason=reason)
    letter.at.GetCurrentTime()
    return letter.SerializeToString()


class _Rows:
    """The rows of one transaction, by table, written at its end with one executemany each."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.responses: dict[str, Response] = {}  # stored in this batch
        self.known: dict[str, Response] = {}  # stored before, looked up for this batch
        self.feedback: list[tuple] = []
        self.waiting: list[tuple[str, str]] = []
        self.ratings: list[RatingValue] = []
        self.comparisons: list[tuple] = []
        self.demonstrations: list[tuple] = []
        self.outbox: list[tuple[str, bytes]] = []

    def response(self, response_id: str) -> Response | None:
        return self.responses.get(response_id) or self.known.get(response_id)

    def feedback_row(self, event_id: str, kind: str, state: str, m: Message, reason: str = "") -> None:
        self.feedback.append((event_id, kind, state, m.value, self.now, m.topic, m.partition, m.offset, reason))

    def outbox_letter(self, event_id: str, payload: bytes, topic: str, partition: int, offset: int, reason: str,
                      out: StoreOutcome) -> None:
        self.outbox.append((event_id or f"{topic}:{partition}:{offset}",
                            _letter(event_id, payload, topic, partition, offset, reason)))
        out.dead[reason_class(reason)] += 1

    def dead_letter(self, event_id: str, m: Message, reason: str, out: StoreOutcome) -> None:
        """A record that is not even a readable event: only its dead letter is kept."""
        self.outbox_letter(event_id, m.value, m.topic, m.partition, m.offset, reason, out)

    def write(self, db: sqlite3.Connection) -> None:
        if self.responses:
            db.executemany("INSERT OR IGNORE INTO responses VALUES(?,?,?,?,?,?,?)", [
                (r.response_id, r.prompt.text, _messages_json(r.prompt), r.prompt.key, r.text, r.policy_version,
                 self.now) for r in self.responses.values()])
        if self.feedback:
            db.executemany("INSERT OR IGNORE INTO feedback VALUES(?,?,?,?,?,?,?,?,?)", self.feedback)
        if self.waiting:
            db.executemany("INSERT OR IGNORE INTO waiting VALUES(?,?)", self.waiting)
        if self.ratings:
            db.executemany("INSERT OR IGNORE INTO ratings VALUES(?,?,?,?,?)",
                           [(r.event_id, r.response_id, r.prompt_key, r.value, r.text) for r in self.ratings])
        if self.comparisons:
            db.executemany("INSERT INTO comparisons(prompt, messages, responses, margin, sources, heldout) "
                           "VALUES(?,?,?,?,?,?)", self.comparisons)
        if self.demonstrations:
            db.executemany("INSERT INTO demonstrations(prompt, messages, response, source) VALUES(?,?,?,?)",
                           self.demonstrations)
        if self.outbox:
            db.executemany("INSERT INTO outbox(event_id, payload) VALUES(?,?)", self.outbox)


class Dataset:
    """The SQLite dataset; one writer thread (the consumer), any number of reader threads."""

    def __init__(self, path: str, *, heldout_share: float = 0.1, join_timeout_s: float = 300.0) -> None:
        self.path = path
        self.heldout_share = heldout_share
        self.join_timeout_s = join_timeout_s
        self._local = threading.local()
        self._offsets_lock = threading.Lock()
        self._db().executescript(SCHEMA)  # IF NOT EXISTS: idempotent (executescript commits by itself)
        self._offsets: dict[TopicPartition, int] = {
            (t, p): o for t, p, o in self._db().execute("SELECT topic, partition, next_offset FROM offsets")}

    # ------------------------------------------------------------------------------------------ connections

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
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
        """Steps 1-4 of the module docstring, in one transaction. Rows are gathered per table and written with one
        ``executemany`` each, and lookups are one query per batch, not per record."""
        now = time.time() if now is None else now
        out = StoreOutcome()
        known = self.stored_offsets()
        fresh = [m for m in messages if m.offset >= known.get((m.topic, m.partition), 0)]  # 1.
        if len(fresh) < len(messages):
            out.duplicates["redelivered"] += len(messages) - len(fresh)
        highest: dict[TopicPartition, int] = {}
        for m in messages:
            tp = (m.topic, m.partition)
            if m.offset > highest.get(tp, -1):
                highest[tp] = m.offset
        rows = _Rows(now)
        with self._tx() as db:
            responses = [m for m in fresh if m.topic == topics.RESPONSES]
            feedback = [m for m in fresh if m.topic == topics.FEEDBACK]
            for topic, batch in ((topics.RESPONSES, responses), (topics.FEEDBACK, feedback)):
                if batch:
                    out.consumed[topic] += len(batch)
            arrived = self._store_responses(db, responses, rows, out)  # 2.
            self._store_feedback(db, feedback, rows, out)  # 3.
            if arrived:
                self._resolve_waiting(db, arrived, rows, out)
            rows.write(db)
            new_offsets = {tp: o + 1 for tp, o in highest.items() if o + 1 > known.get(tp, 0)}
            db.executemany(  # 4.
                "INSERT INTO offsets VALUES(?,?,?) ON CONFLICT(topic, partition) DO UPDATE SET "
                "next_offset=max(next_offset, excluded.next_offset)",
                [(t, p, o) for (t, p), o in new_offsets.items()])
        with self._offsets_lock:
            for tp, o in new_offsets.items():
                self._offsets[tp] = max(self._offsets.get(tp, 0), o)
        out.comparisons, out.demonstrations = len(rows.comparisons), len(rows.demonstrations)
        return out

    def _store_responses(self, db: sqlite3.Connection, messages: Sequence[Message], rows: _Rows,
                         out: StoreOutcome) -> list[str]:
        """2.: the responses not stored before (by response_id); returns their ids."""
        parsed: dict[str, Response] = {}
        for m in messages:
            try:
                served = events_pb2.ServedResponse.FromString(m.value)
            except DecodeError:
                rows.dead_letter("", m, "cannot parse the record as rlhf.v1.ServedResponse", out)
                continue
            if not served.response_id:
                rows.dead_letter("", m, "the served response has no response_id", out)
                continue
            if served.response_id in parsed or served.response_id in rows.responses:
                out.duplicates["response"] += 1
                continue
            parsed[served.response_id] = convert.response_of(served)
        existing = _existing(db, "responses", "response_id", list(parsed))
        for rid in existing:
            del parsed[rid]
        if existing:
            out.duplicates["response"] += len(existing)
        if parsed:
            out.stored["response"] += len(parsed)
        rows.responses.update(parsed)
        return list(parsed)

    def _store_feedback(self, db: sqlite3.Connection, messages: Sequence[Message], rows: _Rows,
                        out: StoreOutcome) -> None:
        """3.: events not stored before (by event_id), converted when their responses are all stored."""
        records: list[tuple[Message, events_pb2.FeedbackRecord]] = []
        seen: set[str] = set()
        for m in messages:
            try:
                record = events_pb2.FeedbackRecord.FromString(m.value)
            except DecodeError:
                rows.dead_letter("", m, "cannot parse the record as rlhf.v1.FeedbackRecord", out)
                continue
            event_id = record.event.event_id
            if not event_id:
                rows.dead_letter("", m, "the feedback event has no event_id", out)
                continue
            if event_id in seen:
                out.duplicates[record.event.WhichOneof("kind") or "none"] += 1
                continue
            seen.add(event_id)
            records.append((m, record))
        existing = set(_existing(db, "feedback", "event_id", list(seen)))
        stored, duplicates = collections.Counter(), collections.Counter()
        waiting: list[tuple[Message, feedback_pb2.FeedbackEvent, str, tuple[str, ...]]] = []
        for m, record in records:
            event = record.event
            event_id, kind = event.event_id, event.WhichOneof("kind") or "none"
            if event_id in existing:
                duplicates[kind] += 1
                continue
            stored[kind] += 1
            if kind == "demonstration":  # needs no response: converted at once (most of a busy stream)
                d = convert.demonstration_of(event)
                rows.demonstrations.append((d.prompt.text, _messages_json(d.prompt), d.response, d.source))
                rows.feedback_row(event_id, kind, USED, m)
                continue
            try:
                waiting.append((m, event, kind, convert.needed_responses(event)))
            except Unusable as e:
                rows.feedback_row(event_id, kind, DEAD, m, e.reason)
                rows.outbox_letter(event_id, m.value, m.topic, m.partition, m.offset, e.reason, out)
        out.stored.update(stored)
        out.duplicates.update(duplicates)
        wanted = {r for *_, ids in waiting for r in ids if r not in rows.responses}
        rows.known.update(self._responses(db, list(wanted)))
        for m, event, kind, needed in waiting:
            missing = [r for r in dict.fromkeys(needed) if rows.response(r) is None]
            if missing:
                rows.feedback_row(event.event_id, kind, PENDING, m)
                rows.waiting.extend((r, event.event_id) for r in missing)
                continue
            state, reason = self._convert(db, event, rows, out, needed)
            rows.feedback_row(event.event_id, kind, state, m, reason)
            if state == DEAD:
                rows.outbox_letter(event.event_id, m.value, m.topic, m.partition, m.offset, reason, out)

    def _responses(self, db: sqlite3.Connection, response_ids: Sequence[str]) -> dict[str, Response]:
        out: dict[str, Response] = {}
        for chunk in _chunks(response_ids):
            marks = ",".join("?" * len(chunk))
            for rid, p, msgs, text, version in db.execute(
                    f"SELECT response_id, prompt, messages, text, policy_version FROM responses "
                    f"WHERE response_id IN ({marks})", chunk):
                out[rid] = Response(rid, Prompt(p, tuple(tuple(x) for x in json.loads(msgs))), text, version)
        return out

    def _convert(self, db: sqlite3.Connection, event, rows: _Rows, out: StoreOutcome,
                 needed: Sequence[str] | None = None) -> tuple[str, str]:
        """An event whose responses are all stored: its derived rows; (state, dead-letter reason)."""
        needed = convert.needed_responses(event) if needed is None else needed
        unknown = [r for r in needed if rows.response(r) is None]
        if unknown:  # stored by earlier transactions (an event that waited for its last response)
            rows.known.update(self._responses(db, unknown))
        responses = {r: rows.response(r) for r in needed}
        earlier: list[RatingValue] = []
        if event.WhichOneof("kind") == "rating" and needed:
            key = responses[needed[0]].prompt.key
            earlier = [RatingValue(*row) for row in db.execute(
                "SELECT event_id, response_id, prompt_key, value, text FROM ratings WHERE prompt_key=?", (key,))]
            earlier += [r for r in rows.ratings if r.prompt_key == key]
        try:
            derived = convert.convert(event, responses, earlier, needed)
        except Unusable as e:
            return DEAD, e.reason
        except Exception as e:  # noqa: BLE001 - a bug must not stall the stream: dead-lettered with its payload
            log.exception("converting feedback event %s failed", event.event_id)
            return DEAD, f"conversion failed ({type(e).__name__}: {e}); the payload can be replayed once fixed"
        if derived.rating is not None:
            rows.ratings.append(derived.rating)
        for c in derived.comparisons:
            if len(set(c.responses)) == len(c.responses):  # two responses with the same text teach nothing
                rows.comparisons.append((c.prompt.text, _messages_json(c.prompt), json.dumps(c.responses), c.margin,
                                         json.dumps(c.sources), int(convert.heldout(c.sources, self.heldout_share))))
        for d in derived.demonstrations:
            rows.demonstrations.append((d.prompt.text, _messages_json(d.prompt), d.response, d.source))
        return USED, ""

    def _resolve_waiting(self, db: sqlite3.Connection, arrived: Sequence[str], rows: _Rows,
                         out: StoreOutcome) -> None:
        """Feedback that waited for responses that have now arrived is converted, once nothing it needs is missing."""
        events: list[str] = []
        for chunk in _chunks(arrived):
            marks = ",".join("?" * len(chunk))
            events += [e for (e,) in db.execute(f"SELECT DISTINCT event_id FROM waiting WHERE response_id IN ({marks})",
                                                chunk)]
            db.execute(f"DELETE FROM waiting WHERE response_id IN ({marks})", chunk)
        for event_id in dict.fromkeys(events):
            if db.execute("SELECT 1 FROM waiting WHERE event_id=? LIMIT 1", (event_id,)).fetchone():
                continue  # still waits for another response
            row = db.execute("SELECT payload, topic, partition, \"offset\" FROM feedback WHERE event_id=? AND state=?",
                             (event_id, PENDING)).fetchone()
            if row is None:
                continue
            payload, topic, partition, offset = row
            event = events_pb2.FeedbackRecord.FromString(payload).event
            state, reason = self._convert(db, event, rows, out)
            db.execute("UPDATE feedback SET state=?, reason=? WHERE event_id=?", (state, reason, event_id))
            if state == DEAD:
                rows.outbox_letter(event_id, payload, topic, partition, offset, reason, out)

    def _kill(self, db: sqlite3.Connection, event_id: str, payload: bytes, topic: str, partition: int, offset: int,
              reason: str, out: StoreOutcome) -> None:
        db.execute("UPDATE feedback SET state=?, reason=? WHERE event_id=?", (DEAD, reason, event_id))
        db.execute("DELETE FROM waiting WHERE event_id=?", (event_id,))
        db.execute("INSERT INTO outbox(event_id, payload) VALUES(?,?)",
                   (event_id, _letter(event_id, payload, topic, partition, offset, reason)))
        out.dead[reason_class(reason)] += 1

    def expire(self, now: float | None = None) -> StoreOutcome:
        """Feedback that waited longer than ``join_timeout_s`` for its responses goes to the dead-letter outbox."""
        now = time.time() if now is None else now
        out = StoreOutcome()
        with self._tx() as db:
            rows = db.execute("SELECT event_id, payload, topic, partition, \"offset\" FROM feedback "
                              "WHERE state = 'pending' AND stored_at < ?", (now - self.join_timeout_s,)).fetchall()
            for event_id, payload, topic, partition, offset in rows:
                missing = [r for (r,) in db.execute("SELECT response_id FROM waiting WHERE event_id=?", (event_id,))]
                reason = (f"responses {', '.join(missing)} not seen on {topics.RESPONSES} within "
                          f"{self.join_timeout_s:.0f}s")
                self._kill(db, event_id, payload, topic, partition, offset, reason, out)
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
        return [Demonstration(Prompt(p, tuple(tuple(x) for x in json.loads(msgs))), r, s) for p, msgs, r, s in
                self._db().execute("SELECT prompt, messages, response, source FROM demonstrations ORDER BY id")]

    def sizes(self) -> dict[str, int]:
        """Rows by kind: responses, feedback events by state, comparisons (pairs, rankings), demonstrations."""
        db = self._db()
        out = {"responses": db.execute("SELECT count(*) FROM responses").fetchone()[0]}
        for state, n in db.execute("SELECT state, count(*) FROM feedback GROUP BY state"):
            out[f"feedback_{state}"] = n
        out["pairs"] = db.execute("SELECT count(*) FROM comparisons WHERE json_array_length(responses) = 2").fetchone()[0]
        out["rankings"] = db.execute("SELECT count(*) FROM comparisons WHERE json_array_length(responses) > 2"
                                     ).fetchone()[0]
        out["demonstrations"] = db.execute("SELECT count(*) FROM demonstrations").fetchone()[0]
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

    def versions(self, kind: str | None = None, status: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first: each the record given to put_version plus ``version``, ``kind``, ``status``, ``created_at``."""
        sql = "SELECT version, kind, status, created_at, record FROM versions WHERE 1=1"
        args: list = []
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        if status:
            sql += " AND status=?"
            args.append(status)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        return [{**json.loads(rec), "version": v, "kind": k, "status": s, "created_at": t}
                for v, k, s, t, rec in self._db().execute(sql, args)]

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
