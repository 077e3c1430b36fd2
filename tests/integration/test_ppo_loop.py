"""The continuous PPO loop of `rlhf up` in one process over a real gRPC socket: the trainer starts a run from the
served policy, a rollout worker scores rollouts through the reward service over gRPC, the learner saves versions,
the canary controller takes one to traffic on the policy service and decides; PauseRun stops the learner."""
from __future__ import annotations

import threading

import grpc
import pytest
from prometheus_client import REGISTRY
from rlhf.embedded import EmbeddedConfig, build_components
from rlhf.serving.server import ServiceHost
from rlhf.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from support.hosting import HostThread
from support.waiting import wait_for

SETTINGS = {
    "RLHF_TRAINER_PPO_BATCH_SIZE": "4", "RLHF_TRAINER_PPO_MINI_BATCHES": "2", "RLHF_TRAINER_PPO_EPOCHS": "1",
    "RLHF_TRAINER_PPO_RESPONSE_LENGTH": "8", "RLHF_TRAINER_PROMOTE_AFTER": "4", "RLHF_TRAINER_CANARY_PERCENT": "50",
    "RLHF_TRAINER_HOUSEKEEPING_S": "0.3", "RLHF_TRAINER_KL_BUDGET": "0", "RLHF_TRAINER_PPO_LEARNING_RATE": "1e-4",
    "RLHF_TRAINER_MIN_NEW_COMPARISONS": "0", "RLHF_TRAINER_TORCH_NUM_THREADS": "1",
}


@pytest.fixture
def platform(tmp_path, monkeypatch):
    for key, value in SETTINGS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no out/demo here: the tiny initial models are served
    config = EmbeddedConfig(port=0, metrics_port=-1, artifact_root=str(tmp_path / "artifacts"))
    components, _, _ = build_components(config)
    with HostThread(lambda: ServiceHost(config, components)) as host:
        yield host


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.slow
def test_the_embedded_loop_trains_publishes_a_canary_and_decides(platform):
    channel = platform.channel()
    trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    steps_before = sample("rlhf_trainer_ppo_steps_total")
    stop = threading.Event()
    failures: list[grpc.RpcError] = []

    def traffic() -> None:  # a product: served traffic for the canary (and prompts for the workers)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                policy.Generate(policy_pb2.GenerateRequest(prompt="how do I water a plant", routing_key=f"user-{n}",
                                                           product="test"), timeout=60)
            except grpc.RpcError as e:
                failures.append(e)

    wait_for(lambda: any(p.role == policy_pb2.POLICY_ROLE_STABLE
                         for p in policy.GetPolicy(policy_pb2.GetPolicyRequest()).policies),
             timeout=120, what="the policy service serving", interval=0.2)
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        status = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest())).step >= 3
                          and s.policy_version.startswith(s.run_id) and s,
                          timeout=240, what="three PPO steps and a saved version (publish_every)", interval=0.5)
        assert status.state == trainer_pb2.RUN_STATE_RUNNING and status.stage == trainer_pb2.STAGE_PPO
        assert status.run_id and status.policy_version.startswith(status.run_id)
        for name in ("kl", "score", "rlhf_reward", "entropy", "clipfrac", "approx_kl", "policy_loss"):
            assert name in status.metrics, name

        def decided():
            versions = trainer.ListVersions(trainer_pb2.ListVersionsRequest(kind=common_pb2.MODEL_KIND_POLICY))
            done = [v for v in versions.versions if v.labels["status"] in ("stable", "rolled_back")
                    and v.labels.get("run_id")]
            return done[0] if done else None

        version = wait_for(decided, timeout=240, what="a canary decision", interval=0.5)
        assert version.parent_version and version.uri and version.labels["learner_step"]
        served = policy.GetPolicy(policy_pb2.GetPolicyRequest())
        stable = [p.version.version for p in served.policies if p.role == policy_pb2.POLICY_ROLE_STABLE]
        if version.labels["status"] == "stable":
            assert stable == [version.version]
        else:
            assert version.version not in stable
        outcome = "promoted" if version.labels["status"] == "stable" else "rolled_back"
        assert sample("rlhf_trainer_canary_decisions_total", outcome=outcome) >= 1
        # weight sync: each saved version's first batch, measured by the learner (GetStatus and the histogram)
        sync = trainer.GetStatus(trainer_pb2.GetStatusRequest()).weight_sync
        assert sync.count >= 1 and 0 <= sync.p50_seconds <= sync.p95_seconds <= sync.max_seconds < 120, sync
        assert sample("rlhf_trainer_weight_sync_seconds_count") >= sync.count
    finally:
        stop.set()
        thread.join(60)
    assert not failures, f"{len(failures)} Generate calls failed during the canary: {failures[0]}"
    assert sample("rlhf_trainer_ppo_steps_total") - steps_before >= 3
    assert sample("rlhf_trainer_ppo_phase_duration_seconds_count", phase="update") >= 3

    # PauseRun stops the learner; ResumeRun lets it go on.
    paused = trainer.PauseRun(trainer_pb2.PauseRunRequest())
    assert paused.state == trainer_pb2.RUN_STATE_PAUSED
    at = trainer.GetStatus(trainer_pb2.GetStatusRequest()).step
    threading.Event().wait(2.0)
    assert trainer.GetStatus(trainer_pb2.GetStatusRequest()).step <= at + 1  # at most the step in flight
    trainer.ResumeRun(trainer_pb2.ResumeRunRequest())
    wait_for(lambda: trainer.GetStatus(trainer_pb2.GetStatusRequest()).step >= at + 2, timeout=120,
             what="steps after ResumeRun", interval=0.5)
    with pytest.raises(grpc.RpcError) as err:
        trainer.StartRun(trainer_pb2.StartRunRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
def test_a_kl_blow_up_pauses_the_run_with_the_reason(tmp_path, monkeypatch):
    # A budget no update can keep: the first steps' KL is above it, so the guard pauses the run by itself.
    monkeypatch.setenv("RLHF_TRAINER_KL_BUDGET", "1e-9")
    monkeypatch.setenv("RLHF_TRAINER_KL_PATIENCE", "2")
    monkeypatch.setenv("RLHF_TRAINER_PPO_LEARNING_RATE", "1e-2")
    for key, value in SETTINGS.items():
        if key != "RLHF_TRAINER_KL_BUDGET":
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    trips_before = sample("rlhf_trainer_ppo_guard_trips_total", guard="kl_budget")
    config = EmbeddedConfig(port=0, metrics_port=-1, artifact_root=str(tmp_path / "artifacts"))
    components, _, _ = build_components(config)
    with HostThread(lambda: ServiceHost(config, components)) as host:
        trainer = trainer_pb2_grpc.TrainerServiceStub(host.channel())
        status = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest())).state
                          == trainer_pb2.RUN_STATE_PAUSED and s, timeout=240, what="the guard pausing the run",
                          interval=0.5)
        assert "KL" in status.message and "budget" in status.message, status.message
        assert status.metrics["paused_by_guard"] == 1.0 and status.step >= 2
        assert sample("rlhf_trainer_ppo_guard_trips_total", guard="kl_budget") == trips_before + 1
        assert sample("rlhf_trainer_ppo_guard_paused", guard="kl_budget") == 1.0
        threading.Event().wait(1.5)
        assert trainer.GetStatus(trainer_pb2.GetStatusRequest()).step == status.step  # the learner stays paused
        resumed = trainer.ResumeRun(trainer_pb2.ResumeRunRequest())
        assert resumed.state == trainer_pb2.RUN_STATE_RUNNING
        assert sample("rlhf_trainer_ppo_guard_paused", guard="kl_budget") == 0.0
