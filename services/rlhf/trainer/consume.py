"""Consumption of rlhf.feedback.v1 and rlhf.responses.v1 into the dataset, on a thread of its own.

1. poll a batch (the group's consumer, manual commits); drop records of partitions the group took away without a
   revoke (``on_lost``: another member reads them again). Responses first: while the responses partitions lag by
   more than ``responses_ahead`` records, the feedback partitions are paused (for at most ``responses_ahead_s`` at
   a time, then read as long before they may be paused again), so that on a backlog (a restart, a trainer that
   was down) feedback finds the responses it names stored instead of waiting for them as pending rows (each
   written, held in the join index and rewritten: a backlog stored ~25% slower, benchmarks/README.md);
2. store it: records and offsets in one dataset transaction (``Dataset.store_partitions``), by default in a process
   of its own (:class:`~rlhf.trainer.dataset.StoreProcess`, which this thread hands the batch parsed: the process is
   the slower stage) while this thread polls the next batches: up to two
   batches in flight (one stored, one waiting in the process), so reading and storing overlap instead of taking
   turns (``store_process=False``: on this thread; also while the store process starts, a fresh interpreter's
   ~0.2 s, so that the first batches need not wait for it);
3. once a batch is stored (its transaction committed), commit the offsets it stored to Kafka, after handing the
   next batch to the store and without waiting for the broker's answer: advisory only, for the usual
   lag tools; on (re)assignment the dataset's own offsets win (``on_assigned`` seeks there; a batch still in flight
   then is delivered again and skipped by the dataset, whose transaction reads the offsets it stored), and on revoke
   the stored offsets are committed (asynchronously: the rebalance callbacks run on the client's network thread,
   where a blocking commit raises);
4. every ``housekeeping_s``, with no batch in flight: dead-letter what waited too long for its responses, publish the
   dead-letter outbox, refresh consumer lag and dataset sizes.

The bus down, or the store process gone: the loop logs, waits ``retry_s`` and rebuilds its consumer (and store
process); nothing stored is lost, nothing is stored twice. Paused: the consumer leaves the group (committing its
stored offsets) until resumed.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

from rlhf.bus import topics
from rlhf.bus.base import Bus, BusError, Consumer, PartitionRecords, RebalanceListener, TopicPartition
from rlhf.trainer import metrics
from rlhf.trainer.dataset import Dataset, StoreOutcome, StoreProcess

log = logging.getLogger(__name__)

TOPICS = (topics.FEEDBACK, topics.RESPONSES)


class FeedbackConsumer(RebalanceListener):
    def __init__(self, bus: Bus, dataset: Dataset, *, group: str, poll_timeout_s: float = 0.5,
                 max_records: int = 2000, housekeeping_s: float = 2.0, retry_s: float = 2.0,
                 unknown_from_start: bool = True, store_process: bool = True, responses_ahead: int = 10_000,
                 responses_ahead_s: float = 30.0,
                 on_stored: Callable[[StoreOutcome], None] = lambda outcome: None) -> None:
        self.bus = bus
        self.dataset = dataset
        self.group = group
        self.poll_timeout_s = poll_timeout_s
        self.max_records = max_records
        self.housekeeping_s = housekeeping_s
        self.retry_s = retry_s
        self.on_stored = on_stored
        self.unknown_from_start = unknown_from_start
        self.store_process = store_process
        """Store in a process of its own (:class:`StoreProcess`), else on this consumer's thread (0.49x against 0.41x
        of a raw consumer's rate, benchmarks/README.md; it needs a core of its own to pay)."""
        self.responses_ahead = responses_ahead
        """Step 1: feedback is paused while the responses lag by more than this many records (0: never)."""
        self.responses_ahead_s = responses_ahead_s
        """The longest feedback is paused for that at a time (then it is read at least as long): a responses topic
        that never catches up does not starve the feedback."""
        self._feedback_paused_since: float | None = None
        self._feedback_free_until = 0.0
        self._ends: dict[TopicPartition, int] = {}  # the responses partitions' end offsets, asked at _ends_at
        self._ends_at = 0.0
        self.lag: dict[TopicPartition, int] = {}
        self.consumed = {t: 0 for t in TOPICS}
        self.last_error = ""
        self._lost: set[TopicPartition] = set()
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: StoreProcess | _InlineStore | None = None
        self._inline = _InlineStore(dataset)  # stores while the store process starts
        self._in_flight: collections.deque[tuple[StoreProcess | _InlineStore, float]] = collections.deque()
        """The batches being stored, oldest first: where, and since when."""
        self._next_housekeeping = 0.0

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainer-consume", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.paused

    # ------------------------------------------------------------------------------------------ rebalances

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        with self._lost_lock:
            self._lost.difference_update(partitions)
        stored = self.dataset.stored_offsets()
        # A partition the dataset never stored is read from its start (offset 0: Kafka resets it to the oldest
        # record kept), whatever the group committed: the dataset's offsets win. Only a consumer configured to
        # skip history (auto_offset_reset=latest) leaves them to the group.
        return {tp: stored.get(tp, 0) for tp in partitions if tp in stored or self.unknown_from_start}

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        stored = self.dataset.stored_offsets()
        return {tp: stored[tp] for tp in partitions if tp in stored}

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None:
        with self._lost_lock:
            self._lost.update(partitions)

    # ------------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        consumer: Consumer | None = None
        self._next_housekeeping = 0.0
        while not self._stop.is_set():
            try:
                if self._paused.is_set():
                    consumer = self._close(consumer)
                    metrics.CONSUMING.set(0)
                    self._stop.wait(0.2)
                    continue
                if self._store is None:  # first: the process starts while the consumer joins its group
                    self._store = StoreProcess(self.dataset) if self.store_process else _InlineStore(self.dataset)
                if consumer is None:
                    consumer = self.bus.consumer(list(TOPICS), self.group, client_id=self.group, listener=self)
                metrics.CONSUMING.set(1)
                self._step(consumer)
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - the bus may be down: retry; the dataset keeps what it has
                self.last_error = f"{type(e).__name__}: {e}"
                metrics.CONSUMING.set(0)
                log.warning("consuming feedback: %s; retrying in %.0fs", self.last_error, self.retry_s)
                consumer = self._close(consumer, failed=True)
                self._stop.wait(self.retry_s)
        self._close(consumer)
        if self._store is not None:
            self._store.close()
            self._store = None
        metrics.CONSUMING.set(0)

    def _step(self, consumer: Consumer) -> None:
        assert self._store is not None
        while self._in_flight and self._in_flight[0][0].ready():
            self._commit(consumer, self._collect())  # 3. stored meanwhile: commit it now, not after a poll's timeout
        # 1. (the batches in flight are stored meanwhile; a short poll then, to commit them soon once stored; as
        # columns, one PartitionRecords a partition: no object per record)
        self._responses_first(consumer)
        batch = consumer.poll_partitions(
            self.poll_timeout_s if not self._in_flight else min(self.poll_timeout_s, 0.01), self.max_records)
        if not self.unknown_from_start:
            known = self.dataset.stored_offsets()
            unknown = [tp for tp in consumer.assignment() if tp not in known]
            if unknown:  # where "latest" put them: from now on the dataset's offsets decide
                first = {(part.topic, part.partition): min(part.offsets) for part in batch}
                positions = consumer.positions(unknown)
                self.dataset.mark_start({tp: first.get(tp, positions[tp]) for tp in unknown if tp in positions})
        if batch:
            with self._lost_lock:
                if self._lost:
                    batch = [part for part in batch if (part.topic, part.partition) not in self._lost]
        stored: list[StoreOutcome] = []
        # 2. on this thread while the store process starts (its imports take ~0.3 s); then in the process, with up
        # to StoreProcess.MAX_IN_FLIGHT batches in flight (the oldest waited for when that many are).
        store = self._store if self._store.started() else self._inline
        if batch:
            while len(self._in_flight) >= store.MAX_IN_FLIGHT:
                stored.append(self._collect())
        if time.monotonic() >= self._next_housekeeping:
            while self._in_flight:  # 4. between batches: its writes never wait for one being stored
                stored.append(self._collect())
            for outcome in stored:
                self._commit(consumer, outcome)
            stored = []
            self._housekeeping(consumer)
            self._next_housekeeping = time.monotonic() + self.housekeeping_s
        try:
            if batch:
                self._in_flight.append((store, time.perf_counter()))
                store.submit(batch)
        finally:
            for outcome in stored:
                self._commit(consumer, outcome)  # 3. for the batches stored, while the next ones are being stored

    ENDS_S = 1.0
    """How old the responses partitions' end offsets may be when step 1 decides (one request a second at most)."""

    def _responses_first(self, consumer: Consumer) -> None:
        """1.: pause the feedback partitions while the responses lag (their ends asked at most every ``ENDS_S``,
        their positions local), for at most ``responses_ahead_s`` at a time; resume them once the responses
        caught up."""
        if not self.responses_ahead:
            return
        held = consumer.assignment()
        feedback = [tp for tp in held if tp[0] == topics.FEEDBACK]
        responses = [tp for tp in held if tp[0] == topics.RESPONSES]
        now = time.monotonic()
        behind = 0
        if feedback and responses:
            if now >= self._ends_at + self.ENDS_S or any(tp not in self._ends for tp in responses):
                self._ends, self._ends_at = consumer.end_offsets(responses), now
            positions = consumer.positions(responses)
            behind = sum(max(0, self._ends.get(tp, 0) - positions.get(tp, 0)) for tp in responses)
        if self._feedback_paused_since is None:
            if behind > self.responses_ahead and now >= self._feedback_free_until:
                consumer.pause(feedback)
                self._feedback_paused_since = now
                metrics.FEEDBACK_PAUSED.set(1)
                log.info("the responses are %d records behind: feedback waits for them (at most %.0fs)", behind,
                         self.responses_ahead_s)
        elif behind > self.responses_ahead and now - self._feedback_paused_since < self.responses_ahead_s:
            consumer.pause(feedback)  # (again: a partition assigned since starts resumed)
        else:
            consumer.resume(feedback)
            if behind > self.responses_ahead:  # it waited its longest: read it as long before it waits again
                self._feedback_free_until = now + self.responses_ahead_s
            self._feedback_paused_since = None
            metrics.FEEDBACK_PAUSED.set(0)

    def _drain(self, consumer: Consumer, wait: bool = False) -> None:
        """Wait for the batches in flight to be stored, committing the offsets of each to Kafka."""
        while self._in_flight:
            self._commit(consumer, self._collect(), wait)

    def _collect(self) -> StoreOutcome:
        """Wait for the oldest batch in flight to be stored: its outcome (counted)."""
        store, started = self._in_flight.popleft()
        outcome = store.result()
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        self._count(outcome)
        return outcome

    def _commit(self, consumer: Consumer, outcome: StoreOutcome, wait: bool = False) -> None:
        """3.: the advisory commit of a stored batch: the offsets its transaction stored (per partition, not a pass
        over its records; none when the whole batch had been stored before), without waiting for the broker's
        answer (a round trip per batch otherwise) unless ``wait`` (the last one, before closing)."""
        try:
            if outcome.offsets:
                (consumer.commit_offsets if wait else consumer.commit_offsets_async)(outcome.offsets)
        except BusError as e:
            log.info("advisory commit failed (the dataset's offsets are what counts): %s", e)
        self.on_stored(outcome)

    def _count(self, outcome: StoreOutcome) -> None:
        for topic, n in outcome.consumed.items():
            metrics.CONSUMED.labels(topic).inc(n)
            self.consumed[topic] = self.consumed.get(topic, 0) + n
        for kind, n in outcome.stored.items():
            metrics.STORED.labels(kind).inc(n)
        for kind, n in outcome.duplicates.items():
            metrics.DUPLICATES.labels(kind).inc(n)
        for reason, n in outcome.dead.items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)

    def _housekeeping(self, consumer: Consumer) -> None:
        """4."""
        self._count(self.dataset.expire())
        self.publish_dead_letters()
        ends = consumer.end_offsets(consumer.assignment())
        stored = self.dataset.stored_offsets()
        self.lag = {tp: max(0, end - stored.get(tp, 0)) for tp, end in ends.items()}
        for (topic, partition), lag in self.lag.items():
            metrics.LAG.labels(topic, str(partition)).set(lag)
        for kind, n in self.dataset.sizes().items():
            metrics.DATASET.labels(kind).set(n)

    def publish_dead_letters(self, timeout_s: float = 30.0) -> int:
        """Send the outbox to rlhf.feedback.v1.dlq; a letter leaves the outbox once durable there."""
        letters = self.dataset.dead_letters()
        if not letters:
            return 0
        outcomes = self.bus.send_batch(topics.FEEDBACK_DLQ, [(d.payload, d.event_id.encode()) for d in letters]
                                       ).result(timeout_s)
        sent = [d.id for d, o in zip(letters, outcomes, strict=True) if not isinstance(o, BusError)]
        self.dataset.dead_letters_sent(sent)
        metrics.DEAD_LETTERS_PUBLISHED.inc(len(sent))
        return len(sent)

    def _close(self, consumer: Consumer | None, failed: bool = False) -> None:
        """Finish the batches in flight (committing them), then close the consumer. After a failure the store
        process is restarted with the consumer (a batch it was storing is committed whole or not at all, and read
        again unless stored; one after a failed batch is not stored)."""
        if consumer is not None and self._in_flight and not failed:
            try:
                self._drain(consumer, wait=True)
            except Exception:  # noqa: BLE001 - not stored (or not committed to Kafka): read again
                log.warning("storing the last batches before closing failed", exc_info=True)
                failed = True
        if self._in_flight or failed:
            self._in_flight.clear()
            if self._store is not None:
                self._store.close()
                self._store = None
        if consumer is not None:
            try:
                consumer.close()
            except Exception:  # noqa: BLE001
                log.debug("closing the feedback consumer failed", exc_info=True)
        self._feedback_paused_since, self._ends = None, {}  # (a new consumer starts with nothing paused)
        metrics.FEEDBACK_PAUSED.set(0)
        return None


class _InlineStore:
    """:class:`StoreProcess`'s interface on the consumer's own thread (``store_process=False``)."""

    MAX_IN_FLIGHT = 1  # (stored at once, in submit)

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._outcome: StoreOutcome | None = None

    def submit(self, batch: Sequence[PartitionRecords]) -> None:
        self._outcome = self.dataset.store_partitions(batch)

    def started(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def result(self) -> StoreOutcome:
        outcome, self._outcome = self._outcome, None
        assert outcome is not None
        return outcome

    def close(self) -> None:
        self._outcome = None
