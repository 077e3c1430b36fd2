"""Configuration of the reward scoring service (flags, ``RLHF_REWARD_*`` or ``RLHF_*`` environment, defaults)."""
from __future__ import annotations

import dataclasses
import typing

from rlhf.serving.config import ServiceConfig, _check, field


@dataclasses.dataclass(frozen=True)
class RewardConfig(ServiceConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_REWARD_"

    port: int = field(50054, "gRPC port of the reward service; 0 picks a free one.")
    metrics_port: int = field(9104, "Port of /metrics; 0 picks a free one; -1 disables it.")

    # -- what is served
    model_path: str = field(
        "",
        "The initial reward model: a save_pretrained folder (absolute, or relative to artifact_root) of our "
        "RewardModel or any Hugging Face sequence-classification checkpoint with one label. Empty: the service waits "
        "for LoadRewardModel or a PUBLISHED reward version on rlhf.models.v1 (health NOT_SERVING until then).",
    )
    initial_version: str = field(
        "", "Version id of model_path; empty: the version in its manifest.json, else the folder name."
    )
    model_name: str = field(
        "reward",
        "Model family this service serves: events on rlhf.models.v1 for other names (and policies) are ignored.",
    )
    artifact_root: str = field(
        "out/artifacts",
        "Root of relative model paths (ModelVersion.uri, model_path): a local folder embedded, a shared volume on "
        "Kubernetes.",
    )
    follow_model_events: bool = field(
        True,
        "Follow rlhf.models.v1: a PUBLISHED, PROMOTED or ROLLED_BACK reward version of model_name becomes current. "
        "Each replica reads the topic from the start (a reader outside any consumer group), so it reaches the fleet's state.",
    )
    models_group_prefix: str = field(
        "rlhf-reward", "Prefix of this replica's reader name on rlhf.models.v1 (its Kafka client id "
        "<prefix>.<replica>.<boot id>; the reader joins no consumer group)."
    )
    drain_timeout_s: float = field(
        60.0, "How long a replaced version may finish its queued and running batches before it is unloaded anyway."
    )

    # -- the model
    device: str = field("auto", "Torch device: 'auto' (cuda when visible, else cpu), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = field("auto", "Weights dtype: 'auto' (as saved), 'float32', 'bfloat16', 'float16'.")
    torch_num_threads: int = field(0, "Torch intra-op threads (process-wide); 0 = torch's default.")
    context_limit: int = field(
        0,
        "Longest prompt + response in tokens; 0 = the model's own context (max_position_embeddings). Longer items "
        "are INVALID_ARGUMENT (never truncated: a truncated text would get another text's score).",
    )

    # -- dynamic batching
    max_batch_size: int = field(
        64, "Most items in one forward pass. Items of concurrent calls share passes (dynamic batching)."
    )
    max_wait_s: float = field(
        0.002,
        "When the model is idle, how long the first item waits for others to share its forward pass. While a pass "
        "runs, new items queue and go together in the next one without waiting.",
    )
    max_queue: int = field(8192, "Items waiting for a forward pass before calls are refused with RESOURCE_EXHAUSTED.")
    bucket_ratio: float = field(
        2.0,
        "Length bucketing: one forward pass holds items whose token lengths are within this factor of each other "
        "(buckets at powers of it), so padding stays below that share of a batch.",
    )

    # -- request limits
    max_items: int = field(512, "Most items in one Score request.")
    max_text_bytes: int = field(64 * 1024, "Largest prompt, response or message content, in UTF-8 bytes.")
    max_messages: int = field(64, "Most chat messages in one item.")
    max_id_bytes: int = field(256, "Longest version string, in UTF-8 bytes.")

    # -- score cache
    score_cache_ttl_s: float = field(
        24 * 3600.0,
        "Lifetime of a cached score in the cache (key: version and a hash of the formatted prompt and the response); "
        "0 disables the score cache.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model_name), "model_name", "must not be empty")
        _check(self.drain_timeout_s > 0, "drain_timeout_s", "must be > 0")
        _check(self.torch_num_threads >= 0, "torch_num_threads", "must be >= 0")
        _check(self.context_limit >= 0, "context_limit", "must be >= 0")
        _check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _check(self.max_wait_s >= 0, "max_wait_s", "must be >= 0")
        _check(self.max_queue >= self.max_items, "max_queue", "must be >= max_items")
        _check(self.bucket_ratio > 1.0, "bucket_ratio", "must be > 1")
        _check(self.max_items >= 1, "max_items", "must be >= 1")
        _check(self.max_text_bytes >= 1, "max_text_bytes", "must be >= 1")
        _check(self.max_messages >= 1, "max_messages", "must be >= 1")
        _check(self.max_id_bytes >= 1, "max_id_bytes", "must be >= 1")
        _check(self.score_cache_ttl_s >= 0, "score_cache_ttl_s", "must be >= 0")
