"""FeedbackService over gRPC: a thin adapter from the rlhf.v1 messages to :class:`FeedbackIngestor`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio

from rlhf.bus.base import Bus
from rlhf.cache.base import Cache, CacheError
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.ingest import FeedbackIngestor, Outcome
from rlhf.serving.errors import InvalidArgument
from rlhf.serving.component import ServiceComponent
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)


def _response(event_id: str, sequence: int, outcome: Outcome) -> feedback_pb2.SubmitResponse:
    resp = feedback_pb2.SubmitResponse(
        event_id=event_id,
        status=outcome.status,
        sequence=sequence,
        unknown_response_ids=outcome.unknown_response_ids,
    )
    if outcome.error is not None:
        resp.error_code = outcome.error.code.value[0]
        resp.error_message = outcome.error.message
    return resp


def _stream_response(events: Sequence[feedback_pb2.FeedbackEvent], outcomes: Sequence[Outcome],
                     first_sequence: int) -> feedback_pb2.SubmitStreamResponse:
    """One ack per event, built in place (``acks.add``: no message copied per event)."""
    answer = feedback_pb2.SubmitStreamResponse()
    add = answer.acks.add
    for i, (event, outcome) in enumerate(zip(events, outcomes)):
        if outcome.error is None:
            add(event_id=event.event_id, status=outcome.status, sequence=first_sequence + i,
                unknown_response_ids=outcome.unknown_response_ids)
        else:
            add(event_id=event.event_id, status=outcome.status, sequence=first_sequence + i,
                unknown_response_ids=outcome.unknown_response_ids, error_code=outcome.error.code.value[0],
                error_message=outcome.error.message)
    return answer


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, ingestor: FeedbackIngestor, config: FeedbackConfig) -> None:
        self.ingestor = ingestor
        self.config = config

    async def Submit(self, request: feedback_pb2.SubmitRequest, context: grpc.aio.ServicerContext):
        if not request.HasField("event"):
            raise InvalidArgument("event", "required")
        outcome = await self.ingestor.submit(request.event)
        if outcome.error is not None:
            raise outcome.error
        return _response(request.event.event_id, 0, outcome)

    async def SubmitStream(
        self, request_iterator: AsyncIterator[feedback_pb2.SubmitStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[feedback_pb2.SubmitStreamResponse]:
        """Each request message is one batch, processed concurrently with the next ones and answered as soon as
        it is done. At most ``max_in_flight`` events are unanswered; beyond that the stream is not read (gRPC flow
        control pushes back on the client)."""
        cfg = self.config
        answers: asyncio.Queue[feedback_pb2.SubmitStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(cfg.max_in_flight)
        batches: set[asyncio.Task] = set()

        async def process(first_sequence: int, events: Sequence[feedback_pb2.FeedbackEvent]) -> None:
            try:
                if len(events) > cfg.max_events_per_message:
                    error = InvalidArgument(
                        "events", f"has {len(events)} events; at most {cfg.max_events_per_message} per message")
                    outcomes = [Outcome(feedback_pb2.SUBMIT_STATUS_REJECTED, error=error)] * len(events)
                else:
                    outcomes = await self.ingestor.submit_batch(events)
                answers.put_nowait(_stream_response(events, outcomes, first_sequence))
            finally:
                for _ in range(min(len(events), cfg.max_in_flight)):
                    window.release()

        async def read() -> None:
            sequence = 0
            try:
                async for request in request_iterator:
                    events = request.events
                    for _ in range(min(len(events), cfg.max_in_flight)):
                        await window.acquire()
                    task = asyncio.create_task(process(sequence, events))
                    batches.add(task)
                    task.add_done_callback(batches.discard)
                    sequence += len(events)
            finally:
                if batches:
                    await asyncio.gather(*list(batches), return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # surfaces a failure of the reader (e.g. the client's stream broke)
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader


class FeedbackComponent(ServiceComponent):
    """The feedback service with the bus and cache it owns."""

    service_name = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name

    def __init__(self, config: FeedbackConfig, bus: Bus | None = None, cache: Cache | None = None) -> None:
        super().__init__(config, bus=bus, cache=cache)
        self.config: FeedbackConfig = config
        self.ingestor = FeedbackIngestor(self.bus, self.cache, config)

    def register(self, server: grpc.aio.Server) -> None:
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(self.ingestor, self.config), server)

    async def start(self) -> None:
        await self.ensure_topics()

    async def check(self) -> None:
        # The bus is needed for every acknowledgement; the cache is not (the service degrades without it).
        await asyncio.get_running_loop().run_in_executor(None, self.bus.ping, 2.0)
        try:
            await self.cache.ping()
        except CacheError as exc:
            log.warning("cache unavailable (%s): deduplication is per replica until it is back", exc)

    async def stop(self) -> None:
        await self.close_dependencies()
