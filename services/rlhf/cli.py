"""The ``rlhf`` command. Each subcommand lives in its own module, imported only when it runs.

    rlhf up          every service embedded in one process (in-process bus and cache, torch backend)
    rlhf demo        the three RLHF stages on the built-in task, from nothing, on the CPU
    rlhf feedback    the feedback service alone (distributed mode: Kafka and Redis)
    rlhf policy      the policy inference service alone
    rlhf reward      the reward scoring service alone
    rlhf trainer     the trainer service alone
    rlhf rollout-worker  a PPO rollout worker alone (distributed mode)
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). The module has ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("rlhf.embedded", "run every service in one process (embedded mode)"),
    "demo": ("rlhf.sim.demo", "run SFT, reward model and PPO on the built-in task and report the result"),
    "feedback": ("rlhf.feedback.main", "run the feedback service"),
    "policy": ("rlhf.policy.main", "run the policy inference service"),
    "reward": ("rlhf.reward.main", "run the reward scoring service"),
    "trainer": ("rlhf.trainer.main", "run the trainer service (feedback -> dataset -> reward models -> PPO)"),
    "rollout-worker": ("rlhf.trainer.worker_main", "run a PPO rollout worker (distributed mode; they scale out)"),
    "sft": ("rlhf.train.sft", "fine-tune a causal LM on demonstrations (JSONL); torchrun for many processes"),
    "rm": ("rlhf.train.rm", "train a reward model on preference pairs or rankings (JSONL)"),
    "ppo": ("rlhf.train.ppo", "optimise a policy with PPO against a reward model (a folder or grpc://HOST:PORT)"),
    "simulate": ("rlhf.sim.simulate", "play simulated users and annotators against a running platform and report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF platform.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily so that `rlhf --help` imports nothing heavy.
        if len(sys.argv) > 1 and sys.argv[1] == name:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
