"""Scoring a ScoreRequest: validation, the version's formatting, the score cache, the batching engine.

1. validate the request (count, texts, version id) before anything is queued; every rejection names the field with
   the item's index (``items[3].response``);
2. take a lease on the version (pinned, else the current one) for the whole call;
3. format each item as the reward model was trained on it: a plain prompt through ``core.tokenizer.format_prompt``
   (the chat template with a user turn), chat messages through ``core.tokenizer.format_chat`` (the same texts, one
   template call for the whole call: rlhf.reward.inputs);
4. look the items up in the score cache (key: version and a hash of the formatted prompt and the response); a cache
   that is down means every item is a miss, counted, never a failure;
5. tokenize the misses (one tokenizer call for the call; an item longer than the version's context is
   INVALID_ARGUMENT, never truncated) and queue them on the version's engine (one future for the call), which batches
   them with other calls' items;
6. store the new scores in the cache, answer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import time
from collections.abc import Sequence
from typing import Any, Protocol

from rlhf import keys
from rlhf.cache.base import Cache, CacheError
from rlhf.core.tokenizer import format_chat, format_prompt
from rlhf.reward import metrics
from rlhf.reward.engine import EngineStopped, Expired, QueueFull
from rlhf.reward.versions import LoadedReward, RewardVersions
from rlhf.serving.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    status_for,
)
from rlhf.serving.validation import check_conversation, check_text, utf8_len
from rlhf.v1 import reward_pb2

log = logging.getLogger(__name__)

_SCORE = struct.Struct("<f")  # a cached score: the float32 the API returns


class Limits(Protocol):
    """The fields of RewardConfig that validation reads."""

    max_items: int
    max_text_bytes: int
    max_messages: int
    max_id_bytes: int


@dataclasses.dataclass(frozen=True)
class ValidItem:
    prompt: str | None
    """The plain prompt, or None for chat messages."""
    messages: tuple[tuple[str, str], ...]
    response: str

    def format(self, tokenizer: Any) -> str:
        """The prompt as the reward model reads it (what the core formats when it trains and evaluates)."""
        if self.prompt is not None:
            return format_prompt(tokenizer, self.prompt)
        return format_chat(tokenizer, [{"role": r, "content": c} for r, c in self.messages])


def validate_score(request: reward_pb2.ScoreRequest, limits: Limits) -> list[ValidItem]:
    """The items of a request, or InvalidArgument naming the first offending field."""
    count = len(request.items)
    if count == 0:
        raise InvalidArgument("items", f"must not be empty: give 1..{limits.max_items} items")
    if count > limits.max_items:
        raise InvalidArgument("items", f"has {count} items; at most {limits.max_items} per call")
    if utf8_len(request.version) > limits.max_id_bytes:
        raise InvalidArgument("version", f"is {utf8_len(request.version)} bytes; at most {limits.max_id_bytes}")
    out = []
    for i, item in enumerate(request.items):
        which = item.WhichOneof("input")
        prompt, messages = None, ()
        if which is None:
            raise InvalidArgument(f"items[{i}].prompt", "set prompt (text) or messages (a conversation)")
        if which == "prompt":
            prompt = check_text(item.prompt, f"items[{i}].prompt", limits.max_text_bytes)
        else:
            messages = check_conversation(item.messages, f"items[{i}].messages", max_messages=limits.max_messages,
                                          max_text_bytes=limits.max_text_bytes)
        response = check_text(item.response, f"items[{i}].response", limits.max_text_bytes)
        out.append(ValidItem(prompt, messages, response))
    return out


class RewardScorer:
    """What RewardService.Score does, without gRPC."""

    def __init__(self, limits: Limits, versions: RewardVersions, cache: Cache, *, cache_ttl_s: float) -> None:
        self.limits = limits
        self.versions = versions
        self.cache = cache
        self.cache_ttl_s = cache_ttl_s

    async def score(self, request: reward_pb2.ScoreRequest, time_remaining: float | None = None
                    ) -> reward_pb2.ScoreResponse:
        started = time.monotonic()
        version = request.version or "none"
        try:
            items = validate_score(request, self.limits)  # 1.
            with self.versions.acquire(request.version) as loaded:  # 2.
                version = loaded.name
                async with asyncio.timeout(time_remaining):
                    scores, hits = await self._score(loaded, items, time_remaining)
        except TimeoutError:
            metrics.count_error(version, "DEADLINE_EXCEEDED")
            raise DeadlineExceeded("the deadline passed before every item was scored") from None
        except BaseException as e:
            code = "CANCELLED" if isinstance(e, asyncio.CancelledError) else status_for(e)[0].name
            metrics.count_error(version, code)
            raise
        finally:
            metrics.REQUESTS.labels(version).inc()
            metrics.REQUEST_SECONDS.labels(version).observe(time.monotonic() - started)
        metrics.ITEMS.labels(version).inc(len(scores))
        histogram = metrics.SCORES.labels(version)
        for s in scores:
            histogram.observe(s)
        return reward_pb2.ScoreResponse(scores=scores, reward_model_version=version, cache_hits=hits)

    async def _score(self, loaded: LoadedReward, items: Sequence[ValidItem],
                     time_remaining: float | None) -> tuple[list[float], int]:
        prompts = loaded.inputs.format_many(items)  # 3.
        # the keys (a hash of each text) only when there is a cache to ask
        cache_keys = ([keys.reward_score(loaded.name, p, item.response) for p, item in zip(prompts, items)]
                      if self.cache_ttl_s > 0 else [])
        scores: list[float | None] = await self._cached(cache_keys) if cache_keys else [None] * len(items)  # 4.
        misses = [i for i, s in enumerate(scores) if s is None]
        hits = len(items) - len(misses)
        if misses:
            inputs = self._tokenized(loaded, misses, prompts, items)  # 5.
            deadline = None if time_remaining is None else time.monotonic() + time_remaining
            try:
                call = loaded.engine.submit_call(inputs, deadline)
            except QueueFull as e:
                raise ResourceExhausted(f"{e}; retry later") from None
            except EngineStopped as e:
                raise Unavailable(f"{e}; retry") from None
            try:
                fresh = await call
            except Expired:
                raise TimeoutError from None
            except EngineStopped as e:
                raise Unavailable(str(e)) from None
            except ServiceError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed forward pass
                raise Unavailable(f"scoring failed on {loaded.name}: {e}") from e
            finally:
                call.cancel()  # a call that ends early (deadline, cancel) takes its queued items with it
            if not hits:
                scores = fresh
            else:
                for i, s in zip(misses, fresh, strict=True):
                    scores[i] = s
            if cache_keys:
                await self._store({cache_keys[i]: _SCORE.pack(s) for i, s in zip(misses, fresh, strict=True)})  # 6.
        return scores, hits  # type: ignore[return-value]

    def _tokenized(self, loaded: LoadedReward, indices: Sequence[int], prompts: Sequence[str],
                   items: Sequence[ValidItem]) -> list:
        """The model inputs of ``items[indices]``; an item longer than the version's context is INVALID_ARGUMENT."""
        if len(indices) == len(items):
            inputs = loaded.inputs.tokenize_many(prompts, [item.response for item in items])
        else:
            inputs = loaded.inputs.tokenize_many([prompts[i] for i in indices], [items[i].response for i in indices])
        for index, item in zip(indices, inputs, strict=True):
            if item.length <= loaded.context:
                continue
            if item.prompt_tokens >= loaded.context:
                raise InvalidArgument(f"items[{index}].prompt",
                                      f"{item.prompt_tokens} tokens, limit {loaded.context} (prompt and response)")
            raise InvalidArgument(
                f"items[{index}].response",
                f"{item.length} tokens with the prompt ({item.length - item.prompt_tokens} of the response), "
                f"limit {loaded.context}",
            )
        return inputs

    async def _cached(self, cache_keys: list[str]) -> list[float | None]:
        if self.cache_ttl_s <= 0:
            return [None] * len(cache_keys)
        try:
            values = await self.cache.get_many(cache_keys)
        except CacheError as e:
            metrics.CACHE_ERRORS.labels("get").inc()
            log.debug("score cache lookup failed (scoring everything): %s", e)
            return [None] * len(cache_keys)
        out: list[float | None] = []
        for v in values:
            out.append(_SCORE.unpack(v)[0] if v is not None and len(v) == _SCORE.size else None)
        hits = sum(1 for s in out if s is not None)
        metrics.CACHE_HITS.inc(hits)
        metrics.CACHE_MISSES.inc(len(out) - hits)
        return out

    async def _store(self, values: dict[str, bytes]) -> None:
        if self.cache_ttl_s <= 0 or not values:
            return
        try:
            await self.cache.set_many(values, ttl_s=self.cache_ttl_s)
        except CacheError as e:
            metrics.CACHE_ERRORS.labels("set").inc()
            log.debug("score cache store failed: %s", e)
