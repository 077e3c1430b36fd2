"""The PPO learner: rollout batches from the buffer → the core's PPO update → checkpoints, and every
``publish_every`` updates a policy version that workers generate with next.

One ``step`` (numbered as in the code):

1. read one batch (the learner's own unacknowledged batches first: after a restart, those it had not checkpointed);
2. a batch this run already used (its id is in the checkpoint) or of another run is acknowledged and skipped; one
   more than ``max_staleness`` versions old is acknowledged, dropped and counted;
3. the experience under the current weights, weighted by truncated importance sampling unless the current weights
   are the very ones that sampled it (its version, with no update since that version was saved: with
   ``publish_every`` 1 and staleness 0, exactly the synchronous step of ``rlhf.core.ppo``);
4. the PPO update (the core's ``learn``);
5. every ``publish_every`` updates the policy is saved as a version (``save_pretrained`` + lineage manifest; after
   the first, only the weights are written again: ``VersionWriter``);
6. every ``checkpoint_every`` updates (and with every version) a checkpoint (trainer state, this learner's state,
   the ids of the batches used), written atomically; then the batches it covers are acknowledged — so a batch is
   acknowledged only once its effect is durable, and a learner killed at any point redoes exactly the batches its
   checkpoint lacks (dropped and skipped batches too are acknowledged with the checkpoint that counts them);
7. the progress (step, version, the batches held for the next checkpoint) is published to the buffer for the
   workers, after a checkpoint in the same atomic operation as the acknowledgement.
"""
from __future__ import annotations

import collections
import dataclasses
import json
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


class VersionWriter:
    """Writes the run's policy versions. The first in a process with ``save_artifact`` (``save_pretrained``: config,
    weights, tokenizer); it keeps that folder's other files (config, generation config, tokenizer: the same for
    every version of a run) and the names and shapes of the tensors in its ``model.safetensors``. Each later version
    is those files again, the same tensors of the current weights in one safetensors file, and its manifest: the
    folder ``save_pretrained`` would write, without rebuilding the config and tokenizer files each time (about 4x
    cheaper for a small model). A first save that is not one safetensors file of state-dict tensors (sharded,
    renamed, converted) keeps every version on ``save_artifact``."""

    WEIGHTS = "model.safetensors"

    def __init__(self, policy: Any, tokenizer: Any) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self._files: dict[str, bytes] | None = None  # file name -> content, every file but weights and manifest
        self._tensors: dict[str, tuple[int, ...]] = {}  # weight name -> shape, as save_pretrained wrote them
        self._full_only = False

    def write(self, path: str, manifest: Any) -> None:
        from rlhf.core.models import MANIFEST_FILE, save_artifact

        state = self.policy.state_dict()
        if self._files is None or not self._matches(state):
            save_artifact(path, self.policy, self.tokenizer, manifest)
            if not self._full_only and self._files is None:
                self._learn(path, state)
            return
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        for name, content in self._files.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(content)
        save_file({name: state[name].detach().contiguous() for name in self._tensors},
                  os.path.join(path, self.WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(path, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2, sort_keys=True)

    def _matches(self, state: dict[str, torch.Tensor]) -> bool:
        return all(name in state and tuple(state[name].shape) == shape for name, shape in self._tensors.items())

    def _learn(self, path: str, state: dict[str, torch.Tensor]) -> None:
        from safetensors import safe_open

        from rlhf.core.models import MANIFEST_FILE

        names = sorted(os.listdir(path))
        weights = [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth")) or ".index." in n]
        if weights != [self.WEIGHTS] or any(os.path.isdir(os.path.join(path, n)) for n in names):
            self._full_only = True
            return
        with safe_open(os.path.join(path, self.WEIGHTS), framework="pt") as f:
            tensors = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        self._tensors = tensors
        if not tensors or not self._matches(state):
            self._full_only, self._tensors = True, {}
            return
        files = {}
        for name in names:
            if name not in (self.WEIGHTS, MANIFEST_FILE):
                with open(os.path.join(path, name), "rb") as f:
                    files[name] = f.read()
        self._files = files


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
        self.version_step = 0
        """The learner step at which the version held was saved (0: the parent): a batch sampled by that version
        is on-policy only while no update followed."""
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
        self._writer = VersionWriter(trainer.policy, tokenizer)

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
                "uri": self.uri, "saved_at": self.saved_at, "version_step": self.version_step, "used": list(self.used),
                "batches_used": self.batches_used,
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
            self._ack_checkpointed()

    def _ack_checkpointed(self) -> None:
        """Acknowledge the batches the checkpoint just written covers, and publish the progress (now holding none)
        in the same operation: a worker never sees them gone from the depth while the progress still counts them."""
        unacked, self._unacked = self._unacked, []
        try:
            self.buffer.ack(unacked, progress=self._progress())
        except Exception:
            self._unacked = unacked + self._unacked  # not acknowledged: the next checkpoint tries again
            raise

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
        self.version_step = learner.get("version_step", next(
            (v.step for v in reversed(self.versions) if v.index == self.version_index), 0))
        if self.extra_state is not None and learner["extra"]:
            self.extra_state.load_state_dict(learner["extra"])
        # Batches the checkpoint covers but that were not acknowledged before the crash: acknowledge them now.
        if learner["unacked"]:
            self.buffer.ack(learner["unacked"])
        log.info("learner resumed run %s at step %d (version %s, %d batches used)", self.s.run_id,
                 self.step_count, self.version, self.batches_used)
        return True

    def _progress(self) -> LearnerProgress:
        return LearnerProgress(
            step=self.step_count, version=self.version, version_index=self.version_index, uri=self.uri,
            run_id=self.s.run_id, state=self.state, saved_at=self.saved_at, held=len(self._unacked))

    def publish_progress(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        self.buffer.publish_progress(self._progress())

    # ------------------------------------------------------------------------------------------ the step

    def step(self) -> StepResult | None:
        """One batch from the buffer; None when none arrived within ``read_block_s``."""
        s = self.s
        # 1. read
        t0 = time.perf_counter()
        entries = []
        if not self._pending_drained:  # first what this consumer had read and not acknowledged before a restart
            # (less those this learner read again since and holds for its next checkpoint: the oldest pending ones)
            held = set(self._unacked)
            entries = [e for e in self.buffer.read(s.consumer, count=len(held) + 1, block_s=0.0, pending=True)
                       if e.entry_id not in held][:1]
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
            self.publish_progress()  # it is held now, no longer ahead of the learner
            return StepResult(batch.batch_id, staleness, used=False, batch=batch,
                              reason=f"stale: {staleness} versions old > max_staleness {s.max_staleness}"
                              if staleness > 0 else f"from a version ({batch.policy_version_index}) ahead of this "
                                                    f"learner ({self.version_index})")
        # 3-4. experience and update
        t1 = time.perf_counter()
        on_policy = staleness == 0 and self.step_count == self.version_step
        exp = self.trainer.experience_from_rollout(batch.rollout, off_policy=not on_policy)
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
        # 6. checkpoint, then acknowledge what it covers (7. with the progress)
        if self._since_checkpoint >= s.checkpoint_every or saved is not None:
            self.checkpoint()
            self._ack_checkpointed()
        else:  # 7. progress
            self.publish_progress()
        t4 = time.perf_counter()
        phases = {"buffer_wait": wait, "update": t2 - t1, "save": t3 - t2, "checkpoint": t4 - t3,
                  "generation": batch.generation_s, "scoring": batch.scoring_s}
        return StepResult(batch.batch_id, staleness, used=True, metrics=metrics, phases=phases, saved=saved,
                          batch=batch)

    def _skip(self, entry: BufferEntry, reason: str) -> StepResult:
        self.skipped += 1
        self._unacked.append(entry.entry_id)  # acknowledged with the next checkpoint, which counts the skip
        self.publish_progress()  # it is held now, no longer ahead of the learner
        log.warning("rollout batch %s skipped: %s", entry.batch_id, reason)
        return StepResult(entry.batch_id, 0, used=False, reason=reason)

    def _save_version(self, metrics: dict[str, float]) -> SavedVersion:
        from rlhf.core.models import Manifest, config_dict

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
        self._writer.write(tmp, manifest)
        shutil.rmtree(path, ignore_errors=True)  # a redo after a crash between this save and its checkpoint
        os.replace(tmp, path)
        self.version_index, self.version, self.uri, self.saved_at = index, version, uri, time.time()
        self.version_step = self.step_count
        saved = SavedVersion(version=version, index=index, uri=uri, step=self.step_count, saved_at=self.saved_at,
                             metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
                             reward_model_version=self.reward_model_version)
        self.versions.append(saved)
        return saved
