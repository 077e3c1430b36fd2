"""A background thread that follows topics with a reader outside any consumer group, and keeps following while the
bus goes down and comes back.

The model-event followers of the policy and reward services and the rollout workers' prompt feed each read whole
topics from where they left off (``Bus.reader``: every partition assigned, no group). What they share lives here:
the thread, stop, the per-partition position after the last handled record, and the retry loop (on any error the
reader is closed, the thread waits ``retry_s`` and makes a new reader that starts after the last handled record, so
nothing handled is handed over again and nothing unhandled is skipped). A subclass says what a poll's records do
(:meth:`TopicFollower.handle`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from rlhf.bus.base import Bus, Consumer, Message

log = logging.getLogger(__name__)


class TopicFollower:
    """Reads ``topics`` on a thread named ``thread_name`` and hands each poll's records to :meth:`handle`."""

    thread_name = "topic-follower"

    def __init__(self, bus: Bus, topic_names: Sequence[str], *, client_id: str, poll_timeout_s: float = 0.5,
                 max_records: int = 1000, retry_s: float = 2.0) -> None:
        self.bus = bus
        self.topics = list(topic_names)
        self.client_id = client_id
        """The reader's name (its Kafka client id); no consumer group is joined."""
        self.poll_timeout_s = poll_timeout_s
        self.max_records = max_records
        self.retry_s = retry_s
        self.last_error = ""
        """The last error of the loop ("" once a poll succeeded again)."""
        self._next: dict[tuple[str, int], int] = {}
        """Per partition, the offset after the last handled record: a reader made again after an error goes on there."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------- what a subclass says

    def handle(self, messages: Sequence[Message]) -> bool:
        """Use one poll's records (never empty). Return False when stopped before they were used: their positions
        are then not advanced. An exception makes the loop retry with a new reader, from the same position."""
        raise NotImplementedError

    def idle(self) -> None:
        """Called after a poll that returned nothing (the reader has caught up with the topics)."""

    # ---------------------------------------------------------------------------------- the thread

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer: Consumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self.bus.reader(self.topics, client_id=self.client_id, start_at=dict(self._next))
                messages = consumer.poll(self.poll_timeout_s, max_records=self.max_records)
                self.last_error = ""
                if not messages:
                    self.idle()
                    continue
                if not self.handle(messages):
                    break
                for m in messages:
                    key = (m.topic, m.partition)
                    self._next[key] = max(self._next.get(key, 0), m.offset + 1)
            except Exception as e:  # noqa: BLE001 - the bus may be down: retry with a new reader
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("following %s: %s; retrying in %.0fs", ", ".join(self.topics), self.last_error,
                            self.retry_s)
                consumer = _close(consumer)
                self._stop.wait(self.retry_s)
        _close(consumer)


def _close(consumer: Consumer | None) -> None:
    if consumer is None:
        return None
    try:
        consumer.close()
    except Exception:  # noqa: BLE001 - closing a reader of a bus that is down may fail; nothing is lost
        log.debug("closing a topic reader failed", exc_info=True)
    return None
