"""``rlhf feedback``: the feedback service on its own (distributed mode)."""
from __future__ import annotations

import argparse

from rlhf.feedback.config import FeedbackConfig
from rlhf.serving import config as config_mod
from rlhf.serving.entrypoint import serve_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, FeedbackConfig)


def run(args: argparse.Namespace) -> int:
    from rlhf.feedback.servicer import FeedbackComponent

    return serve_main("feedback", FeedbackConfig, args, lambda config: [FeedbackComponent(config)])
