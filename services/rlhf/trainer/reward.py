"""Reward-model versions from the dataset's comparisons, published only when they are no worse.

One training (:meth:`RewardVersionTrainer.train`):

1. take every comparison in the dataset; the held-out ones (fixed by a hash of their source event ids) are the gate's;
2. start from the current reward-model version, or the first time from ``reward_base_path`` (the SFT policy gets a
   scalar head, as in InstructGPT; a reward artifact is trained further);
3. train a candidate on the training comparisons with the core's RewardTrainer (a ranking is one unit of the loss);
4. evaluate the candidate and the current version (the untrained start, the first time) on the same held-out set:
   the share of implied pairs ordered as the annotators did, a tie counting one half;
5. save the candidate (``save_pretrained`` and a lineage manifest: parent, dataset offsets per partition, comparison
   counts, both accuracies, config, time);
6. the gate: accuracy >= the current one's - ``gate_tolerance`` publishes it on rlhf.models.v1 (the reward service
   loads it); otherwise it is kept as rejected, with both figures.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

from rlhf.bus import topics
from rlhf.bus.base import Bus
from rlhf.trainer import metrics
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.dataset import Dataset, StoredComparison
from rlhf.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

CURRENT_REWARD = "reward.current"
PUBLISHED, REJECTED = "published", "rejected"


class TooFewComparisons(Exception):
    def __init__(self, have: int, need: int, what: str = "comparisons") -> None:
        super().__init__(f"{have} {what} in the dataset; training needs at least {need}")
        self.have, self.need = have, need


class NoBaseModel(Exception):
    """Nothing to start the first reward model from."""


@dataclasses.dataclass(frozen=True)
class TrainingOutcome:
    version: common_pb2.ModelVersion
    published: bool
    heldout_accuracy: float
    incumbent_accuracy: float
    comparisons: int
    heldout: int
    seconds: float


def as_ranking(stored: StoredComparison):
    """A dataset comparison as the core's Ranking (best first; a pair keeps its margin)."""
    from rlhf.core.data import Ranking

    c = stored.comparison
    k = len(c.responses)
    return Ranking(prompt=c.prompt.text, responses=c.responses, ranking=tuple(range(k)),
                   margin=c.margin if k == 2 else None, messages=c.prompt.messages)


def heldout_accuracy(reward_model, rankings: Sequence, batch_size: int = 64) -> float:
    """Share of the pairs implied by ``rankings`` that ``reward_model`` orders as they do; a tie counts 1/2.

    Every response of every ranking is scored in batches of ``batch_size`` (not one forward pass per ranking)."""
    from rlhf.core.reward_training import prompt_text

    prompts: list[str] = []
    responses: list[str] = []
    sizes: list[int] = []
    for r in rankings:
        ordered = list(r.ordered)
        prompts += [prompt_text(reward_model.tokenizer, r)] * len(ordered)
        responses += ordered
        sizes.append(len(ordered))
    scores = reward_model.score(prompts, responses, batch_size).tolist() if responses else []
    right, total, start = 0.0, 0, 0
    for size in sizes:
        ranked = scores[start:start + size]  # best first, as the ranking orders them
        start += size
        for i in range(size):
            for j in range(i + 1, size):
                right += 1.0 if ranked[i] > ranked[j] else 0.5 if ranked[i] == ranked[j] else 0.0
                total += 1
    return right / total if total else 0.0


def version_to_proto(record: dict) -> common_pb2.ModelVersion:
    """A versions-table record as the API's ModelVersion."""
    mv = common_pb2.ModelVersion(
        name=record.get("name", ""), version=record["version"],
        kind=common_pb2.MODEL_KIND_REWARD if record.get("kind") == "reward" else common_pb2.MODEL_KIND_POLICY,
        parent_version=record.get("parent") or "", data_refs=record.get("data_refs", []), uri=record.get("uri", ""),
        reward_model_version=record.get("reward_model_version", ""),
    )
    mv.created_at.FromSeconds(int(record.get("created_at", 0)))
    labels = {k: str(v) for k, v in record.get("labels", {}).items()}
    labels["status"] = record.get("status", "")
    for key in ("run_id", "learner_step"):
        if key in record:
            labels[key] = str(record[key])
    for key in ("heldout_accuracy", "incumbent_accuracy", "comparisons", "heldout"):
        if key in record:
            labels[key] = f"{record[key]:.4f}" if isinstance(record[key], float) else str(record[key])
    mv.labels.update(labels)
    return mv


class RewardVersionTrainer:
    def __init__(self, config: TrainerConfig, dataset: Dataset, bus: Bus) -> None:
        self.config = config
        self.dataset = dataset
        self.bus = bus
        self.training = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ reading

    def current(self) -> dict | None:
        name = self.dataset.get_state(CURRENT_REWARD)
        if not name:
            return None
        return self.dataset.version(name, kind="reward")

    def new_comparisons(self) -> int:
        current = self.current()
        return self.dataset.count_comparisons(after_id=current["max_comparison_id"] if current else 0)

    def due(self) -> bool:
        n = self.config.min_new_comparisons
        return n > 0 and not self.training.is_set() and self.new_comparisons() >= n

    def _path(self, uri: str) -> str:
        return uri if os.path.isabs(uri) else os.path.join(self.config.artifact_root, uri)

    # ------------------------------------------------------------------------------------------ training

    def train(self, min_comparisons: int = 0) -> TrainingOutcome:
        """Steps 1-6 (blocking: seconds to minutes). TooFewComparisons / NoBaseModel when it cannot start."""
        with self._lock:
            self.training.set()
            started = time.monotonic()
            try:
                outcome = self._train(min_comparisons or self.config.min_comparisons, started)
            except (TooFewComparisons, NoBaseModel):
                raise
            except Exception:
                metrics.REWARD_TRAININGS.labels("failed").inc()
                raise
            finally:
                self.training.clear()
        metrics.REWARD_TRAININGS.labels(PUBLISHED if outcome.published else REJECTED).inc()
        metrics.REWARD_TRAINING_SECONDS.observe(outcome.seconds)
        return outcome

    def _train(self, need: int, started: float) -> TrainingOutcome:
        import torch

        from rlhf.core.models import Manifest, build_reward_model, config_dict, load_causal_lm, load_reward_model
        from rlhf.core.models import read_manifest, save_artifact
        from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig

        c = self.config
        # 1. the data
        offsets = self.dataset.stored_offsets()
        stored = self.dataset.comparisons()
        if len(stored) < need:
            raise TooFewComparisons(len(stored), need)
        train = [as_ranking(s) for s in stored if not s.heldout]
        held = [as_ranking(s) for s in stored if s.heldout]
        if len(held) < c.min_heldout:
            raise TooFewComparisons(len(held), c.min_heldout, "held-out comparisons")
        if not train:
            raise TooFewComparisons(0, 1, "training comparisons")
        # 2. the start
        incumbent = self.current()
        if incumbent is not None:
            start_path, parent = self._path(incumbent["uri"]), incumbent["version"]
            candidate = load_reward_model(start_path, max_length=c.rm_max_length)
            reference = load_reward_model(start_path, max_length=c.rm_max_length)
        else:
            if not c.reward_base_path:
                raise NoBaseModel("no reward model yet and no reward_base_path to start one from (the SFT policy)")
            start_path = self._path(c.reward_base_path)
            try:
                kind = read_manifest(start_path).kind
            except (FileNotFoundError, ValueError):
                kind = "base"
            if kind == "reward":
                candidate = load_reward_model(start_path, max_length=c.rm_max_length)
                reference = load_reward_model(start_path, max_length=c.rm_max_length)
            else:
                backbone, tokenizer = load_causal_lm(start_path)
                candidate = build_reward_model(backbone, tokenizer, max_length=c.rm_max_length, seed=c.rm_seed)
                reference = build_reward_model(backbone, tokenizer, max_length=c.rm_max_length, seed=c.rm_seed)
            parent = os.path.basename(os.path.normpath(start_path))
        # 3. train
        training = RewardTrainingConfig(learning_rate=c.rm_learning_rate, num_epochs=c.rm_epochs,
                                        batch_size=c.rm_batch_size, seed=c.rm_seed)
        with torch.enable_grad():
            RewardTrainer(candidate, training).train(train, progress=False)
        # 4. evaluate both on the same held-out set
        candidate_acc = heldout_accuracy(candidate, held)
        incumbent_acc = heldout_accuracy(reference, held)
        published = candidate_acc >= incumbent_acc - c.gate_tolerance
        # 5. save with lineage
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        version = f"{c.reward_model_name}-{stamp}-{uuid.uuid4().hex[:4]}"
        uri = os.path.join("reward", version)
        data_refs = [f"{t}/{p}:0-{o}" for (t, p), o in sorted(offsets.items())]
        record = {
            "name": c.reward_model_name, "parent": parent, "uri": uri, "data_refs": data_refs,
            "comparisons": len(stored), "heldout": len(held), "max_comparison_id": stored[-1].id,
            "heldout_accuracy": candidate_acc, "incumbent_accuracy": incumbent_acc,
        }
        save_artifact(self._path(uri), candidate, candidate.tokenizer, Manifest(
            kind="reward", version=version, parent=parent,
            data={"dataset_offsets": {f"{t}/{p}": o for (t, p), o in sorted(offsets.items())},
                  "comparisons": len(stored), "train": len(train), "heldout": len(held),
                  "heldout_accuracy": candidate_acc, "incumbent_accuracy": incumbent_acc,
                  "gate_tolerance": c.gate_tolerance, "published": published},
            config=config_dict(training),
        ))
        mv = version_to_proto({**record, "version": version, "kind": "reward",
                               "status": PUBLISHED if published else REJECTED, "created_at": time.time()})
        # 6. the gate
        if published:
            self._publish(mv, events_pb2.MODEL_ACTION_PUBLISHED)
            self.dataset.put_version(version, "reward", PUBLISHED, record)
            self.dataset.set_state(CURRENT_REWARD, version)
            metrics.REWARD_HELDOUT_ACCURACY.set(candidate_acc)
            metrics.reward_published(time.time())
            log.info("reward model %s published: held-out accuracy %.3f (current %.3f) on %d comparisons",
                     version, candidate_acc, incumbent_acc, len(held))
        else:
            self.dataset.put_version(version, "reward", REJECTED, record)
            log.warning("reward model %s rejected: held-out accuracy %.3f < current %.3f - %.3f",
                        version, candidate_acc, incumbent_acc, c.gate_tolerance)
        return TrainingOutcome(mv, published, candidate_acc, incumbent_acc, len(stored), len(held),
                               time.monotonic() - started)

    # ------------------------------------------------------------------------------------------ publication

    def _publish(self, version: common_pb2.ModelVersion, action: int, previous: str = "",
                 traffic_percent: int = 100) -> None:
        event = events_pb2.ModelEvent(version=version, action=action, previous_version=previous,
                                      traffic_percent=traffic_percent)
        event.at.GetCurrentTime()
        self.bus.send(topics.MODELS, event.SerializeToString(), key=version.name.encode()).result(60)

    def rollback(self) -> common_pb2.ModelVersion:
        """The previous published version becomes current again (ROLLED_BACK on rlhf.models.v1)."""
        current = self.current()
        if current is None:
            raise LookupError("no reward-model version is current; nothing to roll back")
        target = next((v for v in self.dataset.iter_versions(kind="reward", status=PUBLISHED)  # newest first
                       if v["created_at"] < current["created_at"] and v["version"] != current["version"]), None)
        if target is None:
            raise LookupError(f"{current['version']} is the first published reward-model version; nothing before it")
        mv = version_to_proto(target)
        self._publish(mv, events_pb2.MODEL_ACTION_ROLLED_BACK, previous=current["version"])
        self.dataset.set_state(CURRENT_REWARD, target["version"])
        metrics.REWARD_HELDOUT_ACCURACY.set(target.get("heldout_accuracy", 0.0))
        return mv

    def promote(self, version: str, traffic_percent: int) -> common_pb2.ModelVersion:
        """A published reward version becomes current (reward models take all traffic: no canary)."""
        found = self.dataset.version(version, kind="reward")
        if found is None:
            raise KeyError(version)
        if found["status"] != PUBLISHED:
            raise ValueError(f"{version} is {found['status']}: only a published version can be promoted")
        mv = version_to_proto(found)
        current = self.current()
        self._publish(mv, events_pb2.MODEL_ACTION_PROMOTED, previous=current["version"] if current else "",
                      traffic_percent=traffic_percent)
        self.dataset.set_state(CURRENT_REWARD, version)
        return mv
