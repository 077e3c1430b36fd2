"""A PPO run (learner and a rollout worker, `PPORun`) on a real Redis rollout buffer that goes down for a while: both
wait and retry (the run says why), nothing crashes, and once Redis is back they go on; every batch added is used once,
dropped, skipped or still buffered (counted against the stream). Redis runs with an append-only file here, as a
production Redis holding acknowledged batches would."""
from __future__ import annotations

import time
import uuid

import pytest
import redis
import torch

from rlhf.core.models import Manifest, save_artifact
from rlhf.trainer.buffer import open_buffer
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.ppo_run import RUNNING, PPORun, RunSpec
from rlhf.trainer.rollouts import PoolPrompt, PromptPool, prompt_id_of
from rlhf.trainer.worker import ScoredBatch
from support.private_redis import PrivateRedis
from support.waiting import wait_for
from unit.core.ppo_testing import PROMPTS, tiny_gpt2, tiny_tokenizer


def yes_fraction(prompts, responses) -> ScoredBatch:
    return ScoredBatch(torch.tensor([r.split().count("yes") / max(1, len(r.split())) for r in responses]), "rm-test")


@pytest.mark.slow
def test_the_run_waits_out_a_redis_outage_and_loses_no_batch(tmp_path, redis_url):  # redis_url: redis-server installed
    server = PrivateRedis(tmp_path, durable=True)
    server.start()
    root = tmp_path / "artifacts"
    save_artifact(str(root / "policy" / "parent"), tiny_gpt2(seed=0), tiny_tokenizer(),
                  Manifest(kind="policy", version="parent"))
    config = TrainerConfig(artifact_root=str(root), bus_url="memory://", cache_url="memory://",
                           dataset_path=str(tmp_path / "d.sqlite"), ppo_batch_size=4, ppo_mini_batches=2,
                           ppo_epochs=1, ppo_response_length=6, max_staleness=1, kl_budget=0, local_workers=1)
    prefix = f"outage-{uuid.uuid4().hex[:6]}:"
    buffer = open_buffer(f"{server.url}?key_prefix={prefix}")
    pool = PromptPool(seed=0, served_share=0.0)
    pool.add(PoolPrompt(prompt_id_of(p), p, "dataset") for p in PROMPTS)
    run = PPORun(config, RunSpec("run-o", "parent", "policy/parent", 0), buffer, pool=pool,
                 scorer_factory=lambda: yes_fraction, on_saved=lambda saved: None)
    run.start(RUNNING)
    try:
        wait_for(lambda: run.learner.step_count >= 2, timeout=120, what="two steps before the outage")
        server.stop()
        wait_for(lambda: "unavailable" in run.message, timeout=30, what="the learner saying Redis is down")
        wait_for(lambda: any("unavailable" in w.last_error for w in run.workers), timeout=30,
                 what="the worker saying Redis is down")
        assert run.state == RUNNING, "an outage pauses nothing and fails nothing"
        assert all(t.is_alive() for t in run._threads)
        at = run.learner.step_count
        server.start()
        wait_for(lambda: run.learner.step_count >= at + 3, timeout=120, what="steps after Redis came back")
        assert run.message == ""
    finally:
        run.stop()
        server.stop()
    server.start()
    try:
        client = redis.Redis(port=server.port)
        added = sum(1 for _ in client.scan_iter(f"{prefix}rollouts:seen:*"))
        buffered = client.xlen(f"{prefix}rollouts")
        client.close()
    finally:
        server.stop()
    learner = run.learner
    assert learner.batches_used == len(learner.used) >= 5
    assert added == learner.batches_used + learner.dropped_stale + learner.skipped + buffered
