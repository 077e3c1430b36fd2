"""The Triton backend: each version is one model on a Triton Inference Server (deploy/triton/model_repository):
``policy_stream__<version>``, the decoupled policy with continuous batching, which answers streamed rows per step and
unary rows in one piece (input STREAM=false). Versions are loaded under new names (Triton asks to unload a name before
loading it again) and unloaded once drained. (The unary template ``policy`` batches per execution, without rows joining
a running batch; the service does not need it.)

The service keeps the version's tokenizer (from the same save_pretrained folder, under the artifact root) to format
and count prompts and to decode tokens; Triton tokenizes the same formatted text with the same tokenizer and settings,
and samples with rlhf.core.generation, so the two backends give the same text for the same (prompt, seed, version).
Rows are sent as separate Triton requests; the model decodes concurrent ones together.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence

from rlhf.policy import metrics
from rlhf.policy.backend import (
    CANCELLED,
    DEADLINE,
    ERROR,
    BackendEvent,
    Generation,
    LoadedModel,
    PolicyBackend,
    RowSpec,
)
from rlhf.policy.config import PolicyConfig
from rlhf.core.runtime import model_context
from rlhf.policy.triton_client import GenerationRequest, TritonClientError, TritonPolicyClient, version_model_name
from rlhf.serving.errors import Unavailable
from rlhf.v1 import common_pb2

log = logging.getLogger(__name__)

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_CODES = {"INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "NOT_FOUND", "INTERNAL"}


def model_name(version: str) -> str:
    """The Triton model name of a version; characters Triton's names should not carry become '_'."""
    return version_model_name(_NAME_UNSAFE.sub("_", version), streaming=True)


def _error_code(e: TritonClientError) -> str:
    return e.status if e.status in _CODES else "INTERNAL"


class TritonModel(LoadedModel):
    backend = "triton"

    def __init__(self, version: str, client: TritonPolicyClient, tokenizer: object, context: int) -> None:
        self.version = version
        self.client = client
        self.tokenizer = tokenizer
        self.context = context
        self.model_name = model_name(version)
        self._active = metrics.ACTIVE_ROWS.labels(version)

    def generate(self, rows: Sequence[RowSpec], *, stream: bool, deadline: float | None = None) -> Generation:
        tasks: list[asyncio.Task] = []

        async def close() -> None:
            running = [t for t in tasks if not t.done()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

        generation = Generation(len(rows), on_cancel=lambda i: tasks[i].cancel(), on_close=close)
        for i, spec in enumerate(rows):
            request = GenerationRequest(
                prompt=spec.prompt_text,
                max_new_tokens=spec.params.max_new_tokens,
                temperature=spec.params.temperature,
                top_p=spec.params.top_p,
                top_k=spec.params.top_k,
                seed=spec.seed,
            )
            task = asyncio.create_task(self._row(i, request, stream, deadline, generation))
            # A task cancelled before it ran never reaches its own except clause: report its end here.
            task.add_done_callback(
                lambda t, i=i: generation.push(BackendEvent(i, (), CANCELLED)) if t.cancelled() else None
            )
            tasks.append(task)
        return generation

    async def _row(self, index: int, request: GenerationRequest, stream: bool, deadline: float | None,
                   generation: Generation) -> None:
        if deadline is not None and time.monotonic() > deadline:
            generation.push(BackendEvent(index, (), DEADLINE))
            return
        self._active.inc()
        try:
            if stream:
                # aclosing: leaving early cancels the Triton stream at once, and with it the request on the server.
                async with contextlib.aclosing(self.client.stream(self.model_name, request)) as chunks:
                    first = True
                    async for chunk in chunks:
                        generation.push(BackendEvent(
                            index, chunk.token_ids, _finish(chunk.finish_reason),
                            first_token_at=time.monotonic() if first and chunk.token_ids else None,
                        ))
                        first = first and not chunk.token_ids
            else:
                result = await self.client.complete(self.model_name, request)
                generation.push(BackendEvent(index, result.token_ids, _finish(result.finish_reason)))
        except asyncio.CancelledError:
            generation.push(BackendEvent(index, (), CANCELLED))
        except TritonClientError as e:
            generation.push(BackendEvent(index, (), ERROR, str(e), _error_code(e)))
        except Exception as e:  # noqa: BLE001 - every row must end with an event, or its caller waits forever
            log.exception("%s: row failed", self.model_name)
            generation.push(BackendEvent(index, (), ERROR, f"{type(e).__name__}: {e}", "INTERNAL"))
        finally:
            self._active.dec()

    async def check(self) -> None:
        if not await self.client.is_ready(self.model_name):
            raise Unavailable(f"Triton model {self.model_name} is not ready")

    async def unload(self) -> None:
        try:
            await self.client.unload(self.model_name)
        except TritonClientError as e:
            log.warning("unloading %s: %s", self.model_name, e)
        metrics.forget_version(self.version)


def _finish(reason: str | None) -> str | None:
    return reason or None


class TritonBackend(PolicyBackend):
    name = "triton"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.client: TritonPolicyClient | None = None

    async def start(self) -> None:
        # The aio client belongs to the loop that uses it.
        self.client = TritonPolicyClient(
            self.config.triton_url,
            template_repository=self.config.triton_model_repository or None,
            timeout_s=None,  # the service bounds each call by the caller's deadline
            load_timeout_s=self.config.triton_load_timeout_s,
        )

    def _parameters(self) -> dict[str, str]:
        cfg = self.config
        return {
            "device": cfg.device,
            "dtype": cfg.dtype,
            "torch_num_threads": str(cfg.torch_num_threads),
            "max_new_tokens_limit": str(cfg.max_new_tokens_limit),
            "add_special_tokens": "true" if cfg.add_special_tokens else "false",
        }

    async def load(self, version: common_pb2.ModelVersion, path: str) -> LoadedModel:
        assert self.client is not None, "start() first"
        from transformers import AutoConfig

        from rlhf.core.tokenizer import load_tokenizer

        loop = asyncio.get_running_loop()
        tokenizer = await loop.run_in_executor(None, load_tokenizer, path)
        model_config = await loop.run_in_executor(None, AutoConfig.from_pretrained, path)
        # Triton resolves a relative uri against its own model root (RLHF_MODEL_ROOT): the same files as ours.
        await self.client.load_version(
            model_name(version.version), version.uri, streaming=True, parameters=self._parameters(),
            max_batch_size=self.config.max_batch_size, max_queue_delay_us=int(self.config.max_wait_s * 1_000_000),
        )
        return TritonModel(version.version, self.client, tokenizer,
                           model_context(model_config, self.config.context_limit))

    async def check(self) -> None:
        if self.client is None or not await self.client.is_ready():
            raise Unavailable(f"Triton at {self.config.triton_url} is not ready")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
