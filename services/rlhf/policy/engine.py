"""Continuous batching for a Hugging Face causal LM on a dedicated thread: the torch backend's engine, and the Triton
decoupled policy model's (deploy/triton).

Rows (one per sample) wait in a queue; the engine thread decodes every active row together with one KV cache and lets
queued rows join between decode steps:

1. admit: when idle, wait for a first row, then up to ``max_wait_s`` for more (or a full batch); when busy, take
   whatever is queued, up to ``max_batch_size`` active rows. A row whose deadline passed while queued is dropped
   without being generated; a cancelled row leaves the queue at once.
2. prefill the admitted rows in one forward pass (left-padded) and merge their cache into the running batch: both are
   left-padded to the longer length, so every row's tokens stay right-aligned and the attention mask hides the padding.
3. sample one token per row with ``rlhf.core.generation``'s sampler and each row's own uniforms (seeded per row,
   drawn up front), so a row's text depends on its seed, prompt and the weights, not on its neighbours in the batch.
4. retire rows that finished (EOS / a stop token, max_new_tokens, deadline) or were cancelled, and drop the cache
   columns that only padding uses any more.
5. one decode forward pass for the rest; back to 1.

Results go back to the event loop with one ``call_soon_threadsafe`` per step for all rows. Streaming rows get every
token; other rows only their end.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
# Needs transformers >= 4.56: DynamicLayer (cache.layers[i].keys/.values) comes from the 2025 cache refactor (4.54),
# and only from 4.56 do all our models (GPT-2 too) return such a DynamicCache rather than a legacy tuple.
from transformers.cache_utils import DynamicLayer

# The sampler, the per-row uniforms and the forward-call plumbing are rlhf.core.generation's own, so that a row
# decoded here gets exactly the tokens that core.generate gives the same (prompt, seed, params) alone.
from rlhf.core.generation import (
    SamplingParams,
    forward_spec,
    position_ids_from_mask,
    returned_cache,
    RowParams,
    sample_tokens,
    row_uniforms,
    left_pad,
)

log = logging.getLogger(__name__)

# Why a row ended: the core's 'stop' (EOS or a stop token) and 'length', plus the engine's own.
STOP, LENGTH, CANCELLED, DEADLINE, ERROR = "stop", "length", "cancelled", "deadline", "error"


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` rows already."""


class EngineStopped(Exception):
    """The engine is stopping or stopped."""


@dataclasses.dataclass(frozen=True)
class RowEvent:
    """What a row produced since its last event."""

    tokens: tuple[int, ...]
    """New tokens (all of them at the end of a non-streaming row), EOS / stop token included when it ended the row."""
    finish: str | None = None
    """None while the row runs; else STOP, LENGTH, CANCELLED, DEADLINE or ERROR."""
    error: str = ""
    first_token_at: float | None = None
    """time.monotonic() of the row's first token, on its first event that has tokens."""


class Row:
    """One sample to generate. Built on the event loop; owned by the engine thread once submitted."""

    __slots__ = ("prompt_ids", "params", "seed", "deadline", "stream", "on_event", "stop_ids", "tokens", "step",
                 "uniforms", "cancelled", "finished", "first_token_at", "_sent")

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        on_event: Callable[[RowEvent], None],
        *,
        deadline: float | None = None,
        stream: bool = False,
    ) -> None:
        if not prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = int(seed)
        self.deadline = deadline  # time.monotonic() after which the row is dropped
        self.stream = stream
        self.on_event = on_event  # called on the engine's event loop
        self.stop_ids: frozenset[int] = frozenset()
        self.tokens: list[int] = []
        self.step = 0
        self.uniforms: list[float] = []
        self.cancelled = False  # set from the loop; read by the engine between steps
        self.finished = False
        self.first_token_at: float | None = None
        self._sent = 0  # tokens already delivered (streaming)

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class EngineMetrics:
    """Prometheus children for one engine (labelled by version by the caller); any may be None."""

    queue_depth: Any = None  # Gauge
    active_rows: Any = None  # Gauge
    batch_size: Any = None  # Histogram: rows per decode step
    expired: Any = None  # Counter: rows whose deadline passed while queued
    steps: Any = None  # Counter: forward passes


class BatchEngine:
    """Decodes rows of one model with continuous batching on its own thread.

    ``loop`` receives the rows' events: ``loop.call_soon_threadsafe(dispatch, events)`` once per step. An asyncio loop
    (the policy service) runs the rows' ``on_event`` there; the Triton model passes an object that calls at once, on the
    engine thread (its response senders may be used from any thread).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int,
        loop: Any,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        metrics: EngineMetrics | None = None,
        name: str = "policy",
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_ids = frozenset(int(i) for i in eos)
        self.pad_token_id = int(pad_token_id)
        self.loop = loop
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics or EngineMetrics()
        self.name = name
        self._spec = forward_spec(model)
        self._extra = {"logits_to_keep": 1} if self._spec.logits_to_keep else {}
        self._queue: collections.deque[Row] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        # The running batch (engine thread only).
        self._rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, L) long
        self._next_pos: torch.Tensor | None = None  # (B,) long: position of each row's next token
        self._logits: torch.Tensor | None = None  # (B, V) float: each row's next-token logits
        self._row_params: RowParams | None = None
        self._active = 0  # len(self._rows), readable from other threads

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread; queued and active rows end with ERROR."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_rows(self) -> int:
        return self._active

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue rows (thread-safe). QueueFull when they do not fit; EngineStopped after ``stop``."""
        for row in rows:
            row.stop_ids = self.eos_ids | frozenset(row.params.stop_token_ids)
        with self._cond:
            if self._stopping:
                raise EngineStopped(f"{self.name} is stopping")
            if len(self._queue) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} rows are queued for {self.name} (max_queue {self.max_queue})")
            self._queue.extend(rows)
            self._set_gauge(self.metrics.queue_depth, len(self._queue))
            self._cond.notify_all()

    def cancel(self, rows: Sequence[Row]) -> None:
        """Stop rows (thread-safe): a queued row leaves the queue now, an active one before the next decode step."""
        events = []
        with self._cond:
            for row in rows:
                row.cancelled = True
                try:
                    self._queue.remove(row)
                except ValueError:
                    continue
                events.append(self._finish(row, CANCELLED))  # never started
            self._set_gauge(self.metrics.queue_depth, len(self._queue))
        self._deliver(events)

    # ------------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._admit()
                if admitted is None:
                    break
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed forward fails the rows of the batch, not the engine
                    log.exception("%s: generation failed", self.name)
                    self._fail_all([*admitted, *self._rows], f"generation failed: {type(e).__name__}: {e}")
        self._fail_all([*self._rows, *self._drain_queue()], f"{self.name} stopped")

    def _admit(self) -> list[Row] | None:
        """Rows to add to the batch (possibly none); None when stopping."""
        with self._cond:
            if not self._rows:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                # Idle: give the first request max_wait_s to find company for its first batch.
                until = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.max_batch_size and not self._stopping:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping:
                return None
            take: list[Row] = []
            while self._queue and len(self._rows) + len(take) < self.max_batch_size:
                take.append(self._queue.popleft())
            self._set_gauge(self.metrics.queue_depth, len(self._queue))
        now = time.monotonic()
        admitted = []
        events: list[tuple[Row, RowEvent]] = []
        for row in take:
            if row.cancelled:
                events.append(self._finish(row, CANCELLED))
            elif row.deadline is not None and now > row.deadline:
                if self.metrics.expired is not None:
                    self.metrics.expired.inc()
                events.append(self._finish(row, DEADLINE))
            else:
                admitted.append(row)
        self._deliver(events)
        return admitted

    def _prefill(self, rows: list[Row]) -> None:
        input_ids, mask = left_pad([r.prompt_ids for r in rows], self.pad_token_id, self.device)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True, **self._extra
        )
        cache = returned_cache(out, self._spec)
        logits = out.logits[:, -1].float()
        next_pos = mask.sum(dim=1)
        for row in rows:
            row.uniforms = row_uniforms([row.seed], row.params.max_new_tokens, torch.device("cpu"))[:, 0].tolist()
        self._merge(rows, cache, mask, next_pos, logits)

    def _merge(self, rows: list[Row], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor,
               logits: torch.Tensor) -> None:
        layers = _layers(cache)
        if not self._rows:
            self._cache, self._mask, self._next_pos, self._logits = cache, mask.long(), next_pos, logits
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            old_pad, new_pad = width - self._mask.shape[1], width - mask.shape[1]
            for old, new in zip(_layers(self._cache), layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)], dim=0)
                old.values = torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)], dim=0)
            self._mask = torch.cat([_pad_left(self._mask, old_pad), _pad_left(mask.long(), new_pad)], dim=0)
            self._next_pos = torch.cat([self._next_pos, next_pos])
            self._logits = torch.cat([self._logits, logits])
        self._rows = [*self._rows, *rows]
        self._row_params = None
        self._active = len(self._rows)
        self._set_gauge(self.metrics.active_rows, self._active)

    def _step(self) -> None:
        rows = self._rows
        if self._row_params is None:
            self._row_params = RowParams.build([r.params for r in rows], self._logits.shape[-1], self._logits.device)
        uniforms = torch.tensor([r.uniforms[r.step] for r in rows], dtype=torch.float32, device=self._logits.device)
        tokens, _ = sample_tokens(self._logits, self._row_params, uniforms, False)
        token_list = tokens.tolist()
        now = time.monotonic()
        keep: list[int] = []
        events: list[tuple[Row, RowEvent]] = []
        for i, row in enumerate(rows):
            if row.cancelled:
                events.append(self._finish(row, CANCELLED))
                continue
            token = token_list[i]
            row.tokens.append(token)
            row.step += 1
            if row.first_token_at is None:
                row.first_token_at = now
            if token in row.stop_ids:
                events.append(self._finish(row, STOP))
            elif row.step >= row.params.max_new_tokens:
                events.append(self._finish(row, LENGTH))
            elif row.deadline is not None and now > row.deadline:
                events.append(self._finish(row, DEADLINE))
            else:
                keep.append(i)
                if row.stream:
                    events.append((row, self._tokens_event(row)))
        if len(keep) < len(rows):
            self._retire(keep)
        self._deliver(events)  # after the retire: a finished row's slot is free when its caller hears of it
        if not self._rows:
            return
        if len(keep) < len(rows):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        # One decode step for the rows that go on.
        batch = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self._mask,
            position_ids=self._next_pos[:, None],
            use_cache=True,
            **{self._spec.cache_kwarg: self._cache},
            **self._extra,
        )
        self._cache = returned_cache(out, self._spec)
        self._logits = out.logits[:, -1].float()
        self._next_pos = self._next_pos + 1
        if self.metrics.batch_size is not None:
            self.metrics.batch_size.observe(batch)
        if self.metrics.steps is not None:
            self.metrics.steps.inc()

    def _retire(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``; drop cache columns that are padding for every row left."""
        self._row_params = None
        if not keep:
            self._rows, self._cache, self._mask, self._next_pos, self._logits = [], None, None, None, None
        else:
            index = torch.tensor(keep, device=self._mask.device)
            self._rows = [self._rows[i] for i in keep]
            self._next_pos = self._next_pos[index]
            self._logits = self._logits[index]
            # Rows are right-aligned: row i's tokens are its last next_pos[i] columns.
            start = self._mask.shape[1] - int(self._next_pos.max())
            self._mask = self._mask[index, start:]
            for layer in _layers(self._cache):
                layer.keys = layer.keys[index, :, start:]
                layer.values = layer.values[index, :, start:]
        self._active = len(self._rows)
        self._set_gauge(self.metrics.active_rows, self._active)

    # ------------------------------------------------------------------------------------------ events

    def _tokens_event(self, row: Row) -> RowEvent:
        new = tuple(row.tokens[row._sent:])
        first = row.first_token_at if row._sent == 0 else None
        row._sent = len(row.tokens)
        return RowEvent(tokens=new, first_token_at=first)

    def _finish(self, row: Row, reason: str, error: str = "") -> tuple[Row, RowEvent]:
        row.finished = True
        new = tuple(row.tokens[row._sent:])
        first = row.first_token_at if row._sent == 0 else None
        row._sent = len(row.tokens)
        return row, RowEvent(tokens=new, finish=reason, error=error, first_token_at=first)

    def _deliver(self, events: list[tuple[Row, RowEvent]]) -> None:
        if not events:
            return
        try:
            self.loop.call_soon_threadsafe(_dispatch, events)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _fail_all(self, rows: list[Row], message: str) -> None:
        events = [self._finish(r, ERROR, message) for r in rows if not r.finished]
        self._rows, self._cache, self._mask, self._next_pos, self._logits = [], None, None, None, None
        self._row_params = None
        self._active = 0
        self._set_gauge(self.metrics.active_rows, 0)
        self._deliver(events)

    def _drain_queue(self) -> list[Row]:
        with self._cond:
            rows = list(self._queue)
            self._queue.clear()
            self._set_gauge(self.metrics.queue_depth, 0)
        return rows

    @staticmethod
    def _set_gauge(gauge: Any, value: int) -> None:
        if gauge is not None:
            gauge.set(value)


def _dispatch(events: list[tuple[Row, RowEvent]]) -> None:
    for row, event in events:
        try:
            row.on_event(event)
        except Exception:  # a consumer's bug must not stop the others' events
            log.exception("row event handler failed")


def _layers(cache: Any) -> list[DynamicLayer]:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(
            f"continuous batching merges full-attention DynamicCache layers; this model's cache has {kinds}"
        )
    return layers


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero columns in front of the sequence dimension: dim 1 of a (B, L) mask, dim 2 of a (B, H, L, D) cache."""
    if width == 0:
        return tensor
    seq_dim = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[seq_dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=seq_dim)
