"""One generation request from the API to the backend and back, whatever the backend:

1. validate (fields named), resolve defaults, assign the prompt id;
2. route: the pinned version, else the traffic split on the routing key (the prompt id when empty), holding a lease
   on the version until the last message is sent;
3. format the prompt with the version's chat template, tokenize, check it fits the context;
4. generate ``num_samples`` rows (seeds ``seed``, ``seed + 1``, ...) and turn tokens into text (stop sequences);
5. answer, then record every finished sample in the background (cache + rlhf.responses.v1).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from rlhf.core.generation import SamplingParams
from rlhf.core.tokenizer import format_chat, format_prompt
from rlhf.policy import metrics
from rlhf.policy.backend import CANCELLED, DEADLINE, ERROR, LENGTH, STOP, BackendEvent, Generation, RowSpec
from rlhf.policy.config import PolicyConfig
from rlhf.policy.manager import Lease, PolicyManager
from rlhf.policy.recording import ResponseRecorder
from rlhf.policy.text import SampleText
from rlhf.policy.validation import ValidRequest, check_prompt_tokens, validate_generate
from rlhf.serving.errors import DeadlineExceeded, InvalidArgument, ServiceError, Unavailable, status_for
from rlhf.v1 import common_pb2, events_pb2, policy_pb2

FINISH = {
    STOP: common_pb2.FINISH_REASON_STOP,
    LENGTH: common_pb2.FINISH_REASON_LENGTH,
    CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
STOP_SEQUENCE = common_pb2.FINISH_REASON_STOP_SEQUENCE
SEED_SPACE = 2**64


class BackendFailure(ServiceError):
    """A backend reported a failed row; ``code`` is the status it maps to."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Prepared:
    """A validated, routed, tokenized request."""

    request: ValidRequest
    prompt_id: str
    lease: Lease
    prompt_text: str
    rows: list[RowSpec]
    response_ids: list[str]
    texts: list[SampleText]
    finishes: list[int | None]

    @property
    def version(self) -> str:
        return self.lease.version

    @property
    def prompt_tokens(self) -> int:
        return len(self.rows[0].prompt_ids)


class PolicyService:
    def __init__(self, config: PolicyConfig, manager: PolicyManager, recorder: ResponseRecorder) -> None:
        self.config = config
        self.manager = manager
        self.recorder = recorder
        self.replica = config.replica

    # ------------------------------------------------------------------------------------------ preparing

    def prepare(self, request: policy_pb2.GenerateRequest) -> Prepared:
        valid = validate_generate(request, self.config)
        prompt_id = valid.prompt_id or f"prompt-{uuid.uuid4().hex}"
        lease = self.manager.acquire(valid.routing_key or prompt_id, valid.version)
        try:
            model = lease.model
            prompt_text = render_prompt(model.tokenizer, valid)
            ids = model.tokenizer(prompt_text, add_special_tokens=self.config.add_special_tokens)["input_ids"]
            max_new_tokens = check_prompt_tokens(valid, len(ids), model.context)
            s = valid.sampling
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p)
            seed = s.seed if s.seed is not None else secrets.randbits(63)
            rows = [RowSpec(prompt_text, tuple(ids), params, (seed + i) % SEED_SPACE) for i in range(valid.num_samples)]
        except BaseException:
            lease.release()
            raise
        return Prepared(
            request=valid,
            prompt_id=prompt_id,
            lease=lease,
            prompt_text=prompt_text,
            rows=rows,
            response_ids=[f"resp-{uuid.uuid4().hex}" for _ in rows],
            texts=[SampleText(model.tokenizer, s.stop) for _ in rows],
            finishes=[None] * len(rows),
        )

    # ------------------------------------------------------------------------------------------ generating

    async def generate(self, request: policy_pb2.GenerateRequest,
                       time_remaining: float | None = None) -> policy_pb2.GenerateResponse:
        """Generate: every sample complete, in one response."""
        async with _Observed("Generate") as observed:
            prep = self.prepare(request)
            observed.version = prep.version
            with prep.lease:
                # Rows with stop sequences stream their tokens to the service, which ends them at the stop.
                async with self._generation(prep, stream=bool(prep.request.sampling.stop),
                                            time_remaining=time_remaining) as generation:
                    async for event in generation:
                        self._on_event(prep, generation, event, observed)
            response = policy_pb2.GenerateResponse(
                prompt_id=prep.prompt_id, policy_version=prep.version, prompt_tokens=prep.prompt_tokens,
            )
            for i, text in enumerate(prep.texts):
                response.samples.append(policy_pb2.Sample(
                    response_id=prep.response_ids[i], text=text.text, finish_reason=prep.finishes[i],
                    completion_tokens=text.completion_tokens,
                ))
            self._record(prep, [(i, t.text) for i, t in enumerate(prep.texts)])
            return response

    async def stream(self, request: policy_pb2.GenerateRequest,
                     time_remaining: float | None = None) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        """GenerateStream: text deltas as they are produced; a last message per sample with its finish reason."""
        async with _Observed("GenerateStream") as observed:
            prep = self.prepare(request)
            observed.version = prep.version
            with prep.lease:
                async with self._generation(prep, stream=True, time_remaining=time_remaining) as generation:
                    async for event in generation:
                        done = self._on_event(prep, generation, event, observed)
                        i = event.row
                        if done:
                            yield self._stream_message(prep, i, prep.texts[i].final_delta(), final=True)
                        else:
                            delta = prep.texts[i].delta()
                            if delta:
                                yield self._stream_message(prep, i, delta)
            self._record(prep, [(i, t.streamed_text) for i, t in enumerate(prep.texts)])

    def _generation(self, prep: Prepared, *, stream: bool, time_remaining: float | None) -> Any:
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        generation = prep.lease.model.generate(prep.rows, stream=stream, deadline=deadline)
        return _Bounded(generation, time_remaining)

    def _on_event(self, prep: Prepared, generation: Generation, event: BackendEvent, observed: _Observed) -> bool:
        """Apply one backend event; True when its row is now finished (the final message is due)."""
        i = event.row
        if event.tokens:
            observed.first_token(event.first_token_at)
            metrics.GENERATED_TOKENS.labels(prep.version).inc(len(event.tokens))
        if prep.finishes[i] is not None:
            return False  # ended by a stop sequence already; tokens the backend made meanwhile are dropped
        if prep.texts[i].add(event.tokens):
            prep.finishes[i] = STOP_SEQUENCE
            generation.cancel(i)
            return True
        if event.finish is None:
            return False
        if event.finish == DEADLINE:
            raise DeadlineExceeded("the deadline passed before the response was complete")
        if event.finish == ERROR:
            code = getattr(grpc.StatusCode, event.error_code, grpc.StatusCode.INTERNAL)
            raise BackendFailure(f"generation failed on {prep.version}: {event.error}", code)
        if event.finish == CANCELLED:
            raise Unavailable(f"{prep.version} stopped generating (shutting down?); retry")
        prep.finishes[i] = FINISH[event.finish]
        return True

    def _stream_message(self, prep: Prepared, i: int, delta: str,
                        final: bool = False) -> policy_pb2.GenerateStreamResponse:
        message = policy_pb2.GenerateStreamResponse(
            prompt_id=prep.prompt_id, policy_version=prep.version, sample_index=i,
            response_id=prep.response_ids[i], text_delta=delta, prompt_tokens=prep.prompt_tokens,
        )
        if final:
            message.finish_reason = prep.finishes[i]  # type: ignore[assignment]
            message.completion_tokens = prep.texts[i].completion_tokens
        return message

    # ------------------------------------------------------------------------------------------ recording

    def _record(self, prep: Prepared, texts: list[tuple[int, str]]) -> None:
        request = prep.request
        for i, text in texts:
            if prep.finishes[i] is None:
                continue
            served = events_pb2.ServedResponse(
                response_id=prep.response_ids[i],
                prompt_id=prep.prompt_id,
                prompt=prep.prompt_text,
                input_prompt=request.prompt or "",
                text=text,
                policy_version=prep.version,
                sampling=request.sampling.to_proto(prep.rows[i].seed, prep.rows[i].params.max_new_tokens),
                finish_reason=prep.finishes[i],  # type: ignore[arg-type]
                prompt_tokens=prep.prompt_tokens,
                completion_tokens=prep.texts[i].completion_tokens,
                product=request.product,
                routing_key=request.routing_key,
                replica_id=self.replica,
            )
            if request.messages:
                served.messages.messages.extend(
                    common_pb2.ChatMessage(role=role, content=content) for role, content in request.messages
                )
            served.served_at.GetCurrentTime()
            self.recorder.record(served)
            metrics.PROMPT_TOKENS.labels(prep.version).inc(prep.prompt_tokens)
            metrics.SAMPLES.labels(prep.version, common_pb2.FinishReason.Name(prep.finishes[i])).inc()


def render_prompt(tokenizer: Any, request: ValidRequest) -> str:
    """The text the policy continues: a plain prompt as the trainer formats it (``core.tokenizer.format_prompt``:
    the chat template with a user turn when there is one), chat messages through the chat template, or, for a model
    without a template, one ``role: content`` line per message and an ``assistant:`` line."""
    if request.prompt is not None:
        return format_prompt(tokenizer, request.prompt)
    messages = [{"role": role, "content": content} for role, content in request.messages]
    try:
        return format_chat(tokenizer, messages)
    except Exception as e:  # a template may reject a conversation (e.g. roles that do not alternate)
        raise InvalidArgument("messages", f"the model's chat template rejects this conversation: {e}") from None


class _Bounded:
    """A Generation bounded by the call's deadline: DEADLINE_EXCEEDED when it passes; closed (rows cancelled) on
    exit, whatever the exit."""

    def __init__(self, generation: Generation, time_remaining: float | None) -> None:
        self.generation = generation
        self._timeout = asyncio.timeout(time_remaining) if time_remaining is not None else contextlib.nullcontext()

    async def __aenter__(self) -> Generation:
        await self._timeout.__aenter__()
        return self.generation

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        await self.generation.aclose()
        try:
            return await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the response was complete") from None


class _Observed:
    """Request metrics: count, errors by code, latency, time to first token."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.version = "none"
        self._started = time.monotonic()
        self._first_token = False

    def first_token(self, at: float | None) -> None:
        if not self._first_token:
            self._first_token = True
            at = at if at is not None else time.monotonic()
            metrics.TTFT_SECONDS.labels(self.method, self.version).observe(max(0.0, at - self._started))

    async def __aenter__(self) -> _Observed:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        metrics.REQUESTS.labels(self.method, self.version).inc()
        metrics.REQUEST_SECONDS.labels(self.method, self.version).observe(time.monotonic() - self._started)
        if exc is not None:
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                code = "CANCELLED"
            else:
                code = status_for(exc)[0].name
            metrics.ERRORS.labels(self.method, self.version, code).inc()
