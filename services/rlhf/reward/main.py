"""``rlhf reward``: the reward scoring service on its own (distributed mode)."""
from __future__ import annotations

import argparse

from rlhf.reward.config import RewardConfig
from rlhf.serving import config as config_mod
from rlhf.serving.entrypoint import serve_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, RewardConfig)


def run(args: argparse.Namespace) -> int:
    def components(config: RewardConfig):
        # Imported after the config is checked: torch and transformers take seconds to import.
        from rlhf.reward.servicer import RewardComponent

        return [RewardComponent(config)]

    return serve_main("reward", RewardConfig, args, components)
