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
    dataset_cache_mb: int = field(
        64, "SQLite page cache of the dataset's writer, in MiB: its indexes (event and response ids) in memory. At "
            "SQLite's default (2 MiB) storing slows as the dataset grows (13.6 against 10.1 us a record at 240,000 "
            "records, benchmarks/README.md).")
    dataset_checkpoint_pages: int = field(
        10_000, "WAL pages (4 KiB) after which a commit checkpoints the dataset (PRAGMA wal_autocheckpoint). SQLite's "
                "1,000 checkpoints ten times as often, copying the same hot index pages each time and waiting for "
                "their fsyncs in the storing commit (storing 6-17% slower, benchmarks/README.md); the WAL then "
                "grows to ~40 MiB.")
    housekeeping_s: float = field(
        2.0, "Seconds between dead-lettering of timed-out events, publishing the outbox and refreshing lag metrics.")
    responses_ahead_records: int = field(
        10_000, "While the trainer's rlhf.responses.v1 partitions lag by more than this many records, it pauses "
                "rlhf.feedback.v1, so that on a backlog feedback finds its responses stored instead of waiting for "
                "them (a backlog read feedback first stored ~25% slower, benchmarks/README.md); 0 never pauses.")
    responses_ahead_s: float = field(
        30.0, "The longest feedback is paused for the responses at a time; it is then read at least as long before "
              "it may be paused again (a responses topic that never catches up does not starve it).")

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

    # -- continuous PPO: the run
    policy_name: str = field("policy", "Model name of the policy versions on rlhf.models.v1 (the policy service's).")
    policy_base_path: str = field(
        "",
        "The policy a PPO run starts from (and its KL reference) when StartRun names no parent: the served SFT "
        "policy's save_pretrained folder; absolute, or relative to artifact_root. Empty: StartRun needs a parent.",
    )
    auto_start: bool = field(False, "Start a PPO run when the trainer starts (and resume the last one if it was "
                                    "running); rlhf up sets it.")
    ppo_steps: int = field(0, "Learner updates per run; 0 = until paused or stopped (continuous).")
    ppo_batch_size: int = field(16, "Rollouts per PPO update (PPOConfig.batch_size; a rollout batch).")
    ppo_mini_batches: int = field(2, "Mini-batches per PPO epoch (PPOConfig.num_mini_batches).")
    ppo_epochs: int = field(2, "PPO epochs per update (PPOConfig.ppo_epochs).")
    ppo_response_length: int = field(24, "Most new tokens per rollout response (PPOConfig.response_length).")
    ppo_temperature: float = field(1.0, "Sampling temperature of rollouts (PPOConfig.temperature).")
    ppo_learning_rate: float = field(1e-5, "Policy learning rate (PPOConfig.learning_rate).")
    ppo_kl_coef: float = field(0.05, "beta of the KL penalty to the run's parent (PPOConfig.kl_coef).")
    ppo_seed: int = field(0, "Seed of the run: the learner's shuffles, worker i's sampling seeds (seed + i).")
    ppo_normalize_reward: bool = field(True, "Standardise reward-service scores with running statistics "
                                             "(PPOConfig.normalize_reward).")
    # -- continuous PPO: rollouts and the buffer
    buffer_url: str = field(
        "",
        "The rollout buffer: redis://host:port/db (a Redis stream) or memory:// (this process). Empty: cache_url's "
        "Redis (memory:// when the cache is in-process).",
    )
    reward_url: str = field(
        "",
        "The reward service that scores rollouts and canaries: grpc://host:port (or host:port). Empty: this "
        "process's own gRPC "
        "server (embedded mode serves the reward service beside the trainer).",
    )
    local_workers: int = field(1, "Rollout workers on threads of this process; 0 when every worker is its own "
                                  "process (rlhf rollout-worker).")
    max_staleness: int = field(
        1, "A rollout batch more than this many policy versions older than the learner's is dropped (and counted); "
           "workers generate only batches within it, so with 1 they sample the next version's batches while the "
           "learner updates (up to 2 * publish_every - 1 updates behind the learner, corrected by truncated "
           "importance sampling). 0 with publish_every 1 is synchronous PPO.")
    importance_clip: float = field(2.0, "Cap of the truncated importance weight of a batch sampled by other weights "
                                        "than the learner's (PPOConfig.importance_clip).")
    publish_every: int = field(
        4, "Learner updates per saved policy version (what workers load next, and a candidate for the canary). 4: "
           "a version a step is far more than serving can judge (a canary needs promote_after served responses "
           "before its decision; a newer version replaces an undecided one), and saving one costs about as much "
           "as a small model's update; workers lag at most max_staleness versions either way. 1 (with "
           "max_staleness 0) is synchronous PPO.")
    checkpoint_every: int = field(
        4, "Learner updates per checkpoint (also written with every version); batches are acknowledged only after "
           "the checkpoint that covers them, so a learner killed in between redoes at most this many updates from "
           "the batches still in the buffer and loses none. 4: with publish_every 4 one checkpoint per version.")
    prompts_path: str = field(
        "", "A JSONL file of RL prompts ({\"prompt\": ...} per line) added to the workers' pool besides rlhf.prompts.v1.")
    served_share: float = field(0.5, "Share of each rollout batch taken from served traffic's prompts, when there "
                                     "are any (the rest from rlhf.prompts.v1).")
    exclude_products: str = field(
        "rlhf-simulate-eval",
        "Comma-separated products whose served prompts are never trained on (evaluation traffic, opt-outs).")
    # -- continuous PPO: serving the versions
    canary_percent: int = field(10, "Routing keys a new policy version gets as the canary (1..99).")
    promote_after: int = field(50, "Served responses of a canary before it is promoted or rolled back.")
    promote_tolerance: float = field(
        0.0, "A canary is promoted when its served responses' mean reward >= stable's (same period) minus this.")
    canary_sample: int = field(200, "Most served responses per version the promotion decision scores.")
    keep_versions: int = field(
        5, "Inactive policy versions whose folders stay on disk, of each kind: earlier stable versions (rollback "
           "targets) and the rest (superseded before they served, rolled back); older ones are deleted, their records "
           "stay. Stable, the canary and saved versions are always kept. 0 keeps every folder.")
    # -- continuous PPO: reward-hacking guards
    kl_budget: float = field(8.0, "KL to the parent (nats per response) the run may spend; <= 0 disables the guard.")
    kl_patience: int = field(3, "Consecutive updates over the KL budget that pause the run.")
    kl_slope_window: int = field(8, "Updates the score and KL slopes are fitted on; 0 disables the slope guard.")
    max_kl_slope: float = field(
        1.0, "KL rising faster than this (nats per response per update) while the score rises pauses the run.")
    length_factor: float = field(
        3.0, "Mean response length outside [reference / f, reference * f] pauses the run; <= 1 disables it.")
    length_patience: int = field(3, "Consecutive updates outside the length band that pause the run.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.dataset_path), "dataset_path", "must not be empty")
        _check(bool(self.group_id), "group_id", "must not be empty")
        _check(self.join_timeout_s > 0, "join_timeout_s", "must be > 0")
        _check(self.max_records >= 1, "max_records", "must be >= 1")
        _check(self.dataset_cache_mb >= 1, "dataset_cache_mb", "must be >= 1")
        _check(self.dataset_checkpoint_pages >= 1, "dataset_checkpoint_pages", "must be >= 1")
        _check(self.housekeeping_s > 0, "housekeeping_s", "must be > 0")
        _check(self.responses_ahead_records >= 0, "responses_ahead_records", "must be >= 0")
        _check(self.responses_ahead_s > 0, "responses_ahead_s", "must be > 0")
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
        _check(self.ppo_steps >= 0, "ppo_steps", "must be >= 0")
        _check(self.ppo_batch_size >= 2, "ppo_batch_size", "must be >= 2")
        _check(self.ppo_mini_batches >= 1 and self.ppo_batch_size % self.ppo_mini_batches == 0, "ppo_mini_batches",
               f"must be >= 1 and divide ppo_batch_size ({self.ppo_batch_size})")
        _check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        _check(self.ppo_response_length >= 1, "ppo_response_length", "must be >= 1")
        _check(self.ppo_temperature > 0, "ppo_temperature", "must be > 0")
        _check(self.ppo_learning_rate > 0, "ppo_learning_rate", "must be > 0")
        _check(self.ppo_kl_coef >= 0, "ppo_kl_coef", "must be >= 0")
        _check(self.local_workers >= 0, "local_workers", "must be >= 0")
        _check(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        _check(self.importance_clip >= 1, "importance_clip", "must be >= 1")
        _check(self.publish_every >= 1, "publish_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(0 <= self.served_share <= 1, "served_share", "must be in [0, 1]")
        _check(1 <= self.canary_percent <= 99, "canary_percent", "must be in 1..99")
        _check(self.promote_after >= 1, "promote_after", "must be >= 1")
        _check(self.promote_tolerance >= 0, "promote_tolerance", "must be >= 0")
        _check(self.canary_sample >= 1, "canary_sample", "must be >= 1")
        _check(self.keep_versions >= 0, "keep_versions", "must be >= 0")
        _check(self.kl_patience >= 1, "kl_patience", "must be >= 1")
        _check(self.kl_slope_window == 0 or self.kl_slope_window >= 2, "kl_slope_window", "must be 0 or >= 2")
        _check(self.length_patience >= 1, "length_patience", "must be >= 1")
        _check(not self.reward_url or self.reward_url.removeprefix("grpc://").rpartition(":")[2].isdigit(),
               "reward_url", "must be grpc://HOST:PORT (or HOST:PORT)")

    @property
    def rollout_buffer_url(self) -> str:
        """The buffer actually used (buffer_url, else the cache's Redis)."""
        return self.buffer_url or self.cache_url

    @property
    def excluded_products(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.exclude_products.split(",") if p.strip())

    def ppo_config(self):
        """The core PPOConfig of a run, from the ppo_* fields."""
        from rlhf.core.ppo import PPOConfig

        return PPOConfig(batch_size=self.ppo_batch_size, num_mini_batches=self.ppo_mini_batches,
                         ppo_epochs=self.ppo_epochs, response_length=self.ppo_response_length,
                         temperature=self.ppo_temperature, learning_rate=self.ppo_learning_rate,
                         kl_coef=self.ppo_kl_coef, seed=self.ppo_seed, normalize_reward=self.ppo_normalize_reward,
                         importance_clip=self.importance_clip)
