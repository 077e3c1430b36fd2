"""``rlhf feedback``: the feedback service on its own (distributed mode)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging

from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.servicer import FeedbackComponent
from rlhf.serving import config as config_mod
from rlhf.serving.server import ServiceHost


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, FeedbackConfig)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(FeedbackConfig, args)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"rlhf feedback: {exc}") from None
    logging.getLogger(__name__).info("config: %s", json.dumps(config_mod.describe(config)))
    host = ServiceHost(config, [FeedbackComponent(config)])
    asyncio.run(host.run_until_signal())
    return 0
