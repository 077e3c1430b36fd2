"""The policy behind Triton's Python backend: any Hugging Face causal LM, sampled with ``rlhf.core.generation``.

One file serves every policy version, unary (``policy``) and streaming (``policy_stream``, decoupled): the config's
``model_transaction_policy`` decides which. Versions differ only in the config parameter ``model_path``, so the policy
service loads each one under a new model name with a config override (see ``rlhf.policy.triton_client``).

Same inputs, same text as the torch backend: prompts are tokenized as ``encode_prompts`` does, sampled with
``rlhf.core.generation``'s sampler (per-row seeds, temperature, top-k, top-p) and decoded with ``skip_special_tokens``,
exactly as in process. A row's tokens depend on its own seed and logits only, so the rows that share a batch do not
change each other's text.

Unary (``policy``): each execution decodes the batch the dynamic batcher formed, to the end (``generate``).
Decoupled (``policy_stream``): continuous batching. ``execute`` only queues the requests' rows on the policy service's
own engine (``rlhf.policy.engine.BatchEngine``, a thread that decodes every active row with one KV cache and lets new
rows join between decode steps) and returns; the engine thread sends each row's responses as tokens come. A request's
optional input STREAM=false asks for one final response with the whole text instead of a response per step: the
policy service serves its unary calls that way too, so one model per version does both. A cancelled request (the
client closed its stream) stops decoding at the next step.

Needs, in the environment of the stub (the ``python3`` first on the server's PATH): torch, transformers, the ``rlhf``
package and numpy < 2 (deploy/local/triton.py sees to it locally).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

try:
    from rlhf.core.generation import SamplingParams, decode_responses, encode_prompts, generate
    from rlhf.core.models import load_causal_lm
    from rlhf.policy.engine import ERROR, BatchEngine, EngineStopped, QueueFull
    from rlhf.policy.engine import Row as EngineRow
except ImportError as e:  # pragma: no cover - a deployment error, reported at load time
    raise ImportError(
        f"{e}: the policy model needs the rlhf package in the environment of the Triton Python stub "
        "(the python3 first on tritonserver's PATH): pip install it there"
    ) from e

SAMPLING_INPUTS = ("MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "TOP_K", "SEED")


@dataclass(frozen=True)
class ModelSettings:
    """The config's ``parameters``, parsed once in ``initialize``."""

    model_path: str  # absolute path of the save_pretrained folder
    device: torch.device
    dtype: torch.dtype | None  # None: as saved
    torch_num_threads: int  # 0: torch's default
    max_new_tokens_limit: int
    add_special_tokens: bool
    max_active_rows: int  # decoupled: rows the engine decodes together (0: the config's max_batch_size)
    max_queued_rows: int  # decoupled: rows waiting for a slot before requests are refused

    @staticmethod
    def from_args(args: dict) -> ModelSettings:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        model_path = params.get("model_path", "")
        if not model_path:
            raise ValueError(
                f"model {args['model_name']!r}: parameter model_path is empty; load it with a config that sets it "
                "(rlhf.policy.triton_client.TritonPolicyClient.load_version)"
            )
        if not os.path.isabs(model_path):
            root = params.get("model_root") or os.environ.get("RLHF_MODEL_ROOT", "")
            if not root:
                raise ValueError(
                    f"model {args['model_name']!r}: model_path {model_path!r} is relative but neither parameter "
                    "model_root nor the server's RLHF_MODEL_ROOT is set"
                )
            model_path = os.path.join(root, model_path)
        if not os.path.isdir(model_path):
            raise ValueError(f"model {args['model_name']!r}: model_path {model_path} is not a folder")
        return ModelSettings(
            model_path=model_path,
            device=_device(params.get("device", "auto"), args),
            dtype=_dtype(params.get("dtype", "auto")),
            torch_num_threads=int(params.get("torch_num_threads") or 0),
            max_new_tokens_limit=int(params.get("max_new_tokens_limit") or 1024),
            add_special_tokens=params.get("add_special_tokens", "true").lower() in ("1", "true", "yes"),
            max_active_rows=int(params.get("max_active_rows") or 0) or int(config.get("max_batch_size") or 8),
            max_queued_rows=int(params.get("max_queued_rows") or 1024),
        )


def _device(name: str, args: dict) -> torch.device:
    if name == "auto":
        if args.get("model_instance_kind") == "GPU":
            return torch.device("cuda", int(args["model_instance_device_id"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str) -> torch.dtype | None:
    if name in ("", "auto"):
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"parameter dtype {name!r} is not a torch dtype (float32, bfloat16, float16 or auto)")
    return dtype


@dataclass(frozen=True)
class Row:
    """One prompt to answer: which request (and row of it) it came from, and how to sample it."""

    request: int  # index in execute's list of requests
    prompt: str
    params: SamplingParams
    seed: int
    stream: bool = True  # decoupled: a response per step (False: one final response)


class RequestError(ValueError):
    """A request the model cannot serve as asked; its message goes back to the client as INVALID_ARG."""


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.name = args["model_name"]
        self.settings = ModelSettings.from_args(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        if self.settings.torch_num_threads > 0:
            torch.set_num_threads(self.settings.torch_num_threads)
        model, self.tokenizer = load_causal_lm(self.settings.model_path, dtype=self.settings.dtype)
        self.model = model.to(self.settings.device).eval()
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        # GPT-2 calls it n_positions; its config maps max_position_embeddings onto it.
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.engine: BatchEngine | None = None
        if self.decoupled:
            self.engine = BatchEngine(
                self.model,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id if self.pad_token_id is not None else self.eos_token_id,
                loop=_OnEngineThread(),
                max_batch_size=self.settings.max_active_rows,
                max_wait_s=0.0,  # Triton's dynamic batcher already gathered the requests of an execution
                max_queue=self.settings.max_queued_rows,
                name=self.name,
            ).start()
            self._watcher = _CancellationWatcher(self.engine)
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {self.settings.model_path} on {self.settings.device} "
            f"({'decoupled, continuous batching' if self.decoupled else 'unary'}, "
            f"context {self.context or 'unbounded'})"
        )

    # ----------------------------------------------------------------------------------------- requests -> rows

    def _rows(self, index: int, request) -> list[Row]:
        prompts = _input(request, "PROMPT")
        values = {name: _input(request, name) for name in SAMPLING_INPUTS}
        stream = _optional_input(request, "STREAM")
        rows = []
        for i, raw in enumerate(prompts):
            try:
                prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                raise RequestError(f"PROMPT row {i} is not UTF-8") from None
            max_new_tokens = int(values["MAX_NEW_TOKENS"][i])
            if max_new_tokens > self.settings.max_new_tokens_limit:
                raise RequestError(
                    f"MAX_NEW_TOKENS={max_new_tokens} exceeds this model's max_new_tokens_limit "
                    f"{self.settings.max_new_tokens_limit}"
                )
            try:
                params = SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=float(values["TEMPERATURE"][i]),
                    top_k=int(values["TOP_K"][i]),
                    top_p=float(values["TOP_P"][i]),
                )
            except ValueError as e:
                raise RequestError(str(e)) from None
            rows.append(Row(request=index, prompt=prompt, params=params, seed=int(values["SEED"][i]),
                            stream=bool(stream[i]) if stream is not None else True))
        return rows

    def _check_lengths(self, rows: list[Row]) -> None:
        """Every prompt has tokens and fits the context with its max_new_tokens."""
        encoded = self.tokenizer(
            [r.prompt for r in rows], add_special_tokens=self.settings.add_special_tokens
        )["input_ids"]
        for row, ids in zip(rows, encoded, strict=True):
            if not ids:
                raise RequestError("PROMPT tokenizes to no tokens; send at least one token of text")
            if self.context and len(ids) + row.params.max_new_tokens > self.context:
                raise RequestError(
                    f"PROMPT has {len(ids)} tokens; with MAX_NEW_TOKENS={row.params.max_new_tokens} that exceeds "
                    f"the model's context of {self.context} tokens"
                )

    def _parse(self, requests: list) -> tuple[list[Row], dict[int, str]]:
        """The rows of the requests that are valid, and an error message per invalid request."""
        rows: list[Row] = []
        errors: dict[int, str] = {}
        for index, request in enumerate(requests):
            try:
                request_rows = self._rows(index, request)
                if self.decoupled and len(request_rows) != 1:
                    raise RequestError(f"a streaming request has one row; this one has {len(request_rows)}")
                self._check_lengths(request_rows)
            except (RequestError, KeyError, IndexError, ValueError, TypeError) as e:
                errors[index] = str(e)
                continue
            rows.extend(request_rows)
        return rows, errors

    def _encode(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(
            self.tokenizer,
            [r.prompt for r in rows],
            device=self.settings.device,
            add_special_tokens=self.settings.add_special_tokens,
        )

    # ----------------------------------------------------------------------------------------- execute

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            self._stream(requests)
            return None
        return self._unary(requests)

    def _unary(self, requests: list) -> list:
        """One response per request, in order; a bad request gets an error response and does not fail the others."""
        rows, errors = self._parse(requests)
        by_request: dict[int, list[tuple[str, list[int], str, int]]] = {}
        if rows:
            try:
                input_ids, attention_mask = self._encode(rows)
                output = generate(
                    self.model,
                    input_ids,
                    attention_mask,
                    [r.params for r in rows],
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id,
                    seeds=[r.seed for r in rows],
                )
                texts = decode_responses(self.tokenizer, output)
                lengths = output.lengths.tolist()
                ids = output.response_ids.tolist()
                prompt_tokens = attention_mask.sum(dim=1).tolist()
                for i, row in enumerate(rows):
                    by_request.setdefault(row.request, []).append(
                        (texts[i], ids[i][: lengths[i]], output.finish_reasons[i], int(prompt_tokens[i]))
                    )
            except Exception as e:  # a failure of the batch is every request's error
                message = f"{self.name}: generation failed: {type(e).__name__}: {e}"
                pb_utils.Logger.log_error(message)
                return [_error_response(message, pb_utils.TritonError.INTERNAL) for _ in requests]
        responses = []
        for index in range(len(requests)):
            if index in errors:
                responses.append(_error_response(errors[index], pb_utils.TritonError.INVALID_ARG))
            else:
                responses.append(_unary_response(by_request[index]))
        return responses

    def _stream(self, requests: list) -> None:
        """Decoupled: queue every valid request's row on the engine and return; the engine thread answers."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        rows, errors = self._parse(requests)
        for index, message in errors.items():
            requests[index].get_response_sender().send(
                _error_response(message, pb_utils.TritonError.INVALID_ARG), flags=final)
        if not rows:
            return
        prompt_ids = self.tokenizer(
            [r.prompt for r in rows], add_special_tokens=self.settings.add_special_tokens
        )["input_ids"]
        engine_rows = []
        for row, ids in zip(rows, prompt_ids, strict=True):
            request = requests[row.request]
            answer = _Answer(request, request.get_response_sender(), _TextStream(self.tokenizer), len(ids), row.stream)
            engine_row = EngineRow(ids, row.params, row.seed, answer.on_event,
                                   stream=row.stream)
            answer.row = engine_row
            engine_rows.append(engine_row)
            self._watcher.watch(answer)
        try:
            self.engine.submit(engine_rows)
        except (QueueFull, EngineStopped) as e:
            for engine_row in engine_rows:
                engine_row.on_event(_Failed(str(e)))

    def finalize(self) -> None:
        if self.engine is not None:
            self._watcher.stop()
            self.engine.stop()  # rows still queued or running end with an error response
        pb_utils.Logger.log_info(f"{self.name}: unloaded")
        self.model = None


class _OnEngineThread:
    """Stands in for the event loop the engine delivers to: Triton's response senders may be called from any thread,
    so the engine's events are handled at once, on the engine thread."""

    @staticmethod
    def call_soon_threadsafe(fn, *args) -> None:
        fn(*args)


@dataclass(frozen=True)
class _Failed:
    """An engine-like event for a row that could not be queued."""

    error: str
    tokens: tuple = ()
    finish: str = ERROR


class _Answer:
    """One decoupled request: turns its engine row's events into responses (on the engine thread).

    ``lock`` guards the request's life: once the final response is sent, Triton releases the request, and asking it
    whether it was cancelled crashes the server; the watcher asks only under the lock and only while not ``done``.
    """

    def __init__(self, request, sender, stream: _TextStream, prompt_tokens: int, per_step: bool) -> None:
        self.request = request
        self.sender = sender
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.per_step = per_step
        self.row = None
        self.done = False
        self.lock = threading.Lock()

    def on_event(self, event) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with self.lock:
            if self.done:
                return
            for token in event.tokens:
                self.stream.add(token)
            if event.finish == ERROR:
                self.sender.send(_error_response(event.error, pb_utils.TritonError.INTERNAL), flags=final)
                self.done = True
            elif event.finish is not None:
                self.sender.send(_stream_response(*self.stream.finish(), event.finish, self.prompt_tokens),
                                 flags=final)
                self.done = True
            elif self.per_step:
                delta = self.stream.delta()
                if delta is not None:
                    self.sender.send(_stream_response(*delta, "", self.prompt_tokens))

    def cancelled(self) -> bool:
        with self.lock:
            return not self.done and self.request.is_cancelled()


class _CancellationWatcher:
    """Polls the requests being answered for cancellation (the client closed its stream) and stops their rows."""

    def __init__(self, engine: BatchEngine, interval_s: float = 0.02) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._answers: set[_Answer] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancellations", daemon=True)
        self._thread.start()

    def watch(self, answer: _Answer) -> None:
        with self._lock:
            self._answers.add(answer)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                self._answers = {a for a in self._answers if not a.done}
                answers = list(self._answers)
            cancelled = [a.row for a in answers if a.row is not None and a.cancelled()]
            if cancelled:  # outside the answers' locks: a queued row's CANCELLED event is sent from this thread
                self.engine.cancel(cancelled)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class _TextStream:
    """Turns one row's tokens into text deltas whose concatenation is ``decode(all tokens)``.

    Text is decoded from all tokens so far (what ``decode_responses`` does at the end) and only its stable part is
    sent: a trailing U+FFFD (an incomplete UTF-8 sequence of a byte-level tokenizer) is held back until the next token
    completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent_text = ""
        self.sent_ids = 0

    def add(self, token: int) -> None:
        self.ids.append(token)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def delta(self) -> tuple[str, list[int], int] | None:
        """(new text, new ids, tokens so far), or None when there is nothing stable to send yet."""
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.sent_text) or len(text) == len(self.sent_text):
            return None
        return self._advance(text)

    def finish(self) -> tuple[str, list[int], int]:
        text = self._text()
        if not text.startswith(self.sent_text):  # the decoder rewrote sent text; send what is new after it
            text = self.sent_text + text[len(self.sent_text):]
        return self._advance(text)

    def _advance(self, text: str) -> tuple[str, list[int], int]:
        delta, new_ids = text[len(self.sent_text):], self.ids[self.sent_ids:]
        self.sent_text, self.sent_ids = text, len(self.ids)
        return delta, new_ids, len(self.ids)


# --------------------------------------------------------------------------------------------- tensors


def _input(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"input {name} is missing")
    return tensor.as_numpy().reshape(-1)


def _optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _strings(values: list[str]) -> np.ndarray:
    return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)


def _int32(values: list[int]) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.int32)


def _unary_response(rows: list[tuple[str, list[int], str, int]]):
    texts, ids, reasons, prompt_tokens = zip(*rows, strict=True)
    width = max(len(r) for r in ids)
    padded = np.full((len(ids), width), -1, dtype=np.int64)
    for i, r in enumerate(ids):
        padded[i, : len(r)] = r
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TEXT", _strings(list(texts))),
            pb_utils.Tensor("COMPLETION_IDS", padded),
            pb_utils.Tensor("FINISH_REASON", _strings(list(reasons))),
            pb_utils.Tensor("PROMPT_TOKENS", _int32(list(prompt_tokens))),
            pb_utils.Tensor("COMPLETION_TOKENS", _int32([len(r) for r in ids])),
        ]
    )


def _stream_response(delta: str, ids: list[int], completion_tokens: int, reason: str, prompt_tokens: int):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TEXT_DELTA", _strings([delta])),
            pb_utils.Tensor("TOKEN_IDS", np.array([ids], dtype=np.int64).reshape(1, -1)),
            pb_utils.Tensor("FINISH_REASON", _strings([reason])),
            pb_utils.Tensor("PROMPT_TOKENS", _int32([int(prompt_tokens)])),
            pb_utils.Tensor("COMPLETION_TOKENS", _int32([completion_tokens])),
        ]
    )


def _error_response(message: str, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
