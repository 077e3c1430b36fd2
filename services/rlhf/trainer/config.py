"""Configuration of the trainer service (flags, ``RLHF_TRAINER_*`` or ``RLHF_*`` environment, defaults)."""
from __future__ import annotations

import dataclasses
import typing

from rlhf.serving.config import ServiceConfig, _check, field


@dataclasses.dataclass(frozen=True)
class TrainerConfig(ServiceConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_TRAINER_"

    port: int = field(50055, "gRPC port of the trainer service; 0 picks a free one.")
    metrics_port: int = field(9105, "Port of /metrics; 0 picks a free one; -1 disables it.")

    # -- the dataset
    dataset_path: str = field(
        "out/trainer/dataset.sqlite",
        "The trainer's dataset (SQLite, WAL): every consumed record with its offset. On the trainer's own volume; "
        "Kafka is its replayable source (delete it and the trainer rebuilds it from the topics' retention).",
    )
    group_id: str = field("rlhf-trainer", "Consumer group on rlhf.feedback.v1 and rlhf.responses.v1.")
    join_timeout_s: float = field(
        300.0,
        "How long a feedback event waits for the served responses it names to arrive on rlhf.responses.v1; after "
        "that it goes to rlhf.feedback.v1.dlq with the reason.",
    )
    max_records: int = field(2000, "Most records stored in one dataset transaction (one poll).")
    housekeeping_s: float = field(
        2.0, "Seconds between dead-lettering of timed-out events, publishing the outbox and refreshing lag metrics.")

    # -- reward models
    artifact_root: str = field(
        "out/artifacts", "Where versions are saved (<artifact_root>/<version>) and what their uri is relative to.")
    reward_model_name: str = field("reward", "Model name of the reward versions on rlhf.models.v1.")
    reward_base_path: str = field(
        "",
        "What the first reward model starts from: a causal LM (the SFT policy: its body gets a scalar head) or a "
        "reward-model artifact; absolute, or relative to artifact_root. Later versions start from the current one.",
    )
    min_new_comparisons: int = field(
        200, "Train a candidate reward model when this many comparisons arrived since the last version; 0 = never "
             "by itself (TrainRewardModel only).")
    min_comparisons: int = field(20, "TrainRewardModel's default floor: fewer comparisons is FAILED_PRECONDITION.")
    heldout_share: float = field(
        0.1, "Share of comparisons held out for the gate, fixed by a hash of their source event ids.")
    min_heldout: int = field(5, "Fewest held-out comparisons a gate decision needs.")
    gate_tolerance: float = field(
        0.0, "A candidate is published when its held-out accuracy >= the current version's on the same set minus this.")
    rm_learning_rate: float = field(1e-4, "Reward-model AdamW peak learning rate (RewardTrainingConfig.learning_rate).")
    rm_epochs: float = field(2.0, "Passes over the comparisons per training (RewardTrainingConfig.num_epochs).")
    rm_batch_size: int = field(16, "Comparisons per optimizer step (RewardTrainingConfig.batch_size).")
    rm_max_length: int = field(256, "Longest prompt + response in tokens while training (longer ones keep their end).")
    rm_seed: int = field(0, "Seed of reward-model training.")
    torch_num_threads: int = field(0, "Torch intra-op threads; 0 = torch's default.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.dataset_path), "dataset_path", "must not be empty")
        _check(bool(self.group_id), "group_id", "must not be empty")
        _check(self.join_timeout_s > 0, "join_timeout_s", "must be > 0")
        _check(self.max_records >= 1, "max_records", "must be >= 1")
        _check(self.housekeeping_s > 0, "housekeeping_s", "must be > 0")
        _check(self.min_new_comparisons >= 0, "min_new_comparisons", "must be >= 0")
        _check(self.min_comparisons >= 1, "min_comparisons", "must be >= 1")
        _check(0 < self.heldout_share < 1, "heldout_share", "must be in (0, 1)")
        _check(self.min_heldout >= 1, "min_heldout", "must be >= 1")
        _check(0 <= self.gate_tolerance <= 1, "gate_tolerance", "must be in [0, 1]")
        _check(self.rm_learning_rate > 0, "rm_learning_rate", "must be > 0")
        _check(self.rm_epochs > 0, "rm_epochs", "must be > 0")
        _check(self.rm_batch_size >= 1, "rm_batch_size", "must be >= 1")
        _check(self.rm_max_length >= 8, "rm_max_length", "must be >= 8")
        _check(self.torch_num_threads >= 0, "torch_num_threads", "must be >= 0")
