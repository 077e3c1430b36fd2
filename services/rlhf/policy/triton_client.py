"""An asyncio client for the policy models on a Triton Inference Server (gRPC), for the policy service's Triton backend.

    client = TritonPolicyClient("127.0.0.1:18001")
    await client.load_version("policy__v2", "policy/v2")           # a new name per version; blocks until ready
    results = await client.generate("policy__v2", [GenerationRequest("Hello", seed=1), ...])
    async for chunk in client.stream("policy_stream__v2", GenerationRequest("Hello", seed=1)):
        ...
    result = await client.complete("policy_stream__v2", GenerationRequest("Hello", seed=1))  # one piece
    await client.unload("policy__v1")

The models are the Python-backend policy of deploy/triton/model_repository (``policy`` unary, ``policy_stream``
decoupled). Versions are never reloaded under the same name (Triton asks to unload a name before loading it again):
``load_version`` loads a version under a new name from the template's config and model.py, sent with the load request
(``load_model(name, config=..., files=...)``), so the server needs nothing on disk but the weights: the only thing that
changes between versions is the config parameter ``model_path`` (a save_pretrained folder, absolute or relative to the
server's model root). Swap: load the new name, switch traffic, unload the old one.

Knows nothing of the gRPC server that uses it: inputs and results are plain dataclasses.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import tritonclient.grpc.aio as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

UNARY_TEMPLATE = "policy"
STREAM_TEMPLATE = "policy_stream"
TEMPLATES_ENV = "RLHF_TRITON_MODEL_REPOSITORY"


def version_model_name(version: str, streaming: bool = False) -> str:
    """The Triton model name of a policy version: ``policy__<version>`` (``policy_stream__<version>`` streaming)."""
    return f"{STREAM_TEMPLATE if streaming else UNARY_TEMPLATE}__{version}"


@dataclass(frozen=True)
class GenerationRequest:
    """One row to generate. Values are final: the caller resolves its defaults (0 temperature is greedy here)."""

    prompt: str
    """The text to continue, already formatted (chat template applied when wanted)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    """0 .. 2**64-1; same seed, prompt and version -> same text."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    """Response tokens, EOS included when it ended the response."""
    finish_reason: str
    """``"stop"`` (EOS) or ``"length"`` (max_new_tokens)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    text_delta: str
    token_ids: tuple[int, ...]
    """Tokens generated since the previous chunk."""
    finish_reason: str | None
    """None until the last chunk; then ``"stop"``, ``"length"`` or ``"cancelled"``."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far."""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class TritonClientError(Exception):
    """A failed call. ``status`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ...) when known."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    @staticmethod
    def wrap(e: InferenceServerException, what: str) -> TritonClientError:
        status = e.status()
        status = status.removeprefix("StatusCode.") if status else None
        return TritonClientError(f"{what}: {e.message()}", status)


@dataclass(frozen=True)
class ModelTemplate:
    """A template model folder of the repository: its config and model.py, sent with every version's load request."""

    config: model_config_pb2.ModelConfig
    model_py: bytes

    @staticmethod
    def read(folder: str | Path) -> ModelTemplate:
        folder = Path(folder)
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return ModelTemplate(config=config, model_py=(folder / "1" / "model.py").read_bytes())

    def for_version(
        self,
        name: str,
        model_path: str,
        parameters: Mapping[str, str] | None = None,
        *,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
    ) -> tuple[str, dict]:
        """(config JSON, files) of ``load_model`` for ``name`` serving the weights at ``model_path``; the batching
        overrides replace the template's ``max_batch_size`` and dynamic batcher delay when given."""
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(self.config)
        config.name = name
        if max_batch_size is not None:
            config.max_batch_size = max_batch_size
        if max_queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
        for key, value in {**(parameters or {}), "model_path": model_path}.items():
            config.parameters[key].string_value = str(value)
        files = {"file:1/model.py": self.model_py}
        return json_format.MessageToJson(config, preserving_proto_field_name=True), files


def default_template_repository() -> Path:
    """``$RLHF_TRITON_MODEL_REPOSITORY``, else deploy/triton/model_repository of this checkout."""
    env = os.environ.get(TEMPLATES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "deploy" / "triton" / "model_repository"


class TritonPolicyClient:
    """One gRPC channel to a Triton server. Create it inside the event loop that uses it; ``await close()`` after."""

    def __init__(
        self,
        url: str,
        *,
        template_repository: str | Path | None = None,
        timeout_s: float | None = 120.0,
        load_timeout_s: float = 300.0,
    ) -> None:
        """``url`` host:port of Triton's gRPC endpoint; ``template_repository`` the folder with the ``policy`` and
        ``policy_stream`` templates (default: see `default_template_repository`); ``timeout_s`` the deadline of one
        generation (None: none); ``load_timeout_s`` of a model load."""
        self.url = url
        self._client = grpcclient.InferenceServerClient(url)
        self._templates_dir = Path(template_repository) if template_repository else default_template_repository()
        self._templates: dict[str, ModelTemplate] = {}
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TritonPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------- health and versions

    async def is_ready(self, model_name: str | None = None) -> bool:
        """Whether ``model_name`` is ready for inference, or, without a name, the server. False (never an exception)
        when the server is unreachable."""
        try:
            if model_name is None:
                return bool(await self._client.is_server_ready(client_timeout=5))
            return bool(await self._client.is_model_ready(model_name, client_timeout=5))
        except InferenceServerException:
            return False

    async def loaded_models(self) -> list[str]:
        """Names of the loaded models. (The repository index lists only the repository's folders, not the versions
        loaded from a config and files override; the statistics list every loaded model.)"""
        try:
            stats = await self._client.get_inference_statistics(as_json=True, client_timeout=10)
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, "statistics") from None
        return sorted({m["name"] for m in stats.get("model_stats", [])})

    def template(self, streaming: bool) -> ModelTemplate:
        name = STREAM_TEMPLATE if streaming else UNARY_TEMPLATE
        if name not in self._templates:
            folder = self._templates_dir / name
            if not (folder / "config.pbtxt").exists():
                raise TritonClientError(
                    f"no template model at {folder}; set {TEMPLATES_ENV} (or template_repository) to the folder that "
                    "holds deploy/triton/model_repository's policy and policy_stream"
                )
            self._templates[name] = ModelTemplate.read(folder)
        return self._templates[name]

    async def load_version(
        self,
        name: str,
        model_path: str,
        *,
        streaming: bool = False,
        parameters: Mapping[str, str] | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
    ) -> None:
        """Load the weights at ``model_path`` as model ``name`` (unary, or decoupled when ``streaming``) and wait until
        it is ready. ``parameters`` overrides other config parameters (device, dtype, torch_num_threads, ...);
        ``max_batch_size`` / ``max_queue_delay_us`` the template's batching.

        A name that is already loaded with the same ``model_path`` is left as it is; with another one it is an error:
        load versions under new names (see `version_model_name`).
        """
        if await self.is_ready(name):
            try:
                current = await self._client.get_model_config(name, as_json=True, client_timeout=10)
            except InferenceServerException as e:
                raise TritonClientError.wrap(e, f"config of {name}") from None
            loaded_path = current["config"].get("parameters", {}).get("model_path", {}).get("string_value")
            if loaded_path == model_path:
                return
            raise TritonClientError(
                f"{name} is loaded already with model_path {loaded_path!r}; load {model_path!r} under a new name",
                "ALREADY_EXISTS",
            )
        config, files = self.template(streaming).for_version(
            name, model_path, parameters, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us
        )
        try:
            # Returns once the model is loaded (or failed to load: the error says why, e.g. a bad model_path).
            await self._client.load_model(name, config=config, files=files, client_timeout=self.load_timeout_s)
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, f"loading {name} from {model_path}") from None
        if not await self.is_ready(name):
            raise TritonClientError(f"{name} was loaded but is not ready", "UNAVAILABLE")

    async def unload(self, name: str, *, wait_s: float = 60.0) -> None:
        """Unload ``name``; Triton lets its in-flight requests finish first. Returns when it is no longer ready."""
        try:
            await self._client.unload_model(name, client_timeout=30)
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, f"unloading {name}") from None
        deadline = asyncio.get_running_loop().time() + wait_s
        while await self.is_ready(name):
            if asyncio.get_running_loop().time() > deadline:
                raise TritonClientError(f"{name} still ready {wait_s:.0f}s after its unload", "DEADLINE_EXCEEDED")
            await asyncio.sleep(0.05)

    async def batch_statistics(self, name: str) -> tuple[int, int]:
        """(rows inferred, executions) of ``name`` since it was loaded: executions < rows means batches were formed."""
        try:
            stats = await self._client.get_inference_statistics(name, as_json=True, client_timeout=10)
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, f"statistics of {name}") from None
        model = stats["model_stats"][0]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    # ----------------------------------------------------------------------------------------- inference

    async def generate(self, model_name: str, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order. Each row is its own Triton request, sent concurrently, so Triton's
        dynamic batcher puts them (and other callers' rows) into shared batches. Raises `TritonClientError` for the
        first row that failed."""
        results = await asyncio.gather(*(self._generate_one(model_name, r) for r in requests))
        return list(results)

    async def _generate_one(self, model_name: str, request: GenerationRequest) -> GenerationResult:
        try:
            result = await self._client.infer(model_name, _inputs(request), client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, f"{model_name}") from None
        ids = result.as_numpy("COMPLETION_IDS")[0]
        completion_tokens = int(result.as_numpy("COMPLETION_TOKENS")[0, 0])
        return GenerationResult(
            text=_string(result.as_numpy("TEXT")),
            token_ids=tuple(int(i) for i in ids[:completion_tokens]),
            finish_reason=_string(result.as_numpy("FINISH_REASON")),
            prompt_tokens=int(result.as_numpy("PROMPT_TOKENS")[0, 0]),
            completion_tokens=completion_tokens,
        )

    async def complete(self, model_name: str, request: GenerationRequest) -> GenerationResult:
        """One row through a decoupled (streaming) model, answered in one piece (input STREAM=false): the model's
        continuous batching serves it, and a cancelled call (the task cancelled) stops it on the server."""
        async with contextlib.aclosing(self.stream(model_name, request, per_step=False)) as chunks:
            async for chunk in chunks:
                if chunk.final:
                    return GenerationResult(
                        text=chunk.text_delta,
                        token_ids=chunk.token_ids,
                        finish_reason=chunk.finish_reason or "",
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens,
                    )
        raise TritonClientError(f"{model_name}: no final response", "UNAVAILABLE")

    async def stream(
        self, model_name: str, request: GenerationRequest, *, per_step: bool = True
    ) -> AsyncIterator[StreamChunk]:
        """Chunks of a decoupled (streaming) model as they come; the last one has ``finish_reason`` set.

        Closing the iterator early cancels the gRPC stream, and with it the request on the server: the model stops
        decoding it. ``break`` alone leaves an async generator open until it is garbage-collected; close it at once
        with ``async with contextlib.aclosing(client.stream(...)) as chunks: async for chunk in chunks: ...``.
        ``per_step=False`` sends STREAM=false: the model answers with the final chunk only.
        """
        finished = asyncio.Event()

        async def one_request():
            yield {"model_name": model_name, "inputs": _inputs(request, stream=per_step)}
            # Keep our side of the stream open until the final response arrived; closing it early is not a cancel,
            # but waiting makes the end of the call unambiguous.
            await finished.wait()

        calls = self._client.stream_infer(one_request(), stream_timeout=self.timeout_s)
        try:
            async for result, error in calls:
                if error is not None:
                    raise TritonClientError(f"{model_name}: {error.message()}", None)
                reason = _string(result.as_numpy("FINISH_REASON"))
                chunk = StreamChunk(
                    text_delta=_string(result.as_numpy("TEXT_DELTA")),
                    token_ids=tuple(int(i) for i in result.as_numpy("TOKEN_IDS").reshape(-1)),
                    finish_reason=reason or None,
                    prompt_tokens=int(result.as_numpy("PROMPT_TOKENS")[0, 0]),
                    completion_tokens=int(result.as_numpy("COMPLETION_TOKENS")[0, 0]),
                )
                if chunk.final:
                    finished.set()  # lets our side of the stream close normally
                yield chunk
                if chunk.final:
                    return
            raise TritonClientError(f"{model_name}: the stream ended without a final response", "UNAVAILABLE")
        except InferenceServerException as e:
            raise TritonClientError.wrap(e, model_name) from None
        except grpc.aio.AioRpcError as e:  # the aio stream raises the channel's own errors (server gone, ...)
            raise TritonClientError(f"{model_name}: {e.details()}", e.code().name) from None
        finally:
            if not finished.is_set():
                finished.set()
                calls.cancel()


def _inputs(request: GenerationRequest, stream: bool | None = None) -> list[grpcclient.InferInput]:
    values = [
        ("PROMPT", "BYTES", np.array([[request.prompt.encode("utf-8")]], dtype=np.object_)),
        ("MAX_NEW_TOKENS", "INT32", np.array([[request.max_new_tokens]], dtype=np.int32)),
        ("TEMPERATURE", "FP32", np.array([[request.temperature]], dtype=np.float32)),
        ("TOP_P", "FP32", np.array([[request.top_p]], dtype=np.float32)),
        ("TOP_K", "INT32", np.array([[request.top_k]], dtype=np.int32)),
        ("SEED", "UINT64", np.array([[request.seed]], dtype=np.uint64)),
    ]
    if stream is not None:  # decoupled models only (an optional input of policy_stream)
        values.append(("STREAM", "BOOL", np.array([[stream]], dtype=np.bool_)))
    inputs = []
    for name, dtype, array in values:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _string(array: np.ndarray) -> str:
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
