"""Checks of a GenerateRequest before anything is queued, and the resolution of its "0 means default" values.

Every rejection is an :class:`InvalidArgument` naming the field (``sampling.top_p``, ``messages.messages[2].role``).
The prompt's length in tokens depends on the version's tokenizer; the service checks it after routing
(:func:`check_prompt_tokens`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol

from rlhf.serving.errors import InvalidArgument
from rlhf.serving.validation import ROLES, check_conversation
from rlhf.v1 import common_pb2, policy_pb2

__all__ = ["ROLES", "Limits", "Sampling", "ValidRequest", "validate_generate", "check_prompt_tokens"]
MAX_TOP_K = 1000
MAX_TEMPERATURE = 2.0


class Limits(Protocol):
    """The fields of PolicyConfig that validation reads."""

    max_new_tokens_limit: int
    default_max_new_tokens: int
    default_temperature: float
    max_num_samples: int
    max_text_bytes: int
    max_messages: int
    max_stop_sequences: int
    max_stop_bytes: int
    max_id_bytes: int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Resolved sampling values of a request (no "0 means default" left)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float  # (0, 1]
    top_k: int  # 0 = off
    seed: int | None  # None: the service draws one (and records it)
    stop: tuple[str, ...]

    def to_proto(self, seed: int, max_new_tokens: int | None = None) -> common_pb2.SamplingParams:
        """The values one sample was generated with (recorded with the response, so it can be replayed)."""
        return common_pb2.SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            stop=list(self.stop),
        )


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    prompt: str | None
    """The plain prompt, or None for chat messages."""
    messages: tuple[tuple[str, str], ...]
    """(role, content) per chat message; empty for a plain prompt."""
    sampling: Sampling
    num_samples: int
    routing_key: str
    prompt_id: str
    product: str
    version: str
    """Pinned version; empty: routed by the traffic split."""

    @property
    def input_field(self) -> str:
        """The request field that holds the prompt, for errors about its length."""
        return "prompt" if self.prompt is not None else "messages"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def validate_generate(request: policy_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
    """The request with defaults resolved, or InvalidArgument naming the first offending field."""
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgument("prompt", "set prompt (text) or messages (a conversation)")
    if which == "prompt":
        prompt = request.prompt
        if not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        if _utf8_len(prompt) > limits.max_text_bytes:
            raise InvalidArgument("prompt", f"is {_utf8_len(prompt)} bytes; at most {limits.max_text_bytes}")
    else:
        messages = _messages(request.messages, limits)

    sampling = _sampling(request.sampling, limits)
    num_samples = request.num_samples or 1
    if num_samples > limits.max_num_samples:
        raise InvalidArgument("num_samples", f"is {num_samples}; at most {limits.max_num_samples}")
    for name in ("routing_key", "prompt_id", "product", "version"):
        value = getattr(request, name)
        if _utf8_len(value) > limits.max_id_bytes:
            raise InvalidArgument(name, f"is {_utf8_len(value)} bytes; at most {limits.max_id_bytes}")
    return ValidRequest(
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        num_samples=num_samples,
        routing_key=request.routing_key,
        prompt_id=request.prompt_id,
        product=request.product,
        version=request.version,
    )


def _messages(conversation: common_pb2.Conversation, limits: Limits) -> tuple[tuple[str, str], ...]:
    return check_conversation(conversation, "messages", max_messages=limits.max_messages,
                              max_text_bytes=limits.max_text_bytes)


def _sampling(params: common_pb2.SamplingParams, limits: Limits) -> Sampling:
    max_new_tokens = params.max_new_tokens or limits.default_max_new_tokens
    if max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidArgument(
            "sampling.max_new_tokens", f"is {max_new_tokens}; at most {limits.max_new_tokens_limit}"
        )
    temperature = params.temperature
    if math.isnan(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument("sampling.temperature", f"is {temperature}; must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    top_p = params.top_p
    if math.isnan(top_p) or not 0.0 <= top_p <= 1.0:
        raise InvalidArgument("sampling.top_p", f"is {top_p}; must be in (0, 1] (0 = unset = 1)")
    if params.top_k > MAX_TOP_K:
        raise InvalidArgument("sampling.top_k", f"is {params.top_k}; at most {MAX_TOP_K} (0 = off)")
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgument("sampling.stop", f"has {len(params.stop)} sequences; at most {limits.max_stop_sequences}")
    for i, stop in enumerate(params.stop):
        if not stop or _utf8_len(stop) > limits.max_stop_bytes:
            raise InvalidArgument(f"sampling.stop[{i}]", f"must be 1..{limits.max_stop_bytes} bytes")
    if temperature == 0.0 and top_p == 0.0 and params.top_k == 0:
        temperature = limits.default_temperature  # nothing set: the service default
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p) if top_p > 0 else 1.0,
        top_k=int(params.top_k),
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )


def check_prompt_tokens(request: ValidRequest, prompt_tokens: int, context: int) -> int:
    """The max_new_tokens a request can have with a prompt of ``prompt_tokens`` in a ``context``-token model: its own,
    cut to the room left. A prompt that leaves no room is INVALID_ARGUMENT on the prompt's field."""
    if prompt_tokens == 0:
        raise InvalidArgument(request.input_field, "tokenizes to no tokens")
    if context and prompt_tokens >= context:
        raise InvalidArgument(
            request.input_field,
            f"is {prompt_tokens} tokens; this policy's context is {context} tokens (prompt and response together)",
        )
    if not context:
        return request.sampling.max_new_tokens
    return min(request.sampling.max_new_tokens, context - prompt_tokens)
