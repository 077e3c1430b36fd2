"""What rollout workers hand the learner: a ``RolloutBatch`` (the core's ``Rollout`` plus where it came from), its
bytes in the rollout buffer, and the prompt pool workers draw prompts from.

Bytes: ``torch.save`` of plain tensors, strings and numbers, read back with ``weights_only=True`` (no pickled code
runs when the learner reads a buffer that others can write).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from rlhf.core.ppo import Rollout

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    batch_id: str
    """Idempotency id: the same prompts and seeds give the same id (a re-added batch is stored once)."""
    run_id: str
    policy_version: str
    """The weights that sampled it."""
    policy_version_index: int
    """Their index in the run (0 = the run's parent): the learner's staleness is its own index minus this."""
    reward_model_version: str
    prompt_ids: tuple[str, ...]
    rollout: Rollout
    worker: str
    created_at: float
    """Unix time it was added."""
    generation_s: float = 0.0
    scoring_s: float = 0.0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to_bytes(self) -> bytes:
        r = self.rollout
        state = {
            "format": FORMAT,
            "meta": {k: getattr(self, k) for k in ("batch_id", "run_id", "policy_version", "policy_version_index",
                                                   "reward_model_version", "worker", "created_at", "generation_s",
                                                   "scoring_s")},
            "prompt_ids": list(self.prompt_ids),
            "prompts": list(r.prompts),
            "responses": list(r.responses),
            "sequences": r.sequences.cpu(),
            "attention_mask": r.attention_mask.cpu(),
            "action_mask": r.action_mask.cpu(),
            "raw_scores": r.raw_scores.cpu(),
            "ended": r.ended.cpu(),
            "behaviour_logprobs": r.behaviour_logprobs.cpu() if r.behaviour_logprobs is not None else None,
        }
        out = io.BytesIO()
        torch.save(state, out)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RolloutBatch:
        """Raises ValueError for bytes that are not a rollout batch of this format."""
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError(f"rollout batch format {state.get('format')!r}; this learner reads {FORMAT}")
            rollout = Rollout(
                prompts=list(state["prompts"]), responses=list(state["responses"]), sequences=state["sequences"],
                attention_mask=state["attention_mask"], action_mask=state["action_mask"].bool(),
                raw_scores=state["raw_scores"], ended=state["ended"].bool(),
                behaviour_logprobs=state["behaviour_logprobs"],
            )
            meta = state["meta"]
            return cls(prompt_ids=tuple(state["prompt_ids"]), rollout=rollout, **meta)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for bytes that are not its format
            raise ValueError(f"not a rollout batch: {type(e).__name__}: {e}") from None


def batch_id(run_id: str, prompt_ids: Sequence[str], seeds: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(run_id.encode())
    for p, s in zip(prompt_ids, seeds):
        digest.update(b"\0" + p.encode() + b"\0" + str(s).encode())
    return digest.hexdigest()


def prompt_id_of(text: str) -> str:
    """A stable id of a prompt's text (served prompts arrive with ids of their requests, not of their text)."""
    return "p-" + hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


@dataclasses.dataclass(frozen=True)
class PoolPrompt:
    prompt_id: str
    text: str
    source: str
    """"dataset" (rlhf.prompts.v1 or a fixed list) or "served" (rlhf.responses.v1)."""


class _Shuffled:
    """Prompts visited in shuffled passes (the core PPOTrainer's order: pass e is ``randperm`` seeded with
    seed * 1_000_003 + e over the prompts known at the start of the pass)."""

    def __init__(self, seed: int, capacity: int) -> None:
        self.seed = seed
        self.capacity = capacity
        self.items: OrderedDict[str, PoolPrompt] = OrderedDict()
        self.epoch = 0
        self.cursor = 0
        self.order: list[str] | None = None

    def add(self, prompt: PoolPrompt) -> bool:
        if prompt.prompt_id in self.items:
            return False
        self.items[prompt.prompt_id] = prompt
        while len(self.items) > self.capacity:  # the oldest go first
            self.items.popitem(last=False)
        return True

    def take(self, n: int) -> list[PoolPrompt]:
        out: list[PoolPrompt] = []
        while len(out) < n and self.items:
            if self.order is None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(self.seed * 1_000_003 + self.epoch)
                ids = list(self.items)
                self.order = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
            take = self.order[self.cursor: self.cursor + n - len(out)]
            out.extend(self.items[i] for i in take if i in self.items)
            self.cursor += len(take)
            if self.cursor >= len(self.order):
                self.epoch, self.cursor, self.order = self.epoch + 1, 0, None
        return out

    def __len__(self) -> int:
        return len(self.items)


class PromptPool:
    """The prompts a worker samples from: ``dataset`` ones (rlhf.prompts.v1, or a fixed list) and ``served`` ones
    (prompts of served traffic), deduplicated by id, each kind visited in shuffled passes; a batch takes
    ``served_share`` of its rows from served prompts when there are any. Thread-safe: a feed thread adds."""

    def __init__(self, *, seed: int = 0, served_share: float = 0.5, capacity: int = 100_000) -> None:
        if not 0.0 <= served_share <= 1.0:
            raise ValueError(f"served_share must be in [0, 1], got {served_share}")
        self.served_share = served_share
        self._lock = threading.Condition()
        self._pools = {"dataset": _Shuffled(seed, capacity), "served": _Shuffled(seed + 1, capacity)}
        self._rng = random.Random(seed)
        self.duplicates = 0

    def add(self, prompts: Iterable[PoolPrompt]) -> int:
        added = 0
        with self._lock:
            for p in prompts:
                if any(p.prompt_id in pool.items for pool in self._pools.values()):
                    self.duplicates += 1
                    continue
                added += self._pools[p.source if p.source == "served" else "dataset"].add(p)
            if added:
                self._lock.notify_all()
        return added

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {k: len(v) for k, v in self._pools.items()}

    def wait_for(self, n: int, timeout_s: float) -> bool:
        """Wait until at least one prompt is known (a batch repeats prompts when fewer than ``n`` are)."""
        with self._lock:
            return self._lock.wait_for(lambda: sum(len(p) for p in self._pools.values()) > 0, timeout_s)

    def take(self, n: int) -> list[PoolPrompt]:
        """``n`` prompts (fewer only when the pool is empty)."""
        with self._lock:
            dataset, served = self._pools["dataset"], self._pools["served"]
            if not len(served):
                return dataset.take(n)
            if not len(dataset):
                return served.take(n)
            n_served = round(n * self.served_share)
            return served.take(n_served) + dataset.take(n - n_served)
