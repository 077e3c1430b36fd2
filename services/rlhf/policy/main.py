"""``rlhf policy``: the policy inference service on its own (distributed mode)."""
from __future__ import annotations

import argparse

from rlhf.policy.config import PolicyConfig
from rlhf.serving import config as config_mod
from rlhf.serving.entrypoint import serve_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, PolicyConfig)


def run(args: argparse.Namespace) -> int:
    def components(config: PolicyConfig):
        # Imported after the config is checked: torch and transformers take seconds to import.
        from rlhf.policy.servicer import PolicyComponent

        return [PolicyComponent(config)]

    return serve_main("policy", PolicyConfig, args, components)
