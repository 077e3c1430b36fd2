"""The PPO learner: rollout batches from the buffer → the core's PPO update → checkpoints, and every
``publish_every`` updates a policy version that workers generate with next.

One ``step`` (numbered as in the code):

1. read one batch (the learner's own unacknowledged batches first: after a restart, those it had not checkpointed);
2. a batch this run already used (its id is in the checkpoint) or of another run is acknowledged and skipped; one
   more than ``max_staleness`` versions old is acknowledged, dropped and counted;
3. the experience under the current weights, weighted by truncated importance sampling when it came from older
   weights (staleness 0: exactly the synchronous step of ``rlhf.core.ppo``);
4. the PPO update (the core's ``learn``);
5. every ``publish_every`` updates the policy is saved as a version (``save_pretrained`` + lineage manifest);
6. every ``checkpoint_every`` updates a checkpoint (trainer state, this learner's state, the ids of the batches
   used), written atomically; then the batches it covers are acknowledged — so a batch is acknowledged only once its
   effect is durable, and a learner killed at any point redoes exactly the batches its checkpoint lacks (dropped and
   skipped batches too are acknowledged with the checkpoint that counts them);
7. the progress (step, version) is published to the buffer for the workers.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from rlhf.core.ppo import PPOTrainer
from rlhf.trainer.buffer import BufferEntry, LearnerProgress, RolloutBuffer
from rlhf.trainer.rollouts import RolloutBatch

log = logging.getLogger(__name__)

CHECKPOINT = "learner.pt"
USED_WINDOW = 100_000
"""Batch ids of the run kept in the checkpoint (to skip a batch seen again)."""


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
    run_id: str
    parent_version: str
    """The policy version the run started from (index 0)."""
    parent_uri: str
    artifact_root: str
    checkpoint_dir: str
    max_staleness: int = 1
    publish_every: int = 1
    checkpoint_every: int = 1
    consumer: str = "learner-0"
    read_block_s: float = 0.5
    policy_name: str = "policy"


@dataclasses.dataclass(frozen=True)
class SavedVersion:
    version: str
    index: int
    uri: str
    """Relative to the artifact root."""
    step: int
    saved_at: float
    metrics: dict[str, float]
    reward_model_version: str


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one ``step`` did."""

    batch_id: str
    staleness: int
    used: bool
    """False when the batch was dropped (too stale) or skipped (used already, another run)."""
    reason: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds: buffer_wait, update, save, checkpoint."""
    saved: SavedVersion | None = None
    batch: RolloutBatch | None = None


class Learner:
    def __init__(self, settings: LearnerSettings, trainer: PPOTrainer, tokenizer: Any, buffer: RolloutBuffer,
                 *, lineage: Callable[[], dict[str, Any]] | None = None, extra_state: Any = None) -> None:
        self.s = settings
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.buffer = buffer
        self.lineage = lineage or (dict)
        self.extra_state = extra_state
        """An object with state_dict / load_state_dict checkpointed with the learner (the guards)."""
        self.version_index = 0
        self.version = settings.parent_version
        self.uri = settings.parent_uri
        self.saved_at = time.time()
        self.used: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.batches_used = 0
        self.dropped_stale = 0
        self.skipped = 0
        self.reward_model_version = ""
        self.last_metrics: dict[str, float] = {}
        self.versions: list[SavedVersion] = []
        self._unacked: list[str] = []  # entry ids used since the last checkpoint
        self._since_checkpoint = 0
        self._pending_drained = False
        self.state = "running"

    @property
    def step_count(self) -> int:
        return self.trainer.global_step

    # ------------------------------------------------------------------------------------------ checkpoints

    def _path(self) -> str:
        return os.path.join(self.s.checkpoint_dir, CHECKPOINT)

    def checkpoint(self) -> None:
        os.makedirs(self.s.checkpoint_dir, exist_ok=True)
        state = {
            "trainer": self.trainer.state_dict(),
            "learner": {
                "run_id": self.s.run_id, "version_index": self.version_index, "version": self.version,
                "uri": self.uri, "saved_at": self.saved_at, "used": list(self.used), "batches_used": self.batches_used,
                "dropped_stale": self.dropped_stale, "skipped": self.skipped, "unacked": list(self._unacked),
                "reward_model_version": self.reward_model_version, "last_metrics": dict(self.last_metrics),
                "versions": [dataclasses.asdict(v) for v in self.versions],
                "extra": self.extra_state.state_dict() if self.extra_state is not None else {},
            },
        }
        tmp = self._path() + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._path())  # atomic: a crash mid-write leaves the previous checkpoint
        self._since_checkpoint = 0

    def flush(self) -> None:
        """Checkpoint now and acknowledge what the checkpoint covers (a graceful stop)."""
        if self._unacked or self._since_checkpoint:
            self.checkpoint()
            self.buffer.ack(self._unacked)
            self._unacked = []

    def resume(self) -> bool:
        """Continue from the checkpoint if there is one (of this run); True when it did."""
        if not os.path.exists(self._path()):
            return False
        state = torch.load(self._path(), map_location="cpu", weights_only=True)
        learner = state["learner"]
        if learner["run_id"] != self.s.run_id:
            raise ValueError(f"{self._path()} belongs to run {learner['run_id']}, not {self.s.run_id}")
        self.trainer.load_state_dict(state["trainer"])
        self.version_index, self.version, self.uri = learner["version_index"], learner["version"], learner["uri"]
        self.saved_at = learner["saved_at"]
        self.used = collections.OrderedDict.fromkeys(learner["used"])
        self.batches_used, self.dropped_stale, self.skipped = (learner["batches_used"], learner["dropped_stale"],
                                                              learner["skipped"])
        self.reward_model_version = learner["reward_model_version"]
        self.last_metrics = dict(learner["last_metrics"])
        self.versions = [SavedVersion(**v) for v in learner["versions"]]
        if self.extra_state is not None and learner["extra"]:
            self.extra_state.load_state_dict(learner["extra"])
        # Batches the checkpoint covers but that were not acknowledged before the crash: acknowledge them now.
        if learner["unacked"]:
            self.buffer.ack(learner["unacked"])
        log.info("learner resumed run %s at step %d (version %s, %d batches used)", self.s.run_id,
                 self.step_count, self.version, self.batches_used)
        return True

    def publish_progress(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        self.buffer.publish_progress(LearnerProgress(
            step=self.step_count, version=self.version, version_index=self.version_index, uri=self.uri,
            run_id=self.s.run_id, state=self.state, saved_at=self.saved_at))

    # ------------------------------------------------------------------------------------------ the step

    def step(self) -> StepResult | None:
        """One batch from the buffer; None when none arrived within ``read_block_s``."""
        s = self.s
        # 1. read
        t0 = time.perf_counter()
        entries = []
        if not self._pending_drained:  # first what this consumer had read and not acknowledged before a restart
            entries = self.buffer.read(s.consumer, count=1, block_s=0.0, pending=True)
            self._pending_drained = not entries
        if not entries:
            entries = self.buffer.read(s.consumer, count=1, block_s=s.read_block_s)
        if not entries:
            return None
        entry = entries[0]
        wait = time.perf_counter() - t0
        # 2. skip what is not for this update
        try:
            batch = RolloutBatch.from_bytes(entry.payload)
        except ValueError as e:
            return self._skip(entry, f"unreadable batch: {e}")
        if batch.run_id != s.run_id:
            return self._skip(entry, f"batch of run {batch.run_id}")
        if batch.batch_id in self.used:
            return self._skip(entry, "used already")
        staleness = self.version_index - batch.policy_version_index
        if staleness > s.max_staleness or staleness < 0:
            self.dropped_stale += staleness > 0
            self._unacked.append(entry.entry_id)  # acknowledged with the next checkpoint, which counts the drop
            return StepResult(batch.batch_id, staleness, used=False, batch=batch,
                              reason=f"stale: {staleness} versions old > max_staleness {s.max_staleness}"
                              if staleness > 0 else f"from a version ({batch.policy_version_index}) ahead of this "
                                                    f"learner ({self.version_index})")
        # 3-4. experience and update
        t1 = time.perf_counter()
        exp = self.trainer.experience_from_rollout(batch.rollout, off_policy=staleness > 0)
        metrics = self.trainer.learn(exp)
        metrics["staleness"] = float(staleness)
        t2 = time.perf_counter()
        self.used[batch.batch_id] = None
        while len(self.used) > USED_WINDOW:
            self.used.popitem(last=False)
        self.batches_used += 1
        self.reward_model_version = batch.reward_model_version or self.reward_model_version
        self.last_metrics = metrics
        self._unacked.append(entry.entry_id)
        self._since_checkpoint += 1
        # 5. a version
        saved = None
        if self.step_count % s.publish_every == 0:
            saved = self._save_version(metrics)
        t3 = time.perf_counter()
        # 6. checkpoint, then acknowledge what it covers
        if self._since_checkpoint >= s.checkpoint_every or saved is not None:
            self.checkpoint()
            self.buffer.ack(self._unacked)
            self._unacked = []
        t4 = time.perf_counter()
        # 7. progress
        self.publish_progress()
        phases = {"buffer_wait": wait, "update": t2 - t1, "save": t3 - t2, "checkpoint": t4 - t3,
                  "generation": batch.generation_s, "scoring": batch.scoring_s}
        return StepResult(batch.batch_id, staleness, used=True, metrics=metrics, phases=phases, saved=saved,
                          batch=batch)

    def _skip(self, entry: BufferEntry, reason: str) -> StepResult:
        self.skipped += 1
        self._unacked.append(entry.entry_id)  # acknowledged with the next checkpoint, which counts the skip
        log.warning("rollout batch %s skipped: %s", entry.batch_id, reason)
        return StepResult(entry.batch_id, 0, used=False, reason=reason)

    def _save_version(self, metrics: dict[str, float]) -> SavedVersion:
        from rlhf.core.models import Manifest, config_dict, save_artifact

        index = self.version_index + 1
        version = f"{self.s.run_id}-v{index:04d}"
        uri = os.path.join(self.s.policy_name, version)
        path = os.path.join(self.s.artifact_root, uri)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = Manifest(
            kind="policy", version=version, parent=self.version,
            data={"run_id": self.s.run_id, "learner_step": self.step_count, "batches_used": self.batches_used,
                  "reward_model_version": self.reward_model_version, "root": self.s.parent_version,
                  "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}, **self.lineage()},
            config=config_dict(self.trainer.config),
        )
        save_artifact(tmp, self.trainer.policy, self.tokenizer, manifest)
        shutil.rmtree(path, ignore_errors=True)  # a redo after a crash between this save and its checkpoint
        os.replace(tmp, path)
        self.version_index, self.version, self.uri, self.saved_at = index, version, uri, time.time()
        saved = SavedVersion(version=version, index=index, uri=uri, step=self.step_count, saved_at=self.saved_at,
                             metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
                             reward_model_version=self.reward_model_version)
        self.versions.append(saved)
        return saved
