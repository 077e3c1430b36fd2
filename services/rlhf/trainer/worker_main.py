"""``rlhf rollout-worker``: one rollout worker as its own process (distributed mode; they scale out).

It follows the learner through the rollout buffer (a Redis stream; ``buffer_url`` or the cache's Redis), draws
prompts from rlhf.prompts.v1, served traffic and ``prompts_path``, scores through the reward service at
``reward_url`` and exposes its metrics on ``metrics_port``. The run's rollout settings (``ppo_batch_size``,
``ppo_response_length``, ``max_staleness``, ...) are the trainer's fields: set them once as ``RLHF_<FIELD>`` for
both. SIGTERM finishes the batch in progress and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import socket
import threading
import typing
import zlib

from rlhf.serving import config as config_mod
from rlhf.serving.config import _check, field
from rlhf.trainer.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RolloutWorkerConfig(TrainerConfig):
    env_prefix: typing.ClassVar[str] = "RLHF_ROLLOUT_WORKER_"

    metrics_port: int = field(9106, "Port of /metrics (also the liveness probe); 0 picks a free one; -1 disables it.")
    worker_name: str = field("", "This worker's name in the buffer and its logs; empty = the host name.")
    worker_index: int = field(-1, "Offsets this worker's sampling seeds (seed + index); -1 = a hash of its name.")
    device: str = field("auto", "Where the worker generates: cpu, cuda, cuda:N, or auto (cuda when available).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(not self.rollout_buffer_url.startswith("memory:"), "buffer_url",
               "must be a Redis (redis://host:port/db): an in-process buffer cannot reach the learner")
        _check(bool(self.reward_url), "reward_url", "is required: grpc://HOST:PORT of the reward service")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               "must be cpu, cuda, cuda:N or auto")

    @property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def name(self) -> str:
        return self.worker_name or socket.gethostname()

    @property
    def index(self) -> int:
        return self.worker_index if self.worker_index >= 0 else zlib.crc32(self.name.encode()) % 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser, RolloutWorkerConfig)


def load_prompt_file(path: str):
    from rlhf.trainer.rollouts import PoolPrompt, prompt_id_of

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise SystemExit(f"rlhf rollout-worker: {path}:{n}: expected a JSON object with a \"prompt\" string")
            out.append(PoolPrompt(prompt_id_of(text), text, "dataset"))
    return out


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()  # first: a SIGTERM while the worker starts stops it cleanly too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(RolloutWorkerConfig, args)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"rlhf rollout-worker: {exc}") from None
    if config.torch_num_threads:
        import torch

        torch.set_num_threads(config.torch_num_threads)
    from prometheus_client import start_http_server

    from rlhf.bus import bus_from_url
    from rlhf.train.reward_client import RewardClient
    from rlhf.trainer import metrics
    from rlhf.trainer.buffer import open_buffer
    from rlhf.trainer.ppo_run import worker_settings
    from rlhf.trainer.prompt_feed import PromptFeed
    from rlhf.trainer.rollouts import PromptPool
    from rlhf.trainer.worker import PolicyHolder, RolloutWorker, ScoredBatch

    pool = PromptPool(seed=config.ppo_seed + config.index, served_share=config.served_share)
    if config.prompts_path:
        pool.add(load_prompt_file(config.prompts_path))
    bus = bus_from_url(config.bus_url)
    feed = PromptFeed(bus, pool, exclude_products=config.excluded_products, group_prefix=f"rlhf-rollouts.{config.name}")
    feed.start()
    buffer = open_buffer(config.rollout_buffer_url)
    token = (config.admin_token or config.auth_token).split(",")[0].strip()
    client = RewardClient("grpc://" + config.reward_url.removeprefix("grpc://"), token=token)

    def score(prompts, responses) -> ScoredBatch:
        return ScoredBatch(client(list(prompts), list(responses)), client.last_version)

    def on_batch(batch, timings) -> None:
        metrics.ROLLOUT_BATCHES.inc()
        for phase in ("generation", "scoring"):
            metrics.PPO_PHASE_SECONDS.labels(phase).observe(timings[f"{phase}_s"])
        # (weight sync is measured by the learner, from the batch's creation time: one series for every worker)

    worker = RolloutWorker(worker_settings(config, config.index, config.name), buffer, pool, score,
                           holder=PolicyHolder(device=config.torch_device), on_batch=on_batch)
    if config.metrics_port >= 0:
        start_http_server(config.metrics_port, addr=config.host)
    print(f"rlhf rollout-worker {config.name} on {config.torch_device}: buffer {config.rollout_buffer_url.split('@')[-1]}, reward "
          f"{config.reward_url}, {sum(pool.sizes().values())} prompts from {config.prompts_path or 'the topics'}",
          flush=True)
    worker.run(stop)
    feed.stop()
    client.close()
    buffer.close()
    bus.close(config.shutdown_grace_s)
    log.info("rollout worker %s stopped after %d batches", config.name, worker.batches_added)
    return 0
