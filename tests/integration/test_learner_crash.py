"""The learner as its own process (`rlhf trainer`, workers apart) on a real Redis rollout buffer, with a real
`rlhf rollout-worker` process and a real reward service: SIGKILLed mid-run and restarted, it resumes from its
checkpoint, and every batch the worker added is used once, dropped as stale, or still in the buffer (counted
against the stream: its idempotency keys)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import redis
import torch

from rlhf.bootstrap import ensure_initial_policy, ensure_initial_reward_model
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving.server import ServiceHost
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from support.hosting import HostThread
from support.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["--ppo-batch-size", "4", "--ppo-mini-batches", "2", "--ppo-epochs", "1", "--ppo-response-length", "6",
       "--max-staleness", "2", "--torch-num-threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_sigkilled_learner_resumes_and_uses_no_batch_twice(tmp_path, redis_url, kafka_bootstrap):
    root = tmp_path / "artifacts"
    policy = ensure_initial_policy(str(root))
    reward_path = ensure_initial_reward_model(str(root))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how do I fix problem number {i}"}) + "\n" for i in range(16)))
    prefix = f"test-lc-{uuid.uuid4().hex[:8]}:"
    buffer_url = f"{redis_url}?key_prefix={prefix}"
    port = free_port()
    log = open(tmp_path / "processes.log", "ab")  # noqa: SIM115
    config = RewardConfig(host="127.0.0.1", port=0, metrics_port=-1, bus_url="memory://", cache_url="memory://",
                          artifact_root=str(root), model_path=reward_path, torch_num_threads=1)

    def trainer() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf", "trainer", "--port", str(port), "--metrics-port", "-1",
             "--bus-url", f"kafka://{kafka_bootstrap}?auto_offset_reset=latest", "--cache-url", "memory://",
             "--buffer-url", buffer_url, "--dataset-path", str(tmp_path / "dataset.sqlite"),
             "--group-id", f"test-lc-{uuid.uuid4().hex[:6]}", "--artifact-root", str(root),
             "--policy-base-path", policy, "--policy-name", f"policy-{prefix[:-1]}", "--auto-start", "true",
             "--local-workers", "0", "--reward-url", f"grpc://{reward.address}", "--min-new-comparisons", "0",
             *RUN], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def step(stub) -> int:
        return stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5).step

    with HostThread(lambda: ServiceHost(config, [RewardComponent(config)])) as reward:
        worker = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "rollout-worker", "--buffer-url", buffer_url,
             "--reward-url", f"grpc://{reward.address}", "--bus-url", "memory://", "--cache-url", "memory://",
             "--prompts-path", str(prompts), "--artifact-root", str(root), "--metrics-port", "-1",
             "--worker-name", "w1", *RUN], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        learner = trainer()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        procs = {"rollout-worker": worker}
        try:
            wait_for(lambda: step(stub) >= 3, timeout=240, what="three learner steps", interval=0.2,
                     processes={**procs, "trainer": learner}, tolerate_rpc_errors=True)
            learner.send_signal(signal.SIGKILL)  # the learner updates back to back: this lands mid-step
            learner.wait(30)
            checkpoint = root / "runs"
            learner = trainer()
            wait_for(lambda: step(stub) >= 7, timeout=240, what="steps after the restart", interval=0.2,
                     processes={**procs, "trainer": learner}, tolerate_rpc_errors=True)
            status = stub.PauseRun(trainer_pb2.PauseRunRequest(), timeout=10)
            time.sleep(1.0)
            status = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
            assert status.state == trainer_pb2.RUN_STATE_PAUSED
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
            learner.send_signal(signal.SIGTERM)
            assert learner.wait(60) == 0
        finally:
            for p in (worker, learner):
                if p.poll() is None:
                    p.kill()
            channel.close()

    # Count against the stream: batches added (idempotency keys) = used + dropped + skipped + still buffered.
    (run_dir,) = list(checkpoint.iterdir())
    state = torch.load(run_dir / "learner.pt", map_location="cpu", weights_only=True)["learner"]
    client = redis.Redis.from_url(redis_url)
    try:
        added = sum(1 for _ in client.scan_iter(f"{prefix}rollouts:seen:*"))
        buffered = client.xlen(f"{prefix}rollouts")
    finally:
        client.close()
    assert state["batches_used"] == len(state["used"]) >= 7, "each used batch once"
    assert added == state["batches_used"] + state["dropped_stale"] + state["skipped"] + buffered, (
        added, state["batches_used"], state["dropped_stale"], state["skipped"], buffered)
