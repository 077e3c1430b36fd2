"""``rlhf policy``: the policy inference service on its own (distributed mode)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging

from rlhf.policy.config import PolicyConfig
from rlhf.serving import config as config_mod
from rlhf.serving.server import ServiceHost


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, PolicyConfig)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(PolicyConfig, args)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"rlhf policy: {exc}") from None
    logging.getLogger(__name__).info("config: %s", json.dumps(config_mod.describe(config)))
    # Imported after the config is checked: torch and transformers take seconds to import.
    from rlhf.policy.servicer import PolicyComponent

    host = ServiceHost(config, [PolicyComponent(config)])
    asyncio.run(host.run_until_signal())
    return 0
