"""`rlhf rollout-worker` as its own process on a real Redis rollout buffer, scoring through a real reward service
over gRPC: it follows the learner's published progress, bounds its lead by max_staleness, and a worker killed with
SIGKILL mid-batch loses none of the batches it had added (counted against the stream)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from rlhf.bootstrap import ensure_initial_policy, ensure_initial_reward_model
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving.server import ServiceHost
from rlhf.trainer.buffer import LearnerProgress, open_buffer
from rlhf.trainer.rollouts import RolloutBatch
from support.hosting import HostThread
from support.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_worker(url: str, reward: str, root, prompts, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf", "rollout-worker", "--buffer-url", url, "--reward-url", f"grpc://{reward}",
         "--bus-url", "memory://", "--cache-url", "memory://", "--prompts-path", str(prompts),
         "--artifact-root", str(root), "--ppo-batch-size", "4", "--ppo-mini-batches", "2",
         "--ppo-response-length", "6", "--max-staleness", "4", "--publish-every", "1", "--metrics-port", "-1",
         "--worker-name", name, "--torch-num-threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_batch_it_added(tmp_path, redis_url):
    root = tmp_path / "artifacts"
    policy = ensure_initial_policy(str(root))
    reward_path = ensure_initial_reward_model(str(root))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how do I fix problem number {i}"}) + "\n" for i in range(12)))
    url = f"{redis_url}?key_prefix=test-rw-{uuid.uuid4().hex[:8]}:"
    buffer = open_buffer(url)
    buffer.publish_progress(LearnerProgress(step=0, version="initial", version_index=0, uri=policy, run_id="run-w",
                                            state="running", saved_at=time.time()))
    config = RewardConfig(host="127.0.0.1", port=0, metrics_port=-1, bus_url="memory://", cache_url="memory://",
                          artifact_root=str(root), model_path=reward_path, torch_num_threads=1)
    with HostThread(lambda: ServiceHost(config, [RewardComponent(config)])) as reward:
        worker = start_worker(url, reward.address, root, prompts, "w1")
        try:
            wait_for(lambda: buffer.depth() >= 2, timeout=120, what="two batches from the worker",
                     processes={"rollout-worker": worker})
            worker.send_signal(signal.SIGKILL)  # mid-batch: it generates the next one as soon as one is added
            worker.wait(30)
            added = buffer.depth()
            first = buffer.read("check", count=100, block_s=0.1)
            assert len(first) == added >= 2
            batches = [RolloutBatch.from_bytes(e.payload) for e in first]
            assert all(b.run_id == "run-w" and b.policy_version == "initial" and len(b) == 4 for b in batches)
            assert all(b.reward_model_version for b in batches), "scored by the reward service"

            # A restarted worker goes on; the lead stays bounded: step 0 + depth <= max_staleness (4) + 1 batches.
            worker = start_worker(url, reward.address, root, prompts, "w1")
            wait_for(lambda: buffer.depth() >= 5, timeout=120, what="the restarted worker's batches",
                     processes={"rollout-worker": worker})
            time.sleep(2.0)
            assert buffer.depth() == 5, "the worker generates no batch the learner would drop as stale"
            rest = buffer.read("check", count=100, block_s=0.1)
            ids = [e.batch_id for e in first + rest]
            assert len(ids) == len(set(ids)) == 5
            assert buffer.read("check", count=100, block_s=0.0, pending=True)[0].entry_id == first[0].entry_id
            buffer.ack([e.entry_id for e in first + rest])
            assert buffer.depth() == 0

            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            out = worker.stdout.read() if worker.stdout else ""
            buffer.close()
    assert "rollout-worker w1" in out
