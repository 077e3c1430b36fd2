"""The feedback core: validate, deduplicate, join with what was served, publish durably.

An acknowledgement (ACCEPTED or DUPLICATE) means the event is on the feedback topic with acks=all.
Per batch of events:

1. validate each event (REJECTED with the field named), its size too: the record it becomes must fit the bus;
2. claim each event_id in the cache (``SET NX`` of ``pending:<replica>``): a claim that exists already is a
   DUPLICATE once ``done``; while another replica holds it ``pending`` we wait for its outcome;
   the same event_id twice in flight on this replica follows the first one's outcome;
3. look up the served-response records of the ids the event names: unknown ids are marked, never dropped;
4. publish a ``FeedbackRecord`` per claimed event and wait until each is durable;
5. mark published events ``done`` for ``idempotency_ttl_s``; release the claims of failed ones so a retry works.

Steps 2-5 each make one call (a cache script, an MGET, a ``send_batch``, a cache script) for the whole batch, and
concurrent batches (messages of streams, unary calls) share those calls: while one runs, the next batches wait and
go together in the next one (:class:`rlhf.serving.group_commit.GroupCommit`; ``cache_calls_in_flight`` and
``publish_calls_in_flight`` of the config). See benchmarks/README.md for what each costs.

The cache being down degrades deduplication to this replica (an in-process fallback) and leaves responses
unchecked; it never fails an event. The bus being down fails the event (FAILED / UNAVAILABLE), nothing acked.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar

from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Histogram

from rlhf import keys
from rlhf.bus import topics
from rlhf.bus.base import Bus, BusError
from rlhf.cache.base import Cache, CacheError
from rlhf.cache.memory import InMemoryCache
from rlhf.feedback import record
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.validation import Limits, shared_record_bytes, validate_event
from rlhf.serving.errors import Aborted, InvalidArgument, ServiceError, Unavailable
from rlhf.serving.group_commit import GroupCommit
from rlhf.v1 import events_pb2, feedback_pb2

log = logging.getLogger(__name__)

# Module constants: looking a value up on the enum wrapper (SubmitStatus.X) is slow on the hot path.
ACCEPTED = feedback_pb2.SUBMIT_STATUS_ACCEPTED
DUPLICATE = feedback_pb2.SUBMIT_STATUS_DUPLICATE
REJECTED = feedback_pb2.SUBMIT_STATUS_REJECTED
FAILED = feedback_pb2.SUBMIT_STATUS_FAILED

EVENTS = Counter(
    "rlhf_feedback_events_total",
    "Feedback events by kind and outcome (accepted, duplicate, rejected, failed).",
    ["kind", "outcome"],
)
PUBLISH_SECONDS = Histogram(
    "rlhf_feedback_publish_seconds",
    "Time from handing a batch of events to the bus until all are durable (acks=all); one observation per batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UNKNOWN_RESPONSES = Counter(
    "rlhf_feedback_unknown_responses_total", "Response ids in accepted feedback that have no served-response record."
)
CACHE_ERRORS = Counter(
    "rlhf_feedback_cache_errors_total", "Cache operations that failed (the service degraded instead).", ["operation"]
)

T = TypeVar("T")
DONE = b"done"
_OUTCOME_NAMES = {
    ACCEPTED: "accepted",
    DUPLICATE: "duplicate",
    REJECTED: "rejected",
    FAILED: "failed",
}


class Outcome(NamedTuple):
    """What happened to one event (a tuple: hundreds are made per batch on the hot path)."""

    status: int  # feedback_pb2.SubmitStatus
    unknown_response_ids: tuple[str, ...] = ()
    error: ServiceError | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status in (ACCEPTED, DUPLICATE)


_ACCEPTED = Outcome(ACCEPTED)
_FAILED_ALONGSIDE = Outcome(
    FAILED,
    error=Unavailable("the same event_id failed in a concurrent submission; it was not acknowledged, retry"),
)


class FeedbackIngestor:
    """Turns submitted events into durable records on the feedback topic (see the module docstring)."""

    def __init__(self, bus: Bus, cache: Cache, config: FeedbackConfig) -> None:
        self.bus = bus
        self.cache = cache
        self.config = config
        self._replica = config.replica  # computed once: it asks the OS for the host name
        self.limits = Limits(config.max_text_bytes, config.max_ranking_size, config.max_future_skew_s,
                             config.record_limit_bytes, shared_record_bytes(self._replica))
        self._fallback = InMemoryCache()  # idempotency on this replica while the cache is down
        # event_id -> (future of the outcomes of the batch publishing it, its index there)
        self._in_flight: dict[str, tuple[asyncio.Future[list[Outcome]], int]] = {}
        self._pending_value = f"pending:{self._replica}".encode()
        # One cache step of concurrent batches (streams, messages, unary calls) in one call (group commit).
        limit = config.cache_calls_in_flight
        self._claims = GroupCommit(self._claim_ids, limit=limit)
        self._lookups = GroupCommit(self._get_served, limit=limit)
        self._marks = GroupCommit(self._mark_done, limit=limit)
        self._publishes = GroupCommit(self._send_records, limit=config.publish_calls_in_flight)

    async def submit(self, event: feedback_pb2.FeedbackEvent) -> Outcome:
        return (await self.submit_batch([event]))[0]

    async def submit_batch(self, events: Sequence[feedback_pb2.FeedbackEvent]) -> list[Outcome]:
        """Process events together (one cache round trip per step); one outcome per event, in order."""
        outcomes: list[Outcome | None] = [None] * len(events)
        kinds: list[str] = ["none"] * len(events)
        ids_of: list[list[str]] = [[]] * len(events)  # response ids per event
        now = time.time()
        # 1. validate; an event_id already in flight on this replica (in this batch or another) follows that one
        fresh: list[int] = []
        followers: list[tuple[int, asyncio.Future[list[Outcome]], int]] = []
        batch_done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        in_flight, limits = self._in_flight, self.limits
        for i, event in enumerate(events):
            try:
                kinds[i], ids_of[i] = validate_event(event, limits, now)
            except InvalidArgument as exc:
                outcomes[i] = Outcome(REJECTED, error=exc)
                kinds[i] = event.WhichOneof("kind") or "none"
                continue
            event_id = event.event_id
            leader = in_flight.get(event_id)
            if leader is not None:
                followers.append((i, *leader))
                continue
            in_flight[event_id] = (batch_done, len(fresh))
            fresh.append(i)
        try:
            results = await self._process([events[i] for i in fresh], [ids_of[i] for i in fresh]) if fresh else []
            for i, outcome in zip(fresh, results):
                outcomes[i] = outcome
        finally:
            batch_done.set_result([outcomes[i] or _FAILED_ALONGSIDE for i in fresh])
            for i in fresh:
                in_flight.pop(events[i].event_id, None)
        for i, leader_done, index in followers:
            leader = (await leader_done)[index]
            outcomes[i] = (
                Outcome(DUPLICATE, leader.unknown_response_ids) if leader.acknowledged else leader
            )
        done = [o if o is not None else _FAILED_ALONGSIDE for o in outcomes]
        for (kind, status), n in collections.Counter(zip(kinds, [o.status for o in done])).items():
            EVENTS.labels(kind, _OUTCOME_NAMES[status]).inc(n)
        return done

    async def _process(self, events: list[feedback_pb2.FeedbackEvent], ids_of: list[list[str]]) -> list[Outcome]:
        """Steps 2-5 for valid events, not in flight elsewhere on this replica; ``ids_of``: their response ids."""
        outcomes: list[Outcome | None] = [None] * len(events)
        # 2. claim the event ids
        claimed = await self._claim([e.event_id for e in events])
        todo = []
        for i, state in enumerate(claimed):
            if state is True:
                todo.append(i)
            else:
                outcomes[i] = state
        if not todo:
            return [o or _FAILED_ALONGSIDE for o in outcomes]
        # 3. join with the served responses
        ids_of = [ids_of[i] for i in todo]
        joined = await self._served_records(ids_of)
        # 4. publish and wait for durability
        received = timestamp_pb2.Timestamp()
        received.GetCurrentTime()
        shared = record.shared_part(received, self._replica)
        payloads = []
        for i, ids, (unknown, unchecked, prompt_id) in zip(todo, ids_of, joined):
            event = events[i]
            value = record.record_bytes(event.SerializeToString(), shared, unknown, unchecked)
            key = prompt_id or event.prompt_id or (ids[0] if ids else event.event_id)
            payloads.append((value, key.encode()))
        results = await self._publish_all(payloads)
        # 5. remember what is durable; free the claims of what is not
        done_ids, failed_ids = [], []
        unknown_total = 0
        for i, result, (unknown, _, _) in zip(todo, results, joined):
            if result is None:
                done_ids.append(events[i].event_id)
                unknown_total += len(unknown)
                outcomes[i] = Outcome(ACCEPTED, tuple(unknown)) if unknown else _ACCEPTED
            else:
                failed_ids.append(events[i].event_id)
                error = result if isinstance(result, ServiceError) else Unavailable(
                    f"the event could not be made durable ({result}); nothing was acknowledged, retry")
                outcomes[i] = Outcome(FAILED, error=error)
        if unknown_total:
            UNKNOWN_RESPONSES.inc(unknown_total)
        await self._finish(done_ids, failed_ids)
        return [o or _FAILED_ALONGSIDE for o in outcomes]

    async def _publish_all(self, payloads: list[tuple[bytes, bytes]]) -> list[BaseException | None]:
        """Send every (value, key) to the feedback topic; per record None once durable, else the error. Records
        of concurrent batches go to the bus together (group commit); the event loop wakes once per such call."""
        start = time.perf_counter()
        try:
            outcomes = await asyncio.wait_for(asyncio.shield(self._publishes(payloads)), self.config.publish_timeout_s)
        except asyncio.TimeoutError:
            return [Unavailable(
                f"the message bus did not confirm the event within {self.config.publish_timeout_s:.0f}s; "
                "nothing was acknowledged, retry")] * len(payloads)
        out: list[BaseException | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BusError):
                out.append(Unavailable(f"message bus unavailable ({outcome}); nothing was acknowledged, retry"))
            else:
                out.append(None)
        if any(o is None for o in out):
            PUBLISH_SECONDS.observe(time.perf_counter() - start)
        return out

    async def _send_records(self, payloads: list[tuple[bytes, bytes]]) -> list:
        """One ``send_batch`` to the feedback topic (of one or more concurrent batches); an outcome per record."""
        return await asyncio.wrap_future(self.bus.send_batch(topics.FEEDBACK, payloads))

    # -- idempotency ---------------------------------------------------------------------------------------------

    async def _cache_call(self, operation: str, call: Callable[[Cache], Awaitable[T]]) -> T:
        """``call`` on the shared cache; on this replica's fallback cache when the shared one fails."""
        try:
            return await call(self.cache)
        except CacheError as exc:
            CACHE_ERRORS.labels(operation).inc()
            log.warning("cache %s failed (%s); using this replica's fallback", operation, exc)
            return await call(self._fallback)

    async def _claim(self, event_ids: list[str]) -> list[bool | Outcome]:
        """True where this call now owns the event id; else the Outcome to report (DUPLICATE / FAILED)."""
        claims = await self._claims(event_ids)
        out: list[bool | Outcome] = []
        for eid, ok in zip(event_ids, claims):
            out.append(True if ok else await self._resolve_conflict(eid))
        return out

    async def _claim_ids(self, event_ids: list[str]) -> list[bool]:
        """SET NX of ``pending:<replica>`` for each id (of one or more concurrent batches), in one cache call."""
        wanted = {keys.feedback_idempotency(eid): self._pending_value for eid in event_ids}
        if len(wanted) != len(event_ids):  # cannot happen: an id is in flight in one batch of this replica at most
            raise RuntimeError("the same event_id was claimed twice in one cache call")
        return await self._cache_call("claim", lambda c: c.set_many_if_absent(wanted, self.config.pending_ttl_s))

    async def _resolve_conflict(self, event_id: str) -> bool | Outcome:
        """The id is claimed already: DUPLICATE when done; wait while pending elsewhere; re-claim if released."""
        key = keys.feedback_idempotency(event_id)
        deadline = time.monotonic() + self.config.publish_timeout_s + 1.0
        delay = 0.01
        while True:
            value = await self._cache_call("read", lambda c: c.get(key))
            if value == DONE:
                return Outcome(DUPLICATE)
            if value is None:  # the other holder failed and released it: try to own it
                claimed = await self._cache_call(
                    "claim", lambda c: c.set_if_absent(key, self._pending_value, self.config.pending_ttl_s))
                if claimed:
                    return True
                continue
            if time.monotonic() > deadline:
                return Outcome(FAILED, error=Aborted(
                    f"event_id {event_id!r} is being published by another replica; retry later"))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _finish(self, done_ids: list[str], failed_ids: list[str]) -> None:
        if done_ids:
            await self._marks(done_ids)
        if failed_ids:
            async def release(cache: Cache) -> None:
                for eid in failed_ids:
                    await cache.delete(keys.feedback_idempotency(eid))

            await self._cache_call("finish", release)

    async def _mark_done(self, event_ids: list[str]) -> list[None]:
        """Mark published ids ``done`` for ``idempotency_ttl_s`` (of one or more concurrent batches, one call)."""
        done = {keys.feedback_idempotency(eid): DONE for eid in event_ids}
        await self._cache_call("finish", lambda c: c.set_many(done, self.config.idempotency_ttl_s))
        return [None] * len(event_ids)

    # -- join ------------------------------------------------------------------------------------------------

    async def _served_records(self, ids_of: list[list[str]]) -> list[tuple[list[str], bool, str]]:
        """Per event (given as the response ids it names): (unknown response ids, whether the lookup was
        impossible, prompt id of the served prompt)."""
        wanted = list({rid for ids in ids_of for rid in ids})
        found: dict[str, bytes | None] = {}
        if wanted:
            try:
                values = await self._lookups(wanted)
                found = dict(zip(wanted, values))
            except CacheError as exc:
                CACHE_ERRORS.labels("lookup").inc()
                log.warning("served-response lookup failed (%s); marking events unchecked", exc)
                return [([], bool(ids), "") for ids in ids_of]
        out = []
        get = found.get
        for ids in ids_of:
            unknown = [rid for rid in ids if get(rid) is None]
            prompt_id = ""
            if len(unknown) < len(ids):
                for rid in ids:
                    raw = get(rid)
                    if raw is not None:
                        prompt_id = events_pb2.ServedResponse.FromString(raw).prompt_id
                        break
            out.append((unknown, False, prompt_id))
        return out

    async def _get_served(self, response_ids: list[str]) -> list[bytes | None]:
        """The served-response records of response ids (of one or more concurrent batches, one cache call)."""
        return await self.cache.get_many([keys.served_response(rid) for rid in response_ids])
