"""The torch backend: each version is a model in this process with its own continuous-batching engine thread."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

import torch

from rlhf.core.generation import SamplingParams
from rlhf.core.models import load_causal_lm
from rlhf.core.runtime import model_context, resolve_device, resolve_dtype
from rlhf.policy import metrics
from rlhf.policy.backend import BackendEvent, Generation, LoadedModel, PolicyBackend, ResourceExhausted, RowSpec
from rlhf.policy.engine import BatchEngine, EngineStopped, QueueFull, Row, RowEvent
from rlhf.serving.errors import Unavailable
from rlhf.v1 import common_pb2

log = logging.getLogger(__name__)


class TorchModel(LoadedModel):
    backend = "torch"

    def __init__(self, version: str, model: torch.nn.Module, tokenizer: object, engine: BatchEngine,
                 context: int) -> None:
        self.version = version
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.context = context

    def generate(self, rows: Sequence[RowSpec], *, stream: bool, deadline: float | None = None) -> Generation:
        engine_rows: list[Row] = []
        generation = Generation(
            len(rows),
            on_cancel=lambda i: self.engine.cancel([engine_rows[i]]),
            on_close=lambda: self.engine.cancel([r for r in engine_rows if not r.finished]),
        )

        def on_event(index: int, event: RowEvent) -> None:
            generation.push(BackendEvent(index, event.tokens, event.finish, event.error, event.first_token_at))

        for i, spec in enumerate(rows):
            engine_rows.append(Row(spec.prompt_ids, spec.params, spec.seed, functools.partial(on_event, i),
                                   deadline=deadline, stream=stream))
        try:
            self.engine.submit(engine_rows)
        except QueueFull as e:
            raise ResourceExhausted(f"{e}; retry later") from None
        except EngineStopped as e:
            raise Unavailable(f"{e}; retry") from None
        return generation

    async def check(self) -> None:
        if not self.engine.alive:
            raise Unavailable(f"the engine of {self.version} is not running")

    async def unload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        self.model = None
        metrics.forget_version(self.version)


class TorchBackend(PolicyBackend):
    """Models in this process. ``torch_num_threads`` is process-wide (torch has one intra-op pool)."""

    name = "torch"

    def __init__(self, *, device: str = "auto", dtype: str = "auto", torch_num_threads: int = 0,
                 max_batch_size: int = 16, max_wait_s: float = 0.005, max_queue: int = 1024,
                 context_limit: int = 0) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.torch_num_threads = torch_num_threads
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.context_limit = context_limit

    async def start(self) -> None:
        if self.torch_num_threads > 0:
            torch.set_num_threads(self.torch_num_threads)

    async def load(self, version: common_pb2.ModelVersion, path: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        model, tokenizer = await loop.run_in_executor(None, self._load_weights, path)
        engine = BatchEngine(
            model,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            loop=loop,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.max_wait_s,
            max_queue=self.max_queue,
            metrics=metrics.engine_metrics(version.version),
            name=version.version,
        ).start()
        loaded = TorchModel(version.version, model, tokenizer, engine, model_context(model.config, self.context_limit))
        try:
            await _warm_up(loaded)
        except BaseException:
            await loaded.unload()
            raise
        log.info("loaded %s from %s on %s in %.1fs", version.version, path, self.device, time.monotonic() - started)
        return loaded

    def _load_weights(self, path: str) -> tuple[torch.nn.Module, object]:
        model, tokenizer = load_causal_lm(path, dtype=self.dtype)
        return model.to(self.device).eval(), tokenizer


async def _warm_up(model: TorchModel) -> None:
    """Generate two tokens: proves the weights, the tokenizer and the engine work together before traffic arrives."""
    ids = model.tokenizer("warm up", add_special_tokens=True)["input_ids"] or [model.engine.pad_token_id]
    spec = RowSpec("warm up", tuple(ids), SamplingParams(max_new_tokens=2, temperature=0.0), 0)
    async with model.generate([spec], stream=False) as generation:
        async for event in generation:
            if event.finish == "error":
                raise RuntimeError(f"warm-up generation of {model.version} failed: {event.error}")
