"""What every ``rlhf <service>`` command does: read its config in one place, log it, serve until SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from rlhf.serving import config as config_mod
from rlhf.serving.config import ServerConfig
from rlhf.serving.server import Component, ServiceHost

C = TypeVar("C", bound=ServerConfig)


def serve_main(command: str, config_cls: type[C], args: argparse.Namespace,
               components: Callable[[C], Sequence[Component]]) -> int:
    """Load ``config_cls`` from ``args`` and the environment (a bad value exits with a message naming the flag),
    build the components (heavy imports belong in ``components``, after the config is known to be good), and run
    them on a :class:`ServiceHost` until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(config_cls, args)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"rlhf {command}: {exc}") from None
    logging.getLogger(f"rlhf.{command}").info("config: %s", json.dumps(config_mod.describe(config)))
    host = ServiceHost(config, list(components(config)))
    asyncio.run(host.run_until_signal())
    return 0
