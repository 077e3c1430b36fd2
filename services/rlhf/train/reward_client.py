"""A small client of a running reward service (``rlhf.v1.RewardService.Score``): PPO's reward through gRPC.

``--reward-model grpc://HOST:PORT`` scores every rollout through it. Requests carry at most ``max_items`` items;
UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with exponential backoff (the service drains and
swaps versions without failing calls, but a replica may restart); any other status fails the step with the
service's message. Scores within one run come from one reward-model version: a version change mid-run is reported.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from rlhf.core.data import PromptRecord

RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class RewardServiceError(RuntimeError):
    """The reward service refused or failed a call (after the retries)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    """Tries per request, the first included."""
    backoff_s: float = 0.2
    """Wait before the second try; doubled each time after."""
    timeout_s: float = 30.0
    """Deadline of one try."""


def parse_address(url: str) -> str:
    """``grpc://HOST:PORT`` -> ``HOST:PORT``."""
    rest = url[len("grpc://"):] if url.startswith("grpc://") else url
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--reward-model {url}: expected grpc://HOST:PORT")
    return rest


class RewardClient:
    """``client(prompts, responses) -> (B,) scores``: PPO's ``reward_fn`` over gRPC."""

    def __init__(self, url: str, token: str = "", max_items: int = 256, retry: RetryPolicy | None = None,
                 pinned_version: str = "") -> None:
        from rlhf.v1 import reward_pb2_grpc

        self.address = parse_address(url)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.max_items = max_items
        self.retry = retry or RetryPolicy()
        self.version = pinned_version
        self.versions_seen: list[str] = []
        self.last_version = ""
        """The reward-model version of the last reply."""

    def _item(self, prompt: PromptRecord | str, response: str):  # noqa: ANN202 - a generated message type
        from rlhf.v1 import common_pb2, reward_pb2

        if isinstance(prompt, PromptRecord) and prompt.messages is not None:
            conversation = common_pb2.Conversation(
                messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in prompt.messages])
            return reward_pb2.ScoreItem(messages=conversation, response=response)
        text = prompt.prompt if isinstance(prompt, PromptRecord) else prompt
        return reward_pb2.ScoreItem(prompt=text or "", response=response)

    def _call(self, request):  # noqa: ANN001, ANN202
        delay = self.retry.backoff_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return self.stub.Score(request, timeout=self.retry.timeout_s, metadata=self.metadata)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code not in RETRIED or attempt == self.retry.attempts:
                    raise RewardServiceError(
                        f"reward service at {self.address}: {code.name}: {e.details()}"  # type: ignore[attr-defined]
                        + (f" (after {attempt} tries)" if attempt > 1 else "")
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def __call__(self, prompts: Sequence[PromptRecord | str], responses: Sequence[str]) -> torch.Tensor:
        from rlhf.v1 import reward_pb2

        # An empty response (the policy ended at once) is not sent, since the service refuses empty text: it gets
        # the lowest score of the batch.
        sent = [i for i, r in enumerate(responses) if r.strip()]
        scores: list[float] = []
        for start in range(0, len(sent), self.max_items):
            rows = sent[start:start + self.max_items]
            items = [self._item(prompts[i], responses[i]) for i in rows]
            reply = self._call(reward_pb2.ScoreRequest(items=items, version=self.version))
            if reply.reward_model_version and reply.reward_model_version not in self.versions_seen:
                self.versions_seen.append(reply.reward_model_version)
            self.last_version = reply.reward_model_version or self.last_version
            scores.extend(reply.scores)
        floor = min(scores) if scores else 0.0
        out = [floor] * len(responses)
        for i, s in zip(sent, scores):
            out[i] = s
        return torch.tensor(out, dtype=torch.float32)

    def close(self) -> None:
        self.channel.close()
