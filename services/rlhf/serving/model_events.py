"""Follows ``rlhf.models.v1`` on a background thread and applies its events to this replica's versions (the policy
and reward services both do).

Every replica must see every event, and what a replica loads lives in its memory only, so each replica reads the
whole topic from the start each time it starts, with a reader outside any consumer group (``Bus.reader``: every
partition assigned, no join, rebalance or session timeout, no group left behind per start), and applies the history
folded into one change (see PolicyManager.apply_events): it reaches the fleet's current split without loading every
version ever published. Its name (``<prefix>.<replica>.<boot id>``) is the Kafka client id the broker's logs and
quotas see.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from rlhf.bus import topics
from rlhf.bus.base import Bus, Message
from rlhf.bus.follower import TopicFollower
from rlhf.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

Apply = Callable[[Sequence[events_pb2.ModelEvent]], Coroutine[Any, Any, int]]


def version_of_folder(path: str, *, name: str, kind: int, version: str = "", uri: str = "") -> common_pb2.ModelVersion:
    """The ModelVersion of a save_pretrained folder a service starts with: ``version`` when given, else the one in its
    manifest.json, else the folder's name."""
    parent = ""
    if not version:
        from rlhf.core.models import read_manifest

        try:
            manifest = read_manifest(path)
            version, parent = manifest.version, manifest.parent or ""
        except (FileNotFoundError, ValueError):
            version = os.path.basename(os.path.normpath(path))
    return common_pb2.ModelVersion(name=name, version=version, kind=kind, parent_version=parent, uri=uri or path)


def group_id(prefix: str, replica: str) -> str:
    return f"{prefix}.{replica}.{uuid.uuid4().hex[:8]}"


def parse_events(messages: Sequence[Message],
                 on_unreadable: Callable[[], None] = lambda: None) -> list[events_pb2.ModelEvent]:
    """The ModelEvents of a batch of records; an unreadable record is counted (``on_unreadable``) and skipped."""
    out = []
    for message in messages:
        try:
            out.append(events_pb2.ModelEvent.FromString(message.value))
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError; anything unreadable is skipped
            on_unreadable()
            log.warning("unreadable record at %s[%d]@%d skipped", message.topic, message.partition, message.offset)
    return out


class ModelEventFollower(TopicFollower):
    """``start(loop)`` on the serving loop; ``apply`` runs there, the consumer on its own thread."""

    thread_name = "model-events"

    def __init__(self, bus: Bus, apply: Apply, *, group: str, poll_timeout_s: float = 0.5,
                 retry_s: float = 2.0, on_unreadable: Callable[[], None] = lambda: None) -> None:
        super().__init__(bus, [topics.MODELS], client_id=group, poll_timeout_s=poll_timeout_s, max_records=1000,
                         retry_s=retry_s)
        self.apply = apply
        self.on_unreadable = on_unreadable
        self.group = group
        """This replica's reader name (its Kafka client id); no consumer group is joined."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.caught_up = threading.Event()
        """Set once a poll came back empty: the history of the topic has been applied."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[override]
        self._loop = loop
        super().start()

    def idle(self) -> None:
        self.caught_up.set()

    def handle(self, messages: Sequence[Message]) -> bool:
        events = parse_events(messages, self.on_unreadable)
        if not events:
            return True
        future = asyncio.run_coroutine_threadsafe(self.apply(events), self._loop)  # type: ignore[arg-type]
        while not self.stopping:  # the apply may load versions for minutes
            try:
                future.result(timeout=0.5)
                return True
            except TimeoutError:
                continue
        future.cancel()
        return False
