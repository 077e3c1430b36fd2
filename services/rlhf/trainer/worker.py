"""A rollout worker: prompts from the pool → responses from the policy version it holds (with their behaviour
log-probs) → scores from the reward service → one batch in the rollout buffer. Embedded, one runs on a thread of
the trainer; distributed, each is its own process (``rlhf rollout-worker``) and they scale out.

Before each batch (numbered as in ``step``):

1. it reads the learner's published progress (the run, its state, the version to hold) and loads a newer version
   from the artifact root when there is one;
2. admission: the batch will reach the learner after the batches still ahead of it (the buffer's depth less the
   ones the learner finished with and holds for its next checkpoint, read at one instant with the progress); it is
   generated only if its staleness then (the learner's version index then minus the held one) is at most
   ``max_staleness``, so a worker never spends compute on a batch the learner would drop, and runs ahead of the
   learner as far as that allows (it generates while the learner updates); with ``max_staleness`` 0 and
   ``publish_every`` 1 this is synchronous PPO;
3. prompts from the pool and seeds from the run's seed stream (worker 0's stream is the core trainer's);
4. generate and score (the core's ``generate_rollout``);
5. add to the buffer, idempotently by a batch id made of the prompts and seeds.

With nothing to do (the bound reached, the run paused) the worker waits for the learner's next published progress,
up to ``idle_s``, and starts as soon as it comes.

A worker killed mid-batch loses nothing acknowledged: what the buffer stored stays there, and prompts live on their
topics (a worker rebuilds its pool from them when it starts).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf.core.generation import SamplingParams
from rlhf.core.ppo import draw_seeds, generate_rollout, seed_generator
from rlhf.trainer.buffer import BufferUnavailable, LearnerProgress, RolloutBuffer
from rlhf.trainer.rollouts import PromptPool, RolloutBatch, batch_id

log = logging.getLogger(__name__)

RUNNING = "running"


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    scores: torch.Tensor  # (B,)
    reward_model_version: str


Scorer = Callable[[Sequence[str], Sequence[str]], ScoredBatch]
"""(prompts, responses) -> their scores and the reward-model version that gave them."""


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    batch_size: int
    """Rows per rollout batch (the learner's PPO batch)."""
    response_length: int
    temperature: float
    seed: int
    """Seed of the run's sampling seeds (worker i uses seed + i; worker 0's stream is the core trainer's)."""
    max_staleness: int
    publish_every: int
    artifact_root: str
    worker_index: int = 0
    name: str = "worker-0"
    idle_s: float = 0.2
    """Longest wait between checks while there is nothing to do (paused run, staleness bound, empty pool); a
    progress the learner publishes ends the wait at once."""


class PolicyHolder:
    """The weights a worker generates with: one causal LM, reloaded when the learner publishes a new version."""

    def __init__(self, load: Callable[[str], tuple[Any, Any]] | None = None, device: str = "cpu") -> None:
        from rlhf.core.models import load_causal_lm

        self._load = load or load_causal_lm
        self.device = device
        self.model: Any = None
        self.tokenizer: Any = None
        self.version = ""
        self.index = -1
        self.run_id = ""
        self.loaded_at = 0.0

    def sync(self, progress: LearnerProgress, artifact_root: str) -> bool:
        """Load the progress's version unless it is held; True when it loaded."""
        if progress.run_id == self.run_id and progress.version_index == self.index and self.model is not None:
            return False
        path = progress.uri if os.path.isabs(progress.uri) else os.path.join(artifact_root, progress.uri)
        if not (progress.run_id == self.run_id and self._load_weights(path)):
            model, tokenizer = self._load(path)
            model.to(self.device)
            model.eval()
            model.requires_grad_(False)
            self.model, self.tokenizer = model, tokenizer
        self.version, self.index, self.run_id = progress.version, progress.version_index, progress.run_id
        self.loaded_at = time.time()
        log.info("worker holds %s (index %d) from %s", self.version, self.index, path)
        return True


    def _load_weights(self, path: str) -> bool:
        """A new version of the same run into the model held: only its weights (one safetensors file), about 20x
        faster than building the model again. False when it cannot (sharded or another format, other names): the
        caller loads the version whole."""
        file = os.path.join(path, "model.safetensors")
        if self.model is None or not os.path.exists(file):
            return False
        from safetensors.torch import load_file

        state = load_file(file)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        if unexpected or any(not (tied and "lm_head" in name) for name in missing):
            log.info("%s: weights do not match the held model (%d missing, %d unexpected); loading it whole", path,
                     len(missing), len(unexpected))
            return False
        return True


class RolloutWorker:
    def __init__(self, settings: WorkerSettings, buffer: RolloutBuffer, pool: PromptPool, scorer: Scorer,
                 *, holder: PolicyHolder | None = None,
                 on_batch: Callable[[RolloutBatch, dict[str, float]], None] | None = None) -> None:
        self.settings = settings
        self.buffer = buffer
        self.pool = pool
        self.scorer = scorer
        self.holder = holder or PolicyHolder()
        self.on_batch = on_batch
        self._seeds: torch.Generator | None = None
        self._seed_run = ""
        self.batches_added = 0
        self.duplicates = 0
        self.last_error = ""
        self.first_rollout_delay_s: float | None = None
        """Seconds from the held version's save (its progress publication) to its first added batch."""
        self._version_seen_at = 0.0
        self._first_of_version = True
        self._seen = LearnerProgress()
        """The progress the last ``step`` acted on (``run`` waits for a newer one when it had nothing to do)."""

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                batch = self.step()
                self.last_error = ""
            except BufferUnavailable as e:
                self.last_error = f"rollout buffer unavailable: {e}"
                log.warning("%s; retrying", self.last_error)
                stop.wait(1.0)
                continue
            except Exception as e:  # noqa: BLE001 - a reward service down, a failed load: retry, never exit
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("rollout failed: %s; retrying", self.last_error)
                stop.wait(1.0)
                continue
            if batch is None and not stop.is_set():
                try:
                    self.buffer.wait_progress(self._seen, self.settings.idle_s)
                except BufferUnavailable:
                    stop.wait(self.settings.idle_s)  # the next step reports it

    def step(self) -> RolloutBatch | None:
        """One batch, or None when there is nothing to do now."""
        s = self.settings
        # 1. the run, and the version to hold; the depth with it, for 2.
        progress, depth = self.buffer.progress_and_depth()
        self._seen = progress
        if progress.state != RUNNING or not progress.run_id or not progress.uri:
            return None
        if self.holder.sync(progress, s.artifact_root):
            self._version_seen_at = time.monotonic()
            self._first_of_version = True
        if progress.run_id != self._seed_run:
            self._seeds, self._seed_run = seed_generator(s.seed + s.worker_index), progress.run_id
        # 2. admission
        ahead = max(0, depth - progress.held)  # batches the learner will update on before this one
        learner_index_then = (progress.step + ahead) // s.publish_every
        if learner_index_then - self.holder.index > s.max_staleness:
            return None
        # 3. prompts and seeds
        prompts = self.pool.take(s.batch_size)
        if len(prompts) < s.batch_size:
            return None
        assert self._seeds is not None
        seeds = draw_seeds(self._seeds, len(prompts))
        # 4. generate and score
        texts = [p.text for p in prompts]
        started = time.perf_counter()
        scored: list[ScoredBatch] = []

        def reward_fn(ps: list[str], responses: list[str]) -> torch.Tensor:
            nonlocal generated_at
            generated_at = time.perf_counter()
            scored.append(self.scorer(ps, responses))
            return scored[-1].scores

        generated_at = started
        from rlhf.core.tokenizer import format_prompt

        tokenizer = self.holder.tokenizer
        rollout = generate_rollout(
            self.holder.model, tokenizer, texts, seeds,
            lambda text: tokenizer(format_prompt(tokenizer, text), add_special_tokens=False)["input_ids"],
            reward_fn, SamplingParams(max_new_tokens=s.response_length, temperature=s.temperature),
            behaviour_logprobs=True,
        )
        done = time.perf_counter()
        ids = tuple(p.prompt_id for p in prompts)
        batch = RolloutBatch(
            batch_id=batch_id(progress.run_id, ids, seeds), run_id=progress.run_id,
            policy_version=self.holder.version, policy_version_index=self.holder.index,
            reward_model_version=scored[-1].reward_model_version if scored else "", prompt_ids=ids, rollout=rollout,
            worker=s.name, created_at=time.time(), generation_s=generated_at - started, scoring_s=done - generated_at,
        )
        # 5. add
        if self.buffer.add(batch.batch_id, batch.to_bytes()) is None:
            self.duplicates += 1
        else:
            self.batches_added += 1
        if self._first_of_version:
            self._first_of_version = False
            self.first_rollout_delay_s = (time.time() - progress.saved_at if progress.saved_at
                                          else time.monotonic() - self._version_seen_at)
        if self.on_batch is not None:
            self.on_batch(batch, {"generation_s": batch.generation_s, "scoring_s": batch.scoring_s})
        return batch
