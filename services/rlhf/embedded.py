"""``rlhf up``: the platform embedded in one process.

Every service runs on one gRPC port (and one /metrics port) over an in-process bus and cache; nothing else
is needed (no Kafka, Redis or GPU). The same components run distributed, each in its own process, with the
Kafka bus and the Redis cache (``rlhf feedback`` ...).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import typing

from rlhf.bus.memory import InMemoryBus
from rlhf.cache.memory import InMemoryCache
from rlhf.serving import config as config_mod
from rlhf.serving.config import ServerConfig, field
from rlhf.serving.server import Component, ServiceHost

log = logging.getLogger(__name__)


EMBEDDED_TRAINER_DEFAULTS: typing.Mapping[str, typing.Any] = {
    # The loop runs by default.
    "auto_start": True,
    # One product's traffic on one machine is a few responses a second: a 10% canary that must serve 50 responses
    # before its decision (the production defaults) is judged every ~500 responses, and served stable fell ~200
    # updates behind the learner in a 13-minute `rlhf simulate` run. Half the routing keys and 25 responses make
    # a decision every ~50 responses. Set RLHF_TRAINER_CANARY_PERCENT / _PROMOTE_AFTER to change them.
    "canary_percent": 50,
    "promote_after": 25,
}
"""TrainerConfig defaults of ``rlhf up`` where neither a flag nor the environment sets the field."""


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig(ServerConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_EMBEDDED_"

    port: int = field(50051, "gRPC port every embedded service answers on; 0 picks a free one.")
    metrics_port: int = field(9100, "Port of /metrics; 0 picks a free one; -1 disables it.")
    policy_model_path: str = field(
        "",
        "Policy checkpoint to serve (a save_pretrained folder). Empty: the policy `rlhf demo` trained "
        "(out/demo/policy) when it exists, else a tiny random-init policy built under artifact_root.",
    )
    reward_model_path: str = field(
        "",
        "Reward model to serve (a save_pretrained folder). Empty: the last one `rlhf demo` trained (out/demo/reward-N) "
        "when there is one, else a tiny random-init reward model built under artifact_root.",
    )
    artifact_root: str = field("out/artifacts", "Where model versions live (a local folder in embedded mode).")

    @property
    def demo_policy(self) -> str:
        """Where `rlhf demo` (default --out) leaves its PPO policy."""
        return os.path.join("out", "demo", "policy")

    @property
    def demo_reward_model(self) -> str | None:
        """The last reward model `rlhf demo` (default --out) trained (reward-1, reward-2, ...), if any."""
        demo = os.path.join("out", "demo")
        rounds = sorted((int(n.split("-", 1)[1]), n) for n in (os.listdir(demo) if os.path.isdir(demo) else ())
                        if n.startswith("reward-") and n.split("-", 1)[1].isdigit())
        return os.path.join(demo, rounds[-1][1]) if rounds else None


def build_components(config: EmbeddedConfig) -> tuple[list[Component], InMemoryBus, InMemoryCache]:
    """The services of the platform over one in-process bus and cache."""
    from rlhf.bootstrap import ensure_initial_policy, ensure_initial_reward_model
    from rlhf.feedback.config import FeedbackConfig
    from rlhf.feedback.servicer import FeedbackComponent
    from rlhf.policy.config import PolicyConfig
    from rlhf.policy.servicer import PolicyComponent
    from rlhf.reward.config import RewardConfig
    from rlhf.reward.servicer import RewardComponent
    from rlhf.trainer.config import TrainerConfig
    from rlhf.trainer.servicer import TrainerComponent

    bus, cache = InMemoryBus(), InMemoryCache()
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ServerConfig)}
    feedback = FeedbackComponent(
        FeedbackConfig(**shared, bus_url="memory://", cache_url="memory://"), bus=bus, cache=cache
    )
    # The policy's own settings (model path, artifact root, batching) come from RLHF_POLICY_* like `rlhf policy`;
    # embedded always runs the torch backend over the in-process bus and cache.
    policy_config = config_mod.load(
        PolicyConfig, **shared, bus_url="memory://", cache_url="memory://", backend="torch", create_topics=True,
        artifact_root=config.artifact_root,
    )
    model_path = config.policy_model_path or policy_config.model_path
    if not model_path and os.path.isdir(config.demo_policy):
        model_path = config.demo_policy
    if not model_path:
        # Nothing trained yet: a tiny random-init policy built once under the artifact root, so that every API
        # answers from nothing (with random words until `rlhf demo` has trained a policy).
        model_path = ensure_initial_policy(config.artifact_root)
    policy_config = dataclasses.replace(policy_config, model_path=os.path.abspath(model_path))
    policy = PolicyComponent(policy_config, bus=bus, cache=cache)
    # The reward model likewise: RLHF_REWARD_* settings, the demo's last reward model, else a tiny random-init one.
    reward_config = config_mod.load(
        RewardConfig, **shared, bus_url="memory://", cache_url="memory://", create_topics=True,
        artifact_root=config.artifact_root,
    )
    reward_path = (config.reward_model_path or reward_config.model_path or config.demo_reward_model
                   or ensure_initial_reward_model(config.artifact_root))
    reward_config = dataclasses.replace(reward_config, model_path=os.path.abspath(reward_path))
    reward = RewardComponent(reward_config, bus=bus, cache=cache)
    # The trainer consumes the in-process feedback into SQLite under the artifact root and publishes reward models,
    # which the embedded reward service loads; the first one starts from the demo's SFT policy, else the served one.
    trainer_config = config_mod.load(
        TrainerConfig, **shared, bus_url="memory://", cache_url="memory://", create_topics=True,
        artifact_root=config.artifact_root, defaults=EMBEDDED_TRAINER_DEFAULTS,
    )
    if trainer_config.dataset_path == TrainerConfig.dataset_path:  # not set: beside the embedded artifacts
        trainer_config = dataclasses.replace(
            trainer_config, dataset_path=os.path.join(config.artifact_root, "trainer", "dataset.sqlite"))
    if not trainer_config.reward_base_path:
        sft = os.path.join("out", "demo", "sft")
        base = sft if os.path.isdir(sft) else policy_config.model_path
        trainer_config = dataclasses.replace(trainer_config, reward_base_path=os.path.abspath(base))
    # The PPO loop runs by default: from the served policy, one rollout worker on a thread, the in-process rollout
    # buffer, rollouts scored by the reward service of this same server.
    trainer_config = dataclasses.replace(
        trainer_config, policy_base_path=trainer_config.policy_base_path or policy_config.model_path,
        buffer_url=trainer_config.buffer_url or "memory://")
    trainer = TrainerComponent(trainer_config, bus=bus, cache=cache)
    chosen = config.policy_model_path or os.environ.get("RLHF_POLICY_MODEL_PATH")
    demo = os.path.abspath(os.path.dirname(config.demo_policy))
    if not chosen or os.path.commonpath([demo, os.path.abspath(chosen)]) == demo:
        # The built-in task's policy (the demo's PPO or SFT policy, or the tiny initial one): the task's training
        # prompts are the RL prompts.
        publish_builtin_prompts(bus, trainer_config.topic_partitions)
    return [feedback, policy, reward, trainer], bus, cache


def publish_builtin_prompts(bus, partitions: int) -> int:
    """The built-in task's training prompts on rlhf.prompts.v1 (its held-out prompts are kept for evaluation)."""
    from rlhf.bus import topics
    from rlhf.sim.world import split_prompts
    from rlhf.trainer.rollouts import prompt_id_of
    from rlhf.v1 import events_pb2

    bus.ensure_topics(topics.platform_topics(partitions=partitions))
    train, _ = split_prompts()
    futures = []
    for prompt in train:
        record = events_pb2.PromptRecord(prompt_id=prompt_id_of(prompt.text), prompt=prompt.text,
                                         source="dataset:builtin")
        record.created_at.GetCurrentTime()
        futures.append(bus.send(topics.PROMPTS, record.SerializeToString(), key=record.prompt_id.encode()))
    for f in futures:
        f.result(30)
    return len(futures)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, EmbeddedConfig)


async def serve(config: EmbeddedConfig) -> None:
    components, _, _ = build_components(config)

    def announce(host: ServiceHost) -> None:
        print(f"rlhf embedded: gRPC on {host.address} ({', '.join(c.service_name for c in components)}); "
              f"metrics on http://{config.host}:{host.metrics_port}/metrics. Ctrl-C stops.", flush=True)

    await ServiceHost(config, components).run_until_signal(announce)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(EmbeddedConfig, args)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"rlhf up: {exc}") from None
    asyncio.run(serve(config))
    return 0
