"""The message bus: :class:`Bus`, a Kafka implementation and an in-process one, and ``bus_from_url``.

Importing this package imports neither kafka-python nor the Kafka implementation; ``KafkaBus`` / ``KafkaConfig``
load it on first use.
"""
from __future__ import annotations

import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from rlhf.bus import topics
from rlhf.bus.base import Bus, BusError, BusUnavailable, Consumer, Message, RecordMetadata, TopicSpec
from rlhf.bus.memory import InMemoryBus

if TYPE_CHECKING:
    from rlhf.bus.kafka import KafkaBus, KafkaConfig

__all__ = [
    "Bus", "BusError", "BusUnavailable", "Consumer", "Message", "RecordMetadata", "TopicSpec",
    "InMemoryBus", "KafkaBus", "KafkaConfig", "bus_from_url", "topics",
]

_LAZY = {"KafkaBus", "KafkaConfig"}
_named_memory_buses: dict[str, InMemoryBus] = {}
_named_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from rlhf.bus import kafka

        return getattr(kafka, name)
    raise AttributeError(f"module 'rlhf.bus' has no attribute {name!r}")


def bus_from_url(url: str) -> Bus:
    """The bus a config string names.

    * ``kafka://host:port[,host:port...][?field=value...]`` -> :class:`KafkaBus` (fields of :class:`KafkaConfig`,
      e.g. ``kafka://127.0.0.1:19092?linger_s=0.01&client_id=feedback``);
    * ``memory://`` -> a new private :class:`InMemoryBus`;
    * ``memory://NAME`` -> the process-wide InMemoryBus called NAME, so that services embedded in one process and
      configured with the same string share one bus.
    """
    if not isinstance(url, str):
        raise TypeError(f"bus URL must be a str, got {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "kafka":
        from rlhf.bus.kafka import KafkaBus, KafkaConfig

        return KafkaBus(KafkaConfig.from_url(url))
    if scheme == "memory":
        name = urllib.parse.urlsplit(url).netloc
        if not name:
            return InMemoryBus()
        with _named_lock:
            bus = _named_memory_buses.get(name)
            if bus is None or bus._closed:
                bus = _named_memory_buses[name] = InMemoryBus()
            return bus
    raise ValueError(f"unknown bus URL {url!r}: expected kafka://host:port[,host:port] or memory://[name]")
