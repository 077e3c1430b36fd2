"""What the policy service needs from an inference backend: load a version, generate rows, unload it.

A backend knows nothing of gRPC, routing or recording. The service gives it rows that are final (prompt formatted and
tokenized, sampling values resolved, max_new_tokens cut to the context, one seed per row) and reads back token ids;
text, stop sequences and finish reasons of the API are the service's (rlhf.policy.text), the same for every backend.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from rlhf.core.generation import SamplingParams
from rlhf.policy.engine import CANCELLED, DEADLINE, ERROR, LENGTH, STOP  # why a row ended
from rlhf.serving.errors import ResourceExhausted
from rlhf.v1 import common_pb2

__all__ = ["STOP", "LENGTH", "CANCELLED", "DEADLINE", "ERROR", "ResourceExhausted", "RowSpec", "BackendEvent",
           "Generation", "LoadedModel", "PolicyBackend"]


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One sample to generate."""

    prompt_text: str
    """The prompt as the model sees it (chat template applied)."""
    prompt_ids: tuple[int, ...]
    """``prompt_text`` tokenized with the version's tokenizer."""
    params: SamplingParams
    """Resolved values; max_new_tokens already fits the context."""
    seed: int
    """0 .. 2**64-1."""


@dataclasses.dataclass(frozen=True)
class BackendEvent:
    """New tokens of one row, and its end."""

    row: int
    tokens: tuple[int, ...]
    finish: str | None = None
    error: str = ""
    """What went wrong, with finish ERROR."""
    error_code: str = "INTERNAL"
    """The gRPC status name an ERROR maps to (INVALID_ARGUMENT, UNAVAILABLE, ...)."""
    first_token_at: float | None = None
    """time.monotonic() of the row's first token, when this event carries it (None: unknown)."""


class Generation:
    """The events of a set of rows, as an async iterator that ends when every row has finished.

    ``cancel(row)`` stops one row (its final event says CANCELLED, unless it finished first); ``aclose()`` stops every
    row still running. Backends push events with ``push`` (on the event loop).
    """

    def __init__(self, rows: int, on_cancel: Callable[[int], None], on_close: Callable[[], Any]) -> None:
        self._queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self._open = set(range(rows))
        self._on_cancel = on_cancel
        self._on_close = on_close
        self._closed = False

    def push(self, event: BackendEvent) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> BackendEvent:
        if not self._open:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finish is not None:
            self._open.discard(event.row)
        return event

    @property
    def running(self) -> set[int]:
        return set(self._open)

    def cancel(self, row: int) -> None:
        if row in self._open:
            self._on_cancel(row)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._open:
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LoadedModel(abc.ABC):
    """One version, loaded and ready on a backend."""

    version: str
    backend: str
    tokenizer: Any
    """The version's Hugging Face tokenizer (formatting, counting and decoding happen in the service)."""
    context: int
    """Longest prompt + response in tokens (0: unbounded)."""

    @abc.abstractmethod
    def generate(self, rows: Sequence[RowSpec], *, stream: bool, deadline: float | None = None) -> Generation:
        """Start the rows. ``stream``: an event per new token; else one event per row at its end. ``deadline``
        (time.monotonic()) is when the caller stops waiting: rows not started by then are not generated."""

    @abc.abstractmethod
    async def unload(self) -> None:
        """Release the version; called once no request uses it any more."""

    async def check(self) -> None:
        """Raise when the version cannot serve (health)."""


class PolicyBackend(abc.ABC):
    """Loads versions on one kind of inference engine."""

    name: str

    async def start(self) -> None:
        """Connect (Triton) or prepare (torch). Called once, on the event loop that serves."""

    @abc.abstractmethod
    async def load(self, version: common_pb2.ModelVersion, path: str) -> LoadedModel:
        """Load ``version`` whose save_pretrained folder is ``path`` (local, resolved against the artifact root) and
        return it once it is ready to serve; raise when it cannot be."""

    async def check(self) -> None:
        """Raise when the backend itself is down (health)."""

    async def close(self) -> None:
        """Release connections; loaded versions were unloaded before."""
