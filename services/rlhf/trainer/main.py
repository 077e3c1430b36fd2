"""``rlhf trainer``: the trainer service on its own (distributed mode)."""
from __future__ import annotations

import argparse

from rlhf.serving import config as config_mod
from rlhf.serving.entrypoint import serve_main
from rlhf.trainer.config import TrainerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, TrainerConfig)


def run(args: argparse.Namespace) -> int:
    def components(config: TrainerConfig):
        from rlhf.trainer.servicer import TrainerComponent

        return [TrainerComponent(config)]

    return serve_main("trainer", TrainerConfig, args, components)
