"""The bus on Apache Kafka, through kafka-python 3.x.

Where time goes on the send path, and why it is split in two:

* ``KafkaProducer.send`` only appends to an in-memory batch when the producer exists and knows the topic's
  partitions. Then :meth:`KafkaBus.send` calls it directly on the caller's thread (the fast path: a few
  microseconds over the raw producer, see benchmarks/kafka_bus_overhead.py).
* Otherwise ``KafkaProducer.send`` blocks: creating the producer bootstraps a connection, and the first send to a
  topic waits for its metadata, each up to ``max_block_s``, and longer while the broker is down. Those sends go to
  one background thread (the slow path), so ``send`` returns at once and never stalls an asyncio event loop. While
  slow-path sends are queued, later sends queue behind them, which keeps the order of each key.
* ``send_batch`` takes the fast path for a whole batch at once (:mod:`rlhf.bus.kafka_batch`: partitions for every
  key in one numpy pass, one accumulator lock per partition, one callback per kafka-python batch), a fraction of
  the Python work of ``KafkaProducer.send`` per record; otherwise it is one ``send`` per record.

Every future resolves: with the record's position once the broker has it on all in-sync replicas (``acks=all``,
idempotent producer, so retries never duplicate), or with :class:`BusUnavailable` after ``delivery_timeout_s``
(broker unreachable) or :class:`BusError` (e.g. a record too large).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import kafka
import kafka.errors as kerr
from kafka.structs import OffsetAndMetadata, TopicPartition

from rlhf.bus import kafka_batch, kafka_fetch
from rlhf.bus.base import (
    BatchResults, Bus, BusError, BusUnavailable, Consumer, Message, PartitionRecords, RebalanceListener,
    RecordMetadata, TopicSpec, check_poll, check_record, check_topic_specs,
)
from rlhf.bus.base import TopicPartition as TopicPartition_  # (topic, partition); kafka's TopicPartition is a struct

log = logging.getLogger(__name__)

T = TypeVar("T")

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_COMPRESSION = (None, "gzip", "snappy", "lz4", "zstd")


@dataclasses.dataclass(frozen=True)
class KafkaConfig:
    """Everything :class:`KafkaBus` needs to reach a cluster. Times in seconds, sizes in bytes."""

    bootstrap_servers: str = "127.0.0.1:19092"
    """Comma-separated ``host:port`` of brokers to learn the cluster from (default: deploy/local/infra.py's)."""
    client_id: str = "rlhf"
    """Name the broker shows in logs, metrics and quotas; consumers get ``<client_id>-consumer`` unless given one."""
    linger_s: float = 0.005
    """How long the producer waits to fill a batch before sending it. A few milliseconds turn one request per record
    into one per batch, which is most of the producer's throughput at small records; it costs that much latency."""
    batch_size_bytes: int = 256 * 1024
    """Largest batch per partition. Larger batches amortise request overhead under load; memory is per partition."""
    compression: str | None = None
    """Batch compression: None, ``gzip``, ``snappy``, ``lz4`` or ``zstd`` (the last three need their Python package)."""
    delivery_timeout_s: float = 30.0
    """Longest time from ``send`` to its future resolving. The idempotent producer retries until then (so a broker
    restart inside this window loses and duplicates nothing), then fails the future with BusUnavailable.
    Kafka requires it to be at least ``linger_s + request_timeout_s``."""
    max_block_s: float = 5.0
    """Longest wait for cluster metadata before a send fails: connecting the producer and learning a topic's
    partitions. A send whose topic is unknown resolves (fails) within 2 x max_block_s when the broker is down."""
    request_timeout_s: float = 10.0
    """Longest wait for the broker to answer one request (produce, fetch, commit, admin) before it counts as failed."""
    max_request_size_bytes: int = 1024 * 1024
    """Largest produce request, hence largest record; a bigger record fails with BusError before it is sent. The
    broker's ``message.max.bytes`` (about 1 MiB by default) must allow it."""
    session_timeout_s: float = 10.0
    """A consumer that stops heartbeating for this long leaves its group and its partitions are reassigned. Brokers
    accept 6..1800 s by default (group.min/max.session.timeout.ms)."""
    heartbeat_interval_s: float = 1.0
    """How often a consumer heartbeats, hence how soon it notices that the group rebalances (a member joined or
    left) and that a partition moves; below session_timeout_s / 3."""
    auto_offset_reset: str = "earliest"
    """Where a consumer starts a partition its group has no committed offset for (and its listener names none):
    ``earliest`` (everything the topic keeps: what a new trainer must read) or ``latest`` (only records written
    after it joined)."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER with a SASL_* protocol."""
    sasl_username: str | None = None
    """SASL user (PLAIN / SCRAM)."""
    sasl_password: str | None = dataclasses.field(default=None, repr=False)
    """SASL password (PLAIN / SCRAM); kept out of repr."""
    ssl_cafile: str | None = None
    """CA bundle (PEM) to verify the brokers' certificates with; None uses the system's."""
    ssl_certfile: str | None = None
    """Client certificate (PEM) for mutual TLS."""
    ssl_keyfile: str | None = None
    """Private key (PEM) of the client certificate."""
    ssl_password: str | None = dataclasses.field(default=None, repr=False)
    """Password of ``ssl_keyfile``; kept out of repr."""
    ssl_check_hostname: bool = True
    """Check that a broker's certificate names the host connected to."""
    fetch_partition_bytes: int = 8 * 1024 * 1024
    """Most bytes a consumer fetches from one partition per request (kafka-python's ``max_partition_fetch_bytes``,
    1 MiB by default). At 1 MiB a backlog of small records is read in many round trips, each leaving the consumer
    idle while the broker answers: a raw kafka-python consumer read 150,000 records at ~70,000 records/s with 1 MiB
    and ~110,000 with 8 MiB (benchmarks/README.md). Memory: up to this much is buffered per assigned partition (a
    response is capped at 50 MiB whatever the number of partitions). It must hold the largest record batch."""
    fast_fetch: bool = True
    """Consumers decode fetched record batches with :mod:`rlhf.bus.kafka_records` (about half a raw kafka-python
    consumer's CPU a record: its own decoding was most of it; see :mod:`rlhf.bus.kafka_fetch` for where and why it
    falls back to the client's). False: kafka-python decodes them itself."""

    def __post_init__(self) -> None:
        servers = [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]
        if not servers:
            raise ValueError("KafkaConfig.bootstrap_servers is empty; give host:port[,host:port...]")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"KafkaConfig.bootstrap_servers: {server!r} is not host:port")
        for name in ("linger_s", "delivery_timeout_s", "max_block_s", "request_timeout_s", "session_timeout_s",
                     "heartbeat_interval_s"):
            if getattr(self, name) < 0 or (name != "linger_s" and getattr(self, name) == 0):
                raise ValueError(f"KafkaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.request_timeout_s <= 0.5:
            raise ValueError("KafkaConfig.request_timeout_s must exceed the consumer's 0.5 s fetch wait")
        if self.delivery_timeout_s < self.linger_s + self.request_timeout_s:
            raise ValueError(
                f"KafkaConfig.delivery_timeout_s ({self.delivery_timeout_s}) must be >= linger_s + request_timeout_s "
                f"({self.linger_s} + {self.request_timeout_s}); raise it or lower request_timeout_s"
            )
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(
                f"KafkaConfig.heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most a third of "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"KafkaConfig.auto_offset_reset must be 'earliest' or 'latest', got {self.auto_offset_reset!r}")
        if self.batch_size_bytes < 1 or self.max_request_size_bytes < 1:
            raise ValueError("KafkaConfig.batch_size_bytes and max_request_size_bytes must be positive")
        if self.fetch_partition_bytes < 1024:
            raise ValueError(f"KafkaConfig.fetch_partition_bytes must be at least 1024, got {self.fetch_partition_bytes}")
        if self.compression not in _COMPRESSION:
            raise ValueError(f"KafkaConfig.compression must be one of {_COMPRESSION}, got {self.compression!r}")
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            raise ValueError(
                f"KafkaConfig.security_protocol must be one of {_SECURITY_PROTOCOLS}, got {self.security_protocol!r}"
            )
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(f"KafkaConfig.security_protocol={self.security_protocol} needs sasl_mechanism")

    @classmethod
    def from_url(cls, url: str) -> KafkaConfig:
        """``kafka://host:port[,host:port...][?field=value&...]``; fields are this class's, e.g. ``?linger_s=0.01``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "kafka":
            raise ValueError(f"not a kafka:// URL: {url!r}")
        kwargs: dict[str, Any] = {"bootstrap_servers": parts.netloc}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name not in fields or name == "bootstrap_servers":
                raise ValueError(f"unknown KafkaConfig field {name!r} in {url!r}; known: {', '.join(fields)}")
            default = fields[name].default
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{name}={value!r} in {url!r} is not a boolean")
                kwargs[name] = value.lower() in ("true", "1")
            elif isinstance(default, (int, float)):
                try:
                    kwargs[name] = type(default)(value)
                except ValueError:
                    raise ValueError(f"{name}={value!r} in {url!r} is not a {type(default).__name__}") from None
            else:
                kwargs[name] = value or None
        return cls(**kwargs)

    # -- kafka-python keyword arguments

    def _client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "request_timeout_ms": int(self.request_timeout_s * 1000),
            "bootstrap_timeout_ms": int(self.max_block_s * 1000),
            # Reconnect quickly after a broker restart (the library's default backs off up to 30 s).
            "reconnect_backoff_max_ms": 1000,
            "security_protocol": self.security_protocol,
            "ssl_check_hostname": self.ssl_check_hostname,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``kafka.KafkaProducer`` for this config."""
        return {
            **self._client_kwargs(),
            "client_id": self.client_id,
            # The defaults of kafka-python 3.x, set explicitly because the platform depends on them (DESIGN.md).
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": int(self.linger_s * 1000),
            "batch_size": self.batch_size_bytes,
            "compression_type": self.compression,
            "delivery_timeout_ms": int(self.delivery_timeout_s * 1000),
            "max_block_ms": int(self.max_block_s * 1000),
            "max_request_size": self.max_request_size_bytes,
        }

    def consumer_kwargs(self, group_id: str, client_id: str | None) -> dict[str, Any]:
        """Keyword arguments of ``kafka.KafkaConsumer`` for a member of ``group_id``."""
        return {
            **self._client_kwargs(),
            "client_id": client_id or f"{self.client_id}-consumer",
            "group_id": group_id,
            "enable_auto_commit": False,  # at-least-once: commit after the work is durable
            "auto_offset_reset": self.auto_offset_reset,  # earliest: a new group reads what was written before it
            "session_timeout_ms": int(self.session_timeout_s * 1000),
            "heartbeat_interval_ms": int(self.heartbeat_interval_s * 1000),
            "max_partition_fetch_bytes": self.fetch_partition_bytes,
        }

    def reader_kwargs(self, client_id: str | None) -> dict[str, Any]:
        """Keyword arguments of ``kafka.KafkaConsumer`` for a reader outside any group (assigned partitions)."""
        return {
            **self._client_kwargs(),
            "client_id": client_id or f"{self.client_id}-reader",
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": self.fetch_partition_bytes,
        }

    def admin_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``kafka.KafkaAdminClient``."""
        return {**self._client_kwargs(), "client_id": f"{self.client_id}-admin"}


# Errors that mean "cannot reach the cluster now" (retrying later may succeed); everything else is a BusError.
_UNAVAILABLE: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        getattr(kerr, name, None)
        for name in (
            "KafkaTimeoutError", "KafkaConnectionError", "NoBrokersAvailable", "NodeNotReadyError",
            "RequestTimedOutError", "NetworkExceptionError", "BrokerNotAvailableError", "LeaderNotAvailableError",
            "NotLeaderForPartitionError", "NotEnoughReplicasError", "NotEnoughReplicasAfterAppendError",
            "CoordinatorNotAvailableError", "CoordinatorLoadInProgressError", "NotCoordinatorError",
            "MetadataEmptyBrokerList", "NotControllerError", "KafkaStorageError",
        )
    )
    if cls is not None
) + (ConnectionError, TimeoutError, concurrent.futures.TimeoutError)


def _bus_error(exc: BaseException, context: str) -> BusError:
    """The BusError (or BusUnavailable) to raise for ``exc``, with ``exc`` as its cause."""
    if isinstance(exc, BusError):
        return exc
    cls = BusUnavailable if isinstance(exc, _UNAVAILABLE) else BusError
    detail = str(exc)
    name = type(exc).__name__
    err = cls(f"{context}: {detail if detail.startswith(name) else f'{name}: {detail}'}")
    err.__cause__ = exc
    return err


_ATTACH_LOCK = threading.Lock()


def _on_kafka_done(kfut: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(value_or_exception)`` when a kafka-python future resolves (at once if it has)."""
    both = getattr(kfut, "_add_cb_eb", None)  # one lock round trip instead of two (kafka-python >= 3)
    if both is not None:
        both(callback, callback)
    else:
        kfut.add_callback(callback)
        kfut.add_errback(callback)


class _SendFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of one sent record.

    Made for the hot path. A plain ``concurrent.futures.Future`` per record (a Condition, its own callbacks and
    result, a notify from the producer's sender thread) costs about as much again as ``KafkaProducer.send``
    itself. So a future of the fast path answers its public methods (``done``, ``result``, ``exception``,
    ``add_done_callback``, ``cancel``, ...) straight from kafka-python's record future, and builds the
    RecordMetadata / BusError once, when first asked. Only code that reaches into the base class's internals
    (``concurrent.futures.wait`` / ``as_completed``, ``repr``) makes it initialise the base class (``__getattr__``
    sees the missing attribute), after which both views agree. A queued record cannot be taken back: the future
    is RUNNING until resolved and ``cancel()`` returns False.

    Futures of the slow path and immediate failures (``kfut`` None) are ordinary Futures resolved by
    ``_bind`` / ``_fail``.
    """

    def __init__(self, topic: str, kfut: Any = None) -> None:  # base __init__ deferred on purpose
        self._topic = topic
        self._kfut = kfut
        self._outcome: RecordMetadata | BusError | None = None
        if kfut is None:
            self._attach()

    # -- the base class, on demand

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set yet: the base class's state before anything needed it.
        if name.startswith("__"):
            raise AttributeError(name)
        self._attach()
        return object.__getattribute__(self, name)

    def _attach(self) -> None:
        with _ATTACH_LOCK:
            if "_attached" in self.__dict__:
                return
            concurrent.futures.Future.__init__(self)
            concurrent.futures.Future.set_running_or_notify_cancel(self)
            self._attached = True
        if self._kfut is not None:
            _on_kafka_done(self._kfut, self._copy_outcome)

    def _copy_outcome(self, _: Any) -> None:
        out = self._resolve()
        if isinstance(out, BaseException):
            concurrent.futures.Future.set_exception(self, out)
        else:
            concurrent.futures.Future.set_result(self, out)

    # -- slow path / immediate failure

    def _bind(self, kfut: Any) -> None:
        """Resolve from a kafka future obtained later (slow path)."""
        def copy(value: Any) -> None:
            if isinstance(value, BaseException):
                self.set_exception(_bus_error(value, f"send to {self._topic!r} failed"))
            else:
                self.set_result(RecordMetadata(value.topic, value.partition, value.offset))

        _on_kafka_done(kfut, copy)

    def _fail(self, exc: BaseException) -> _SendFuture:
        self.set_exception(exc)
        return self

    # -- the public API, straight from the kafka future on the fast path

    def _resolve(self) -> RecordMetadata | BusError:
        out = self._outcome
        if out is None:
            k = self._kfut
            if k.exception is not None:
                out = _bus_error(k.exception, f"send to {self._topic!r} failed")
            else:
                out = RecordMetadata(k.value.topic, k.value.partition, k.value.offset)
            self._outcome = out
        return out

    def _wait(self, timeout: float | None) -> None:
        k = self._kfut
        if k.is_done:
            return
        event = threading.Event()
        _on_kafka_done(k, lambda _: event.set())
        if not event.wait(timeout):
            raise concurrent.futures.TimeoutError()

    def done(self) -> bool:
        k = self._kfut
        return k.is_done if k is not None else super().done()

    def running(self) -> bool:
        return not self.done() if self._kfut is not None else super().running()

    def cancelled(self) -> bool:
        return False if self._kfut is not None else super().cancelled()

    def cancel(self) -> bool:
        return False if self._kfut is not None else super().cancel()

    def result(self, timeout: float | None = None) -> RecordMetadata:
        if self._kfut is None:
            return super().result(timeout)
        self._wait(timeout)
        out = self._resolve()
        if isinstance(out, BaseException):
            raise out
        return out

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._kfut is None:
            return super().exception(timeout)
        self._wait(timeout)
        out = self._resolve()
        return out if isinstance(out, BaseException) else None

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future], object]) -> None:
        if self._kfut is None:
            return super().add_done_callback(fn)

        def call(_: Any) -> None:
            try:
                fn(self)
            except Exception:
                log.exception("exception calling callback for %r", self)

        _on_kafka_done(self._kfut, call)


def _construct(cls: type[T], *args: Any, **kwargs: Any) -> T:
    """``cls(*args, **kwargs)`` for kafka-python's KafkaConsumer / KafkaAdminClient, without their leak.

    kafka-python 3.0 starts a client's network thread before bootstrapping in these constructors and leaves it
    running when bootstrapping fails (cluster unreachable): one thread per failed attempt, and health checks retry
    forever. Keep a reference to the half-built object and shut its parts down.
    """
    obj = cls.__new__(cls)
    try:
        obj.__init__(*args, **kwargs)  # type: ignore[misc]
    except BaseException:
        for name, method in (("_client", "close"), ("_net", "stop"), ("_metrics", "close")):
            part = getattr(obj, name, None)
            if part is not None:
                with contextlib.suppress(Exception):  # best effort on a half-built object
                    getattr(part, method)()
        raise
    return obj


class _Listener(kafka.ConsumerRebalanceListener):
    """Our RebalanceListener on kafka-python's (sync) listener, which runs on the client's network thread: seeking
    only sets the fetch position and ``commit_async`` only queues a request, so neither blocks there (a blocking
    ``commit`` raises "Cannot block on net.run() from the IO thread itself" in kafka-python 3.x)."""

    def __init__(self, listener: RebalanceListener) -> None:
        self.listener = listener
        self.consumer: kafka.KafkaConsumer | None = None

    def on_partitions_assigned(self, assigned: Any) -> None:
        mine = sorted((tp.topic, tp.partition) for tp in assigned)
        if not mine:
            return
        positions = self.listener.on_assigned(mine)
        for (topic, partition), offset in positions.items():
            if (topic, partition) in mine:
                self.consumer.seek(TopicPartition(topic, partition), offset)  # type: ignore[union-attr]

    def on_partitions_revoked(self, revoked: Any) -> None:
        mine = sorted((tp.topic, tp.partition) for tp in revoked)
        offsets = {tp: o for tp, o in self.listener.on_revoked(mine).items() if tp in mine} if mine else {}
        if offsets:
            try:
                self.consumer.commit_async(  # type: ignore[union-attr]
                    {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
            except Exception:  # noqa: BLE001 - advisory: the owner's own offsets win on assignment anyway
                log.warning("committing offsets of revoked partitions failed", exc_info=True)

    def on_partitions_lost(self, lost: Any) -> None:
        self.listener.on_lost(sorted((tp.topic, tp.partition) for tp in lost))


def _log_failed_commit(offsets: Any, response: Any) -> None:
    """kafka-python's callback of an asynchronous commit: ``response`` is an exception when it failed."""
    if isinstance(response, BaseException):
        log.info("asynchronous commit of %d partitions failed: %s", len(offsets), response)


class KafkaGroupConsumer(Consumer):
    """A member of a consumer group with manual commits (wraps ``kafka.KafkaConsumer``)."""

    def __init__(self, consumer: kafka.KafkaConsumer, request_timeout_s: float) -> None:
        self._c = consumer
        self._request_timeout_ms = int(request_timeout_s * 1000)
        self._closed = False
        self._pauses = False  # pause() was called: each poll then works around kafka_fetch.unpark's bug

    def commit_offsets(self, offsets: dict[TopicPartition_, int]) -> None:
        if self._closed:
            raise BusError("commit on a closed consumer")
        if not offsets:
            return
        try:
            self._c.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                           timeout_ms=self._request_timeout_ms)
        except kerr.CommitFailedError as e:
            raise BusError(f"commit failed: the group rebalanced ({e})") from e
        except Exception as e:
            raise _bus_error(e, "commit failed") from e

    def commit_offsets_async(self, offsets: dict[TopicPartition_, int]) -> None:
        """Queues the commit on the client (sent by its network thread; no round trip waited for here)."""
        if self._closed:
            raise BusError("commit on a closed consumer")
        if not offsets:
            return
        try:
            self._c.commit_async({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                                 callback=_log_failed_commit)
        except Exception as e:
            raise _bus_error(e, "commit failed") from e

    def assignment(self) -> list[TopicPartition_]:
        return sorted((tp.topic, tp.partition) for tp in self._c.assignment())

    def end_offsets(self, partitions: Sequence[TopicPartition_]) -> dict[TopicPartition_, int]:
        if not partitions:
            return {}
        try:
            ends = self._c.end_offsets([TopicPartition(t, p) for t, p in partitions])
        except Exception as e:
            raise _bus_error(e, "end_offsets failed") from e
        return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def positions(self, partitions: Sequence[TopicPartition_]) -> dict[TopicPartition_, int]:
        out = {}
        held = set(self.assignment())
        for t, p in partitions:
            if (t, p) in held:
                try:
                    out[(t, p)] = int(self._c.position(TopicPartition(t, p), timeout_ms=self._request_timeout_ms))
                except Exception as e:
                    raise _bus_error(e, "position failed") from e
        return out

    def pause(self, partitions: Sequence[TopicPartition_]) -> None:
        tps = self._held("pause", partitions)
        if tps:
            self._pauses = True
            self._c.pause(*tps)

    def resume(self, partitions: Sequence[TopicPartition_]) -> None:
        tps = self._held("resume", partitions)
        if tps:
            self._c.resume(*tps)

    def _held(self, what: str, partitions: Sequence[TopicPartition_]) -> list[TopicPartition]:
        """Those of ``partitions`` this member holds (kafka-python raises for the others), as its TopicPartitions."""
        if self._closed:
            raise BusError(f"{what} on a closed consumer")
        held = self._c.assignment()
        return [tp for tp in (TopicPartition(t, p) for t, p in partitions) if tp in held]

    def _poll(self, timeout_s: float, max_records: int) -> dict:
        """kafka-python's ``{TopicPartition: [ConsumerRecord, ...]}`` of one poll, its errors as BusError."""
        if self._closed:
            raise BusError("poll on a closed consumer")
        check_poll(timeout_s, max_records)
        if self._pauses:
            kafka_fetch.unpark(self._c)
        try:
            return self._c.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except Exception as e:
            raise _bus_error(e, "poll failed") from e

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Message]:
        batches = self._poll(timeout_s, max_records)
        return [
            Message(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers) if r.headers else (), r.timestamp)
            for records in batches.values()
            for r in records
        ]

    def poll_partitions(self, timeout_s: float = 1.0, max_records: int = 500) -> list[PartitionRecords]:
        """See :meth:`Consumer.poll_partitions`: the columns straight from kafka-python's
        ``{TopicPartition: [ConsumerRecord, ...]}`` (one poll, like :meth:`poll`), no Message built."""
        batches = self._poll(timeout_s, max_records)
        return [
            PartitionRecords(tp.topic, tp.partition, [r.offset for r in rs], [r.value for r in rs])
            for tp, rs in batches.items()
            if rs
        ]

    def commit(self, messages: Sequence[Message] | None = None) -> None:
        if self._closed:
            raise BusError("commit on a closed consumer")
        offsets = None
        if messages is not None:
            highest: dict[tuple[str, int], int] = {}
            for m in messages:
                tp = (m.topic, m.partition)
                if m.offset > highest.get(tp, -1):
                    highest[tp] = m.offset
            if not highest:
                return
            offsets = {TopicPartition(t, p): OffsetAndMetadata(o + 1, "", -1) for (t, p), o in highest.items()}
        try:
            self._c.commit(offsets, timeout_ms=self._request_timeout_ms)
        except kerr.CommitFailedError as e:
            raise BusError(
                f"commit failed: the group rebalanced and these partitions moved to another member, "
                f"which will receive the records again ({e})"
            ) from e
        except Exception as e:
            raise _bus_error(e, "commit failed") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._c.close(autocommit=False, timeout_ms=self._request_timeout_ms)
        except Exception:  # leaving a group whose broker is gone is not worth an error
            log.warning("closing a Kafka consumer failed", exc_info=True)


class KafkaReader(KafkaGroupConsumer):
    """Assigned partitions outside any group (``KafkaBus.reader``): commits are no-ops."""

    def commit(self, messages: Sequence[Message] | None = None) -> None:
        if self._closed:
            raise BusError("commit on a closed reader")

    def commit_offsets(self, offsets: dict[TopicPartition_, int]) -> None:
        if self._closed:
            raise BusError("commit on a closed reader")

    def commit_offsets_async(self, offsets: dict[TopicPartition_, int]) -> None:
        self.commit_offsets(offsets)


class KafkaBus(Bus):
    """:class:`Bus` on Kafka. Thread-safe; create one per process and share it."""

    def __init__(self, config: KafkaConfig | None = None) -> None:
        self.config = config or KafkaConfig()
        self._producer: kafka.KafkaProducer | None = None
        self._appender: kafka_batch.BatchAppender | None = None  # send_batch's fast path, set with the producer
        self._admin: kafka.KafkaAdminClient | None = None
        self._admin_lock = threading.Lock()
        # The slow path: one thread, so queued sends keep their order.
        self._slow = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-kafka-send")
        self._slow_pending = 0  # read without the lock on the fast path (an int read is atomic)
        self._slow_lock = threading.Lock()
        self._closed = False
        # Connect in the background now, so the first send rarely waits.
        self._slow.submit(self._warm_up)

    def __repr__(self) -> str:
        return f"KafkaBus({self.config.bootstrap_servers!r})"

    # -- producing

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> concurrent.futures.Future[RecordMetadata]:
        kheaders = check_record(topic, value, key, headers) or None
        if self._closed:
            return _SendFuture(topic)._fail(BusError("send on a closed bus"))
        p = self._producer
        # Fast path: kafka-python only appends to a batch when it knows the topic's partitions (the check below is
        # the one KafkaProducer.send makes); nothing may be queued on the slow path, or this record would overtake it.
        if p is not None and not self._slow_pending and p._metadata.partitions_for_topic(topic) is not None:
            try:
                return _SendFuture(topic, p.send(topic, value=value, key=key, headers=kheaders))
            except Exception as e:
                return _SendFuture(topic)._fail(_bus_error(e, f"send to {topic!r} failed"))
        fut = _SendFuture(topic)  # an ordinary Future, resolved from the slow-path thread
        with self._slow_lock:
            self._slow_pending += 1
        try:
            self._slow.submit(self._send_slow, fut, time.monotonic(), topic, value, key, kheaders)
        except RuntimeError:  # the executor was shut down by close()
            self._slow_done()
            fut._fail(BusError("send on a closed bus"))
        return fut

    def send_batch(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> concurrent.futures.Future[list[RecordMetadata | BusError]]:
        """See :meth:`Bus.send_batch`. The fast path (producer connected, topic known, nothing queued on the slow
        path) appends the whole batch to kafka-python's accumulator (:mod:`rlhf.bus.kafka_batch`), a fraction of
        the Python work of one ``KafkaProducer.send`` per record; otherwise, one ``send`` per record."""
        for value, key in records:
            check_record(topic, value, key)
        p, appender = self._producer, self._appender
        if self._closed:
            results = BatchResults(len(records))
            results.fail_unset(BusError("send on a closed bus"))
            return results.future
        if (p is None or appender is None or self._slow_pending
                or p._metadata.partitions_for_topic(topic) is None):
            return super().send_batch(topic, records)
        results = BatchResults(len(records))

        def to_error(exc: BaseException) -> BusError:
            return _bus_error(exc, f"send to {topic!r} failed")

        try:
            appender.append(topic, records, results, to_error)
        except Exception as e:  # e.g. the producer closed meanwhile: what was not queued fails now
            results.fail_unset(to_error(e))
        return results.future

    async def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> RecordMetadata:
        """``send`` for asyncio code. On the fast path the kafka future resolves an asyncio future directly
        (one hop to the loop per record), without ``asyncio.wrap_future``'s generic chaining."""
        fut = self.send(topic, value, key=key, headers=headers)
        kfut = fut._kfut
        if kfut is None:
            return await asyncio.wrap_future(fut)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def settle(_: Any) -> None:
            if not waiter.done():
                out = fut._resolve()
                if isinstance(out, BaseException):
                    waiter.set_exception(out)
                else:
                    waiter.set_result(out)

        def resolved(_: Any) -> None:  # on the producer's sender thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(settle, None)

        _on_kafka_done(kfut, resolved)
        return await waiter

    def _slow_done(self) -> None:
        with self._slow_lock:
            self._slow_pending -= 1

    def _send_slow(self, fut: _SendFuture, queued_at: float, topic: str, value: bytes, key: bytes | None,
                   headers: list | None) -> None:
        try:
            if self._closed:
                raise BusError("send on a closed bus")
            waited = time.monotonic() - queued_at
            if waited > self.config.max_block_s:
                raise BusUnavailable(
                    f"send to {topic!r} failed: Kafka at {self.config.bootstrap_servers} gave no metadata for "
                    f"{waited:.1f}s (max_block_s={self.config.max_block_s})"
                )
            kfut = self._get_producer().send(topic, value=value, key=key, headers=headers)
        except Exception as e:
            fut._fail(_bus_error(e, f"send to {topic!r} failed"))
        else:
            fut._bind(kfut)
        finally:
            self._slow_done()

    def _get_producer(self) -> kafka.KafkaProducer:
        """The producer, created on first use (on the slow-path thread only: creating it blocks on bootstrap)."""
        if self._producer is None:
            if self._closed:
                raise BusError("send on a closed bus")
            producer = kafka.KafkaProducer(**self.config.producer_kwargs())
            if kafka_batch.supported(producer):
                self._appender = kafka_batch.BatchAppender(producer, self.config.max_request_size_bytes)
            else:
                log.warning("kafka-python %s lacks internals that send_batch's fast path uses; send_batch "
                            "sends record by record", kafka.__version__)
            self._producer = producer
        return self._producer

    def _warm_up(self) -> None:
        try:
            self._get_producer()
        except Exception as e:  # the first send reports it
            log.debug("Kafka producer not connected yet: %s", e)

    def flush(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            self._slow.submit(lambda: None).result(timeout=remaining())  # a barrier behind the slow path
        except concurrent.futures.TimeoutError:
            raise BusUnavailable(f"flush: sends still waiting for Kafka metadata after {timeout_s}s") from None
        except RuntimeError:  # the bus is closed: nothing is queued any more
            pass
        p = self._producer
        if p is not None:
            try:
                p.flush(timeout=remaining())
            except Exception as e:
                raise _bus_error(e, f"flush did not finish within {timeout_s}s") from e

    # -- consuming and administration

    def consumer(self, topics: Sequence[str], group_id: str, *, client_id: str | None = None,
                 listener: RebalanceListener | None = None) -> KafkaGroupConsumer:
        """A group member. Blocks up to ``max_block_s`` to connect; BusUnavailable when the cluster is unreachable."""
        if isinstance(topics, str) or not topics or not all(isinstance(t, str) and t for t in topics):
            raise TypeError(f"topics must be a non-empty sequence of topic names, got {topics!r}")
        if not isinstance(group_id, str) or not group_id:
            raise ValueError(f"group_id must be a non-empty str, got {group_id!r}")
        if self._closed:
            raise BusError("consumer() on a closed bus")
        try:
            if listener is None:
                c = _construct(kafka.KafkaConsumer, *topics, **self.config.consumer_kwargs(group_id, client_id))
            else:
                c = _construct(kafka.KafkaConsumer, **self.config.consumer_kwargs(group_id, client_id))
                adapter = _Listener(listener)
                adapter.consumer = c
                c.subscribe(list(topics), listener=adapter)
        except Exception as e:
            raise _bus_error(e, f"cannot join group {group_id!r} at {self.config.bootstrap_servers}") from e
        if self.config.fast_fetch:
            kafka_fetch.install(c)  # (before its first fetch)
        return KafkaGroupConsumer(c, self.config.request_timeout_s)

    def reader(self, topics: Sequence[str], *, client_id: str | None = None,
               start_at: dict[TopicPartition_, int] | None = None) -> KafkaReader:
        """Every partition of ``topics``, assigned, from the beginning (see Bus.reader). BusUnavailable when the
        cluster is unreachable; BusError when a topic does not exist (yet)."""
        if isinstance(topics, str) or not topics or not all(isinstance(t, str) and t for t in topics):
            raise TypeError(f"topics must be a non-empty sequence of topic names, got {topics!r}")
        if self._closed:
            raise BusError("reader() on a closed bus")
        try:
            c = _construct(kafka.KafkaConsumer, **self.config.reader_kwargs(client_id))
        except Exception as e:
            raise _bus_error(e, f"cannot connect to {self.config.bootstrap_servers}") from e
        if self.config.fast_fetch:
            kafka_fetch.install(c)
        try:
            assigned = []
            for topic in dict.fromkeys(topics):
                partitions = self._bounded(lambda t=topic: c.partitions_for_topic(t), self.config.request_timeout_s,
                                           f"partitions of {topic}")
                if not partitions:
                    raise BusError(f"topic {topic!r} does not exist (yet) at {self.config.bootstrap_servers}")
                assigned += [TopicPartition(topic, p) for p in sorted(partitions)]
            c.assign(assigned)
            c.seek_to_beginning(*assigned)
            for tp in assigned:
                if (tp.topic, tp.partition) in (start_at or {}):
                    c.seek(tp, start_at[(tp.topic, tp.partition)])  # type: ignore[index]
        except BaseException as e:
            with contextlib.suppress(Exception):
                c.close(autocommit=False)
            raise _bus_error(e, "reader") if isinstance(e, Exception) else e
        return KafkaReader(c, self.config.request_timeout_s)

    def _get_admin(self) -> kafka.KafkaAdminClient:
        with self._admin_lock:
            if self._admin is None:
                if self._closed:
                    raise BusError("the bus is closed")
                self._admin = _construct(kafka.KafkaAdminClient, **self.config.admin_kwargs())
            return self._admin

    def _bounded(self, fn: Callable[[], T], timeout_s: float, what: str) -> T:
        """Run ``fn`` on a helper thread; BusUnavailable if it has not finished within ``timeout_s``.

        kafka-python's admin calls have no per-call deadline (only request_timeout_s per request, and bootstrap
        retries), so the deadline is kept here; a call that overruns finishes in the background.
        """
        box: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                box.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.set_exception(e)

        threading.Thread(target=run, name="rlhf-kafka-admin", daemon=True).start()
        try:
            return box.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise BusUnavailable(f"{what}: no answer within {timeout_s}s") from None
        except Exception as e:
            raise _bus_error(e, f"{what} failed") from e

    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        by_name = check_topic_specs(specs)
        if not by_name:
            return
        if self._closed:
            raise BusError("ensure_topics on a closed bus")
        timeout_ms = int(self.config.request_timeout_s * 1000)

        def create() -> None:
            admin = self._get_admin()
            resp = admin.create_topics(
                {
                    s.name: {
                        "num_partitions": s.partitions,
                        "replication_factor": s.replication_factor,
                        "configs": dict(s.config),
                    }
                    for s in by_name.values()
                },
                timeout_ms=timeout_ms,
                raise_errors=False,
            )
            problems = []
            for t in resp["topics"]:
                code = t["error_code"]
                if code in (0, kerr.TopicAlreadyExistsError.errno):
                    continue
                err = kerr.for_code(code)
                problems.append(f"{t['name']}: {err.__name__} {t.get('error_message') or ''}".strip())
                if issubclass(err, _UNAVAILABLE):
                    raise BusUnavailable("cannot create topics now: " + "; ".join(problems))
            if problems:
                raise BusError("cannot create topics: " + "; ".join(problems))
            # Created is not yet usable: wait until every partition has a leader.
            admin.wait_for_topics(list(by_name), timeout_ms=timeout_ms)

        self._bounded(create, self.config.max_block_s + 2 * self.config.request_timeout_s,
                      f"ensure_topics at {self.config.bootstrap_servers}")

    def ping(self, timeout_s: float = 2.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self._closed:
            raise BusError("ping on a closed bus")

        def metadata_round_trip() -> None:
            brokers = self._get_admin().describe_cluster()["brokers"]  # a Metadata request, answered by a broker
            if not brokers:
                raise BusUnavailable(f"Kafka at {self.config.bootstrap_servers} lists no live broker")

        self._bounded(metadata_round_trip, timeout_s, f"ping of Kafka at {self.config.bootstrap_servers}")

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Flush (up to ``timeout_s``), then release everything. Records still unresolved fail with BusError."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        except BusError as e:
            log.warning("closing the Kafka bus with records unresolved: %s", e)
        self._closed = True
        self._slow.shutdown(wait=True)  # queued sends fail fast now that the bus is closed
        if self._producer is not None:
            _close_producer(self._producer)
        with self._admin_lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None


def _close_producer(producer: kafka.KafkaProducer) -> None:
    try:
        producer.close(timeout=1.0)
        return
    except Exception as e:  # kafka-python's close gives up when its flush times out, leaving the sender running
        log.warning("Kafka producer did not close cleanly (%s); aborting its unsent records", e)
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()  # fails every unresolved record future
        sender.join(5.0)
    try:
        producer.close(timeout=1.0)
    except Exception:
        log.warning("Kafka producer still not closed", exc_info=True)
