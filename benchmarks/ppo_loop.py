#!/usr/bin/env python3
"""PPO samples per second through the full service stack against the core's in-process trainer on the same config.

    python benchmarks/ppo_loop.py --steps 12 --batch-size 8 --response-length 16
    python benchmarks/ppo_loop.py --buffer-url "$RLHF_REDIS_URL?key_prefix=bench:"     # the Redis stream buffer
    python benchmarks/ppo_loop.py --size small                                          # the demo's model size

* ``core``: ``rlhf.core.ppo.PPOTrainer.step`` in this process: generation, scoring by the reward model in process,
  the update, all on one thread.
* ``stack``: the embedded platform on a real gRPC socket: a rollout worker thread generates, scores through the
  reward service over gRPC and adds batches to the rollout buffer; the learner thread reads them and updates;
  versions are saved and checkpoints written as the trainer does by default (publish_every, checkpoint_every,
  max_staleness: TrainerConfig's defaults unless given). Samples/s are measured over ``--steps`` learner steps after
  ``--warmup-steps`` (the first loads the models), counting the fewer of the learner's updates and the worker's
  batches in that window (the worker may have queued batches before it).

Both use the same initial random-init policy and reward model (``--size``: tiny as ``rlhf up`` builds them, or a
larger ModelSize of ``rlhf.core.models``), batch size, response length, epochs and seed. The stack's
phase shares (generation, scoring, buffer_wait, update, save, checkpoint) come from its
``rlhf_trainer_ppo_phase_duration_seconds`` histogram. Goal: stack >= 0.8x core. Run on a quiet machine: the two
sides run one after the other and a busy core moves either by 2x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def core_rate(root: str, args: argparse.Namespace) -> float:
    from rlhf.bootstrap import ensure_initial_policy, ensure_initial_reward_model
    from rlhf.core.models import load_causal_lm, load_reward_model
    from rlhf.core.ppo import PPOConfig, PPOTrainer
    from rlhf.core.tokenizer import format_prompt
    from rlhf.sim.world import split_prompts

    policy, tokenizer = load_causal_lm(ensure_initial_policy(root, size=args.size))
    reward = load_reward_model(ensure_initial_reward_model(root, size=args.size))
    prompts = [p.text for p in split_prompts()[0]]
    config = PPOConfig(batch_size=args.batch_size, num_mini_batches=2, ppo_epochs=args.epochs,
                       response_length=args.response_length, learning_rate=1e-5, normalize_reward=True)
    trainer = PPOTrainer(config, policy, None, tokenizer, lambda ps, rs: reward.score(ps, rs), prompts,
                         encode_prompt=lambda t: tokenizer(format_prompt(tokenizer, t), add_special_tokens=False)[
                             "input_ids"])
    trainer.step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def stack_rate(root: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    from prometheus_client import REGISTRY

    from rlhf.bootstrap import ensure_initial_policy, ensure_initial_reward_model
    from rlhf.embedded import EmbeddedConfig, build_components
    from rlhf.serving.server import ServiceHost
    from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
    from support.hosting import HostThread

    os.environ.update({
        "RLHF_TRAINER_PPO_BATCH_SIZE": str(args.batch_size), "RLHF_TRAINER_PPO_MINI_BATCHES": "2",
        "RLHF_TRAINER_PPO_EPOCHS": str(args.epochs), "RLHF_TRAINER_PPO_RESPONSE_LENGTH": str(args.response_length),
        "RLHF_TRAINER_KL_BUDGET": "0", "RLHF_TRAINER_MIN_NEW_COMPARISONS": "0",
        "RLHF_TRAINER_BUFFER_URL": args.buffer_url,
    })
    for name in ("publish_every", "checkpoint_every", "max_staleness"):
        if getattr(args, name) is not None:
            os.environ[f"RLHF_TRAINER_{name.upper()}"] = str(getattr(args, name))
    # Built here at the requested size, the embedded platform finds them and serves and trains them.
    ensure_initial_policy(root, size=args.size)
    ensure_initial_reward_model(root, size=args.size)
    config = EmbeddedConfig(port=0, metrics_port=-1, artifact_root=root)
    components, _, _ = build_components(config)
    with HostThread(lambda: ServiceHost(config, components)) as host:
        stub = trainer_pb2_grpc.TrainerServiceStub(host.channel())

        def step() -> int:
            return stub.GetStatus(trainer_pb2.GetStatusRequest()).step

        while step() < args.warmup_steps:
            time.sleep(0.05)
        phases0, added0 = phase_sums(REGISTRY), batches_added(REGISTRY)
        first, start = step(), time.perf_counter()
        while step() < first + args.steps:
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        # The learner may start the window on batches the worker queued before it (up to its staleness bound):
        # count what both sides did in the window, whichever is less.
        done = min(step() - first, batches_added(REGISTRY) - added0)
        phases1 = phase_sums(REGISTRY)
    spent = {k: phases1[k] - phases0.get(k, 0.0) for k in phases1}
    total = sum(spent.values()) or 1.0
    return done * args.batch_size / elapsed, {k: round(v / total, 3) for k, v in sorted(spent.items())}


def batches_added(registry) -> float:
    return registry.get_sample_value("rlhf_trainer_rollout_batches_total") or 0.0


def phase_sums(registry) -> dict[str, float]:
    out = {}
    for phase in ("generation", "scoring", "buffer_wait", "update", "save", "checkpoint"):
        out[phase] = registry.get_sample_value("rlhf_trainer_ppo_phase_duration_seconds_sum", {"phase": phase}) or 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=2, help="the stack's learner steps before the window "
                                                                    "(the first loads the models)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--buffer-url", default="memory://")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of both sides")
    parser.add_argument("--size", default="tiny", help="ModelSize of the policy and reward model (tiny, small, medium)")
    parser.add_argument("--publish-every", type=int, default=None, help="the stack's publish_every (default: "
                                                                        "TrainerConfig's)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="the stack's checkpoint_every")
    parser.add_argument("--max-staleness", type=int, default=None, help="the stack's max_staleness")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ["RLHF_TRAINER_TORCH_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # no out/demo: both sides use the tiny initial models
        core = core_rate(os.path.join(tmp, "core"), args)
        stack, shares = stack_rate(os.path.join(tmp, "stack"), args)
    from rlhf.trainer.config import TrainerConfig

    stack_config = {name: getattr(args, name) if getattr(args, name) is not None else getattr(TrainerConfig, name)
                    for name in ("publish_every", "checkpoint_every", "max_staleness")}
    print(json.dumps({"core_samples_per_s": round(core, 2), "stack_samples_per_s": round(stack, 2),
                      "ratio": round(stack / core, 3), "stack_phase_share": shares,
                      "config": {**vars(args), **stack_config}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
