"""Configuration of the policy inference service (flags, ``RLHF_POLICY_*`` or ``RLHF_*`` environment, defaults)."""
from __future__ import annotations

import dataclasses
import typing

from rlhf.serving.config import ServiceConfig, _check, field

BACKENDS = ("torch", "triton")


@dataclasses.dataclass(frozen=True)
class PolicyConfig(ServiceConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_POLICY_"

    port: int = field(50052, "gRPC port of the policy service; 0 picks a free one.")
    metrics_port: int = field(9102, "Port of /metrics; 0 picks a free one; -1 disables it.")

    # -- what is served
    backend: str = field(
        "torch",
        "Inference backend: 'torch' (the model in this process, continuous batching on a dedicated thread) or "
        "'triton' (a Triton Inference Server at triton_url runs the model; see deploy/triton).",
    )
    model_path: str = field(
        "",
        "The initial policy: a save_pretrained folder (absolute, or relative to artifact_root), loaded at start as the "
        "stable version. Empty: the service waits for LoadPolicy or an event on rlhf.models.v1 (health NOT_SERVING "
        "until then). Events on rlhf.models.v1 override it.",
    )
    initial_version: str = field(
        "", "Version id of model_path; empty: the version in its manifest.json, else the folder name."
    )
    model_name: str = field(
        "policy",
        "Model family this service serves: events on rlhf.models.v1 for other names (and reward models) are ignored.",
    )
    artifact_root: str = field(
        "out/artifacts",
        "Root of relative model paths (ModelVersion.uri, model_path): a local folder embedded (out/ is ignored by "
        "git, like `rlhf demo`'s out/demo), a shared volume on Kubernetes. The Triton server must see the same "
        "files (its RLHF_MODEL_ROOT).",
    )
    add_special_tokens: bool = field(
        True,
        "Whether the tokenizer adds its special tokens around the formatted prompt, as the trainer's encode_prompts "
        "does (so the policy sees at serving time what it saw in training). Passed to the Triton models too.",
    )

    # -- torch backend
    device: str = field("auto", "Torch device: 'auto' (cuda when visible, else cpu), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = field("auto", "Weights dtype: 'auto' (as saved), 'float32', 'bfloat16', 'float16'.")
    torch_num_threads: int = field(
        0, "Torch intra-op threads (process-wide, and per Triton model instance); 0 = torch's default (all cores)."
    )
    max_batch_size: int = field(
        16,
        "Most rows (samples) decoded together by one version. New rows join a running batch between decode steps "
        "(continuous batching); the rest wait in the queue.",
    )
    max_wait_s: float = field(
        0.005,
        "When the model is idle, how long the first request waits for others to share its first batch. Small next "
        "to a generation; while a batch runs, requests join it at the next step without waiting.",
    )
    max_queue: int = field(
        1024, "Rows waiting for a slot, per version, before new requests are refused with RESOURCE_EXHAUSTED."
    )

    # -- request limits and defaults
    max_new_tokens_limit: int = field(512, "Largest sampling.max_new_tokens a request may ask for.")
    default_max_new_tokens: int = field(128, "max_new_tokens of a request that leaves it 0.")
    default_temperature: float = field(
        1.0, "Temperature of a request that sets none of temperature, top_p and top_k (0 = greedy)."
    )
    max_num_samples: int = field(8, "Most samples one request may ask for (num_samples).")
    context_limit: int = field(
        0,
        "Longest prompt + response in tokens; 0 = the model's own context (max_position_embeddings). A prompt that "
        "leaves no room is INVALID_ARGUMENT; max_new_tokens is cut to what is left (finish reason LENGTH).",
    )
    max_text_bytes: int = field(32 * 1024, "Largest prompt, or message content, in UTF-8 bytes.")
    max_messages: int = field(64, "Most chat messages in one request.")
    max_stop_sequences: int = field(4, "Most stop sequences in one request.")
    max_stop_bytes: int = field(64, "Longest stop sequence, in UTF-8 bytes.")
    max_id_bytes: int = field(256, "Longest prompt_id, routing_key, product or version string, in UTF-8 bytes.")

    # -- served-response records (to bus_url and cache_url of ServiceConfig)
    record_ttl_s: float = field(
        7 * 24 * 3600.0, "Lifetime of a served-response record in the cache: feedback later than this is not joined."
    )
    record_queue_size: int = field(
        10000,
        "Served responses waiting to be recorded. Recording runs in the background, off the request's latency; when "
        "the queue is full a record is dropped and counted (rlhf_policy_record_failures_total{sink=\"queue\"}).",
    )
    record_batch_size: int = field(256, "Most records written in one cache round trip.")

    # -- versions
    follow_model_events: bool = field(
        True,
        "Follow rlhf.models.v1: load PUBLISHED versions, apply PROMOTED traffic splits and ROLLED_BACK. Each replica "
        "reads the whole topic at start (a reader outside any consumer group), so it reaches the fleet's current state.",
    )
    models_group_prefix: str = field(
        "rlhf-policy", "Prefix of this replica's reader name on rlhf.models.v1 (its Kafka client id "
        "<prefix>.<replica>.<boot id>; the reader joins no consumer group)."
    )
    max_standby_versions: int = field(
        1, "Versions kept loaded without traffic (pinned requests only) beyond the stable and the candidate."
    )
    drain_timeout_s: float = field(
        120.0,
        "How long a replaced version may finish its in-flight requests before it is unloaded anyway.",
    )

    # -- triton backend
    triton_url: str = field(
        "127.0.0.1:18001",
        "host:port of Triton's gRPC endpoint (backend 'triton'). One Triton server per policy replica: the service "
        "loads and unloads its models (policy__<version>, policy_stream__<version>).",
    )
    triton_model_repository: str = field(
        "",
        "Folder with the policy and policy_stream template models (config.pbtxt + model.py) sent with each load; "
        "empty: $RLHF_TRITON_MODEL_REPOSITORY, else deploy/triton/model_repository of this checkout.",
    )
    triton_load_timeout_s: float = field(600.0, "Longest wait for Triton to load one model.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        _check(bool(self.model_name), "model_name", "must not be empty")
        _check(self.torch_num_threads >= 0, "torch_num_threads", "must be >= 0")
        _check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _check(self.max_wait_s >= 0, "max_wait_s", "must be >= 0")
        _check(self.max_queue >= 1, "max_queue", "must be >= 1")
        _check(self.max_new_tokens_limit >= 1, "max_new_tokens_limit", "must be >= 1")
        _check(1 <= self.default_max_new_tokens <= self.max_new_tokens_limit, "default_max_new_tokens",
               "must be in [1, max_new_tokens_limit]")
        _check(0 <= self.default_temperature <= 2, "default_temperature", "must be in [0, 2]")
        _check(self.max_num_samples >= 1, "max_num_samples", "must be >= 1")
        _check(self.context_limit >= 0, "context_limit", "must be >= 0")
        _check(self.max_text_bytes >= 1, "max_text_bytes", "must be >= 1")
        _check(self.max_messages >= 1, "max_messages", "must be >= 1")
        _check(self.max_stop_sequences >= 0, "max_stop_sequences", "must be >= 0")
        _check(self.max_stop_bytes >= 1, "max_stop_bytes", "must be >= 1")
        _check(self.max_id_bytes >= 1, "max_id_bytes", "must be >= 1")
        _check(self.record_ttl_s > 0, "record_ttl_s", "must be > 0")
        _check(self.record_queue_size >= 1, "record_queue_size", "must be >= 1")
        _check(self.record_batch_size >= 1, "record_batch_size", "must be >= 1")
        _check(self.max_standby_versions >= 0, "max_standby_versions", "must be >= 0")
        _check(self.drain_timeout_s > 0, "drain_timeout_s", "must be > 0")
        _check(self.triton_load_timeout_s > 0, "triton_load_timeout_s", "must be > 0")
