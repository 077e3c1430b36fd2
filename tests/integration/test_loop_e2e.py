"""The loop of trainer part 1, end to end, each service in its own process on a real Kafka and Redis:
a product (this test) asks the policy service for answers, simulated annotators rank them, the feedback service
takes the rankings, the trainer turns them into a reward model and publishes it, and the reward service serves it.
Then part 2 (PPO versions served, promoted, better held-out gold) and its canary test (a version with noised weights
rolled back while stable answers every request).
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core.models import Manifest, build_causal_lm, save_artifact
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.sim import AnnotatorPool, make_demonstrations, pretraining_texts, split_prompts, world_texts
from rlhf.v1 import (
    common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc, trainer_pb2,
    trainer_pb2_grpc,
)
from support import waiting

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANKINGS = 120
K = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> Path:
    """A tiny policy that has learned the built-in task a little (seconds of pretraining and SFT), so that its
    samples differ in quality and rankings of them carry a signal."""
    from rlhf.core.sft import SFTConfig, pretrain, train_sft

    root = tmp_path_factory.mktemp("loop")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
        model = build_causal_lm(tokenizer, "tiny", seed=0)
        pretrain(model, tokenizer, pretraining_texts(500, seed=1),
                 SFTConfig(num_steps=100, learning_rate=3e-3, batch_size=16), progress=False)
        train_prompts, _ = split_prompts(0.2, seed=0)
        train_sft(model, tokenizer, make_demonstrations(train_prompts, 800, seed=2),
                  SFTConfig(num_steps=200, learning_rate=3e-3, batch_size=16), progress=False)
    finally:
        torch.set_num_threads(before)
    save_artifact(str(root / "sft"), model, tokenizer, Manifest(kind="sft", version="sft-e2e"))
    return root / "sft"


@contextlib.contextmanager
def processes(commands: dict[str, list[str]], logs: Path):
    procs = {}
    try:
        for name, args in commands.items():
            procs[name] = subprocess.Popen([sys.executable, "-m", "rlhf", *args],
                                           stdout=open(logs / f"{name}.log", "wb"),  # noqa: SIM115
                                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for name, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(predicate, timeout: float, what: str, procs=None):
    return waiting.wait_for(predicate, timeout, what, interval=0.3, processes=procs, tolerate_rpc_errors=True)


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_until_joined(channels: dict[str, grpc.Channel], procs) -> trainer_pb2_grpc.TrainerServiceStub:
    """Policy and feedback serving, and the trainer in its group (its lag covers both topics); the trainer's stub."""
    wait_for(lambda: serving(channels["policy"]) and serving(channels["feedback"]), 120, "policy and feedback", procs)
    trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
    wait_for(lambda: {lag.topic for lag in trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=2).lag}
             == {"rlhf.feedback.v1", "rlhf.responses.v1"}, 120, "the trainer joined", procs)
    return trainer


def test_served_responses_ranked_through_the_feedback_service_become_a_served_reward_model(
        tmp_path, sft_policy, kafka_bootstrap, redis_url):
    run = uuid.uuid4().hex[:8]
    root = sft_policy.parent
    ports = {name: free_port() for name in ("policy", "feedback", "reward", "trainer")}
    bus, cache = f"kafka://{kafka_bootstrap}", redis_url
    common = ["--metrics-port", "-1", "--health-interval-s", "0.5", "--cache-url", cache]
    reward_name = f"reward-e2e-{run}"
    dataset = tmp_path / "trainer" / "dataset.sqlite"
    commands = {
        "policy": ["policy", "--port", str(ports["policy"]), *common, "--bus-url", bus, "--model-path", str(sft_policy),
                   "--follow-model-events", "false", "--torch-num-threads", "1", "--default-max-new-tokens", "48",
                   "--model-name", f"policy-e2e-{run}"],
        "feedback": ["feedback", "--port", str(ports["feedback"]), *common, "--bus-url", bus],
        "reward": ["reward", "--port", str(ports["reward"]), *common, "--bus-url", bus, "--artifact-root", str(root),
                   "--model-name", reward_name, "--torch-num-threads", "1"],
        # The topics are shared with other tests: this trainer reads only what arrives after it joined.
        "trainer": ["trainer", "--port", str(ports["trainer"]), *common, "--bus-url", f"{bus}?auto_offset_reset=latest",
                    "--dataset-path", str(dataset), "--group-id", f"trainer-e2e-{run}", "--artifact-root", str(root),
                    "--reward-model-name", reward_name, "--reward-base-path", str(sft_policy),
                    "--min-new-comparisons", str(RANKINGS - 10), "--heldout-share", "0.25", "--min-heldout", "5",
                    "--rm-epochs", "3", "--rm-batch-size", "8", "--rm-learning-rate", "1e-3",
                    "--torch-num-threads", "1", "--housekeeping-s", "0.5"],
    }
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    with processes(commands, tmp_path) as procs:
        # 1. everyone up; the trainer has joined its group (its lag covers both topics)
        trainer = wait_until_joined(channels, procs)
        # 2. the product: K answers per prompt from the policy service, ranked by a simulated annotator
        policy = policy_pb2_grpc.PolicyServiceStub(channels["policy"])
        prompts, _ = split_prompts(0.2, seed=0)
        rng = random.Random(5)
        pool = AnnotatorPool()
        events = []
        for i in range(RANKINGS):
            prompt = prompts[rng.randrange(len(prompts))]
            reply = policy.Generate(policy_pb2.GenerateRequest(
                prompt=prompt.text, num_samples=K, sampling=common_pb2.SamplingParams(temperature=1.0, seed=i),
                product="e2e"), timeout=60)
            ids, texts = [s.response_id for s in reply.samples], [s.text for s in reply.samples]
            order = pool.annotate(prompt, texts, rng).ranking
            event = feedback_pb2.FeedbackEvent(event_id=f"e2e-{run}-{i}", product="e2e", annotator_id="sim",
                                               ranking=feedback_pb2.Ranking(response_ids=[ids[j] for j in order]))
            event.created_at.GetCurrentTime()
            events.append(event)
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channels["feedback"])
        acks = [a for r in feedback.SubmitStream(iter([feedback_pb2.SubmitStreamRequest(events=events[j:j + 40])
                                                        for j in range(0, len(events), 40)]), timeout=120)
                for a in r.acks]
        assert len(acks) == RANKINGS and {a.status for a in acks} == {feedback_pb2.SUBMIT_STATUS_ACCEPTED}
        assert not [a for a in acks if a.unknown_response_ids]  # the policy recorded what it served
        # 3. the trainer trains a reward model by itself and publishes it; the reward service serves it
        published = wait_for(lambda: [v for v in trainer.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=5)
                                      .versions if v.labels["status"] == "published"], 400, "a published version",
                             procs)[0]
        reward = reward_pb2_grpc.RewardServiceStub(channels["reward"])
        wait_for(lambda: reward.GetRewardModel(reward_pb2.GetRewardModelRequest(), timeout=5).version.version
                 == published.version, 120, "the reward service serving it", procs)
        scored = reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
            prompt=prompts[0].text, response="I cannot help with that.")]), timeout=30)
        assert scored.reward_model_version == published.version
        for channel in channels.values():
            channel.close()
    # 4. its held-out accuracy is above chance and within 10 points of the core's reward trainer (what the demo runs)
    #    trained in this process on the same comparisons with the same settings
    accuracy = float(published.labels["heldout_accuracy"])
    direct = direct_accuracy(dataset, sft_policy, int(published.labels["comparisons"]))
    assert accuracy > 0.5, accuracy
    assert abs(accuracy - direct) <= 0.10, (accuracy, direct)


def direct_accuracy(dataset_path: Path, base: Path, comparisons: int) -> float:
    """The held-out accuracy of a reward model trained with rlhf.core directly on the dataset's first
    ``comparisons`` comparisons (the trainer's train/held-out split), from the same base, with the same settings."""
    from rlhf.core.models import build_reward_model, load_causal_lm
    from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig
    from rlhf.trainer.dataset import Dataset
    from rlhf.trainer.reward import as_ranking, heldout_accuracy

    stored = Dataset(str(dataset_path)).comparisons()[:comparisons]
    train = [as_ranking(s) for s in stored if not s.heldout]
    held = [as_ranking(s) for s in stored if s.heldout]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone, tokenizer = load_causal_lm(str(base))
        model = build_reward_model(backbone, tokenizer, max_length=256, seed=0)
        RewardTrainer(model, RewardTrainingConfig(learning_rate=1e-3, num_epochs=3, batch_size=8, seed=0)).train(
            train, progress=False)
        return heldout_accuracy(model, held)
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(900)  # a 4-minute simulation (plus the SFT fixture when run alone)
def test_simulated_feedback_becomes_a_reward_model_and_ppo_versions_that_are_served_and_promoted(
        tmp_path, sft_policy, kafka_bootstrap, redis_url):
    """Trainer part 2 end to end, each service its own process (policy, feedback, reward, trainer, a rollout worker)
    and `rlhf simulate` as the product: its feedback trains a reward model (part 1), the reward service serves it,
    the worker's rollouts are scored by it through the Redis buffer, the learner publishes versions, the canary
    controller promotes one, and held-out gold of served responses rises."""
    import json

    from rlhf.sim.world import split_prompts as world_prompts
    from rlhf.trainer.dataset import Dataset

    run = uuid.uuid4().hex[:8]
    root = tmp_path / "artifacts"
    root.mkdir()
    ports = {name: free_port() for name in ("policy", "feedback", "reward", "trainer")}
    bus, cache = f"kafka://{kafka_bootstrap}", redis_url
    common = ["--metrics-port", "-1", "--health-interval-s", "0.5", "--cache-url", cache]
    policy_name, reward_name = f"policy-ppo-e2e-{run}", f"reward-ppo-e2e-{run}"
    dataset = tmp_path / "trainer" / "dataset.sqlite"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in world_prompts(0.2, seed=0)[0]))
    rl = ["--buffer-url", f"{redis_url}?key_prefix=ppo-e2e-{run}:", "--reward-url", f"127.0.0.1:{ports['reward']}",
          "--policy-name", policy_name, "--artifact-root", str(root), "--torch-num-threads", "1",
          "--ppo-batch-size", "16", "--ppo-response-length", "16", "--ppo-learning-rate", "1e-4", "--ppo-kl-coef", "0.1",
          "--publish-every", "4", "--max-staleness", "2", "--prompts-path", str(prompts), "--served-share", "0"]
    commands = {
        "policy": ["policy", "--port", str(ports["policy"]), *common, "--bus-url", bus, "--model-path", str(sft_policy),
                   "--artifact-root", str(root), "--model-name", policy_name, "--torch-num-threads", "1"],
        "feedback": ["feedback", "--port", str(ports["feedback"]), *common, "--bus-url", bus],
        "reward": ["reward", "--port", str(ports["reward"]), *common, "--bus-url", bus, "--artifact-root", str(root),
                   "--model-name", reward_name, "--torch-num-threads", "1"],
        "trainer": ["trainer", "--port", str(ports["trainer"]), *common, "--bus-url", f"{bus}?auto_offset_reset=latest",
                    "--dataset-path", str(dataset), "--group-id", f"trainer-ppo-e2e-{run}",
                    "--reward-model-name", reward_name, "--reward-base-path", str(sft_policy),
                    "--min-new-comparisons", "60", "--heldout-share", "0.25", "--min-heldout", "5", "--rm-epochs", "2",
                    "--rm-batch-size", "8", "--rm-learning-rate", "1e-3", "--housekeeping-s", "0.5",
                    "--policy-base-path", str(sft_policy), "--auto-start", "true", "--local-workers", "0",
                    "--canary-percent", "50", "--promote-after", "15", *rl],
        "worker": ["rollout-worker", "--bus-url", bus, *rl],
    }
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    out = tmp_path / "sim"
    with processes(commands, tmp_path) as procs:
        # (the reward service has no model until part 1 publishes one: it answers NOT_SERVING until then)
        wait_until_joined(channels, procs)
        targets = ["--target", f"127.0.0.1:{ports['policy']}", "--feedback-target", f"127.0.0.1:{ports['feedback']}",
                   "--reward-target", f"127.0.0.1:{ports['reward']}", "--trainer-target", f"127.0.0.1:{ports['trainer']}"]
        sim = subprocess.run([sys.executable, "-m", "rlhf", "simulate", *targets, "--minutes", "4", "--window-s", "20",
                              "--report-every", "20", "--max-new-tokens", "16", "--head-to-head", "2", "--seed", "3",
                              "--out", str(out)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        (tmp_path / "simulate.log").write_text(sim.stdout + sim.stderr)
        assert sim.returncode == 0, sim.stdout + sim.stderr
        for channel in channels.values():
            channel.close()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    summary = json.loads((out / "simulate.json").read_text())["summary"]
    versions = Dataset(str(dataset)).versions(kind="policy", limit=10_000)
    rewards = Dataset(str(dataset)).versions(kind="reward", limit=100)
    # 1. part 1 trained a reward model on the simulated feedback and the rollouts were scored with it
    assert any(r["status"] == "published" for r in rewards), logs
    ppo = [v for v in versions if v.get("run_id")]
    assert len(ppo) >= 2 and all(v.get("reward_model_version", "").startswith(reward_name) for v in ppo), logs
    # 2. one was promoted: served as stable (the parent's traffic went to it)
    promoted = [v for v in ppo if v["status"] == "stable" or v.get("was_stable")]
    assert promoted, [(v["version"], v["status"]) for v in versions]
    assert set(summary["versions_seen"]) & {v["version"] for v in promoted}, summary["versions_seen"]
    # 3. held-out gold of served responses: last window above the first, and the end's stable wins the head-to-head
    first, last = summary["first_window_gold_held_out"], summary["last_window_gold_held_out"]
    assert last > first, (first, last, sim.stdout)
    assert summary["head_to_head"]["win_rate"] > 0.5, (summary["head_to_head"], sim.stdout)
    # 4. freshness (feedback -> the first served version whose reward model it trained) and weight sync, reported
    latency = summary["trainer_latency"]
    for name in ("freshness", "weight_sync"):
        assert latency[name]["count"] >= 1 and 0 <= latency[name]["p50_s"] <= latency[name]["p95_s"], latency
    assert latency["freshness"]["p95_s"] < 240 + 60, latency  # within the run (4 minutes)


def add_noise(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Every weight tensor of ``model`` plus Gaussian noise of ``scale`` times its own std, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.float().std().clamp_min(1e-3) * scale)
    return model


def reward_model_of_rankings(sft: Path, out: Path, version: str, rankings: int = 120) -> None:
    """A reward model trained (rlhf.core) on simulated annotators' rankings of K answers per prompt: K-1 samples of
    the SFT policy and one of an earlier broken version (the SFT policy with noise of another seed than the canary's),
    as a product that once served a broken model would have collected."""
    from rlhf.core.models import build_reward_model, load_causal_lm
    from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig
    from rlhf.sim.demo import DemoConfig, sample_responses

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_causal_lm(str(sft))
        broken = add_noise(load_causal_lm(str(sft))[0], seed=99)
        prompts, _ = split_prompts(0.2, seed=0)
        rng, pool, config = random.Random(11), AnnotatorPool(), DemoConfig()
        data = []
        for i in range(rankings):
            prompt = prompts[rng.randrange(len(prompts))]
            texts = sample_responses(model, tokenizer, [prompt] * (K - 1), config, seed=1000 + K * i).responses
            texts += sample_responses(broken, tokenizer, [prompt], config, seed=1000 + K * i + K - 1).responses
            data.append(pool.annotate(prompt, texts, rng))
        reward = build_reward_model(model, tokenizer, max_length=256, seed=0)
        RewardTrainer(reward, RewardTrainingConfig(learning_rate=1e-3, num_epochs=3, batch_size=8, seed=0)).train(
            data, progress=False)
    finally:
        torch.set_num_threads(before)
    save_artifact(str(out), reward, tokenizer, Manifest(kind="reward", version=version, parent="sft-e2e"))


@pytest.mark.timeout(600)
def test_a_canary_with_noised_weights_is_rolled_back_and_stable_serves_every_request(
        tmp_path, sft_policy, kafka_bootstrap, redis_url):
    """Issue #10's canary test: a version whose weights are noised arrives as the learner would save it; the trainer
    makes it the canary (PROMOTED 50% on rlhf.models.v1), the policy service (its own process) loads it and splits
    traffic, the served responses come back over rlhf.responses.v1, the reward service (its own process) scores both
    versions' responses, and the canary is rolled back automatically. A product calls Generate throughout: no call
    fails, the canary served some of them, and after the rollback only stable answers."""
    import threading

    from rlhf.trainer.config import TrainerConfig
    from rlhf.trainer.servicer import TrainerComponent
    from rlhf.serving.server import ServiceHost
    from support.hosting import HostThread

    run = uuid.uuid4().hex[:8]
    root = tmp_path / "artifacts"
    policy_name, reward_name = f"policy-canary-{run}", f"reward-canary-{run}"
    reward_model_of_rankings(sft_policy, root / "reward" / "rm-canary", f"{reward_name}-1")
    ports = {name: free_port() for name in ("policy", "reward")}
    bus = f"kafka://{kafka_bootstrap}"
    common = ["--metrics-port", "-1", "--health-interval-s", "0.5", "--cache-url", redis_url, "--bus-url", bus,
              "--artifact-root", str(root), "--torch-num-threads", "1"]
    commands = {
        "policy": ["policy", "--port", str(ports["policy"]), *common, "--model-path", str(sft_policy),
                   "--model-name", policy_name, "--default-max-new-tokens", "48"],
        "reward": ["reward", "--port", str(ports["reward"]), *common, "--model-path", str(root / "reward" / "rm-canary"),
                   "--model-name", reward_name],
    }
    config = TrainerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.5, cache_url="memory://",
        bus_url=f"{bus}?auto_offset_reset=latest", group_id=f"trainer-canary-{run}",
        dataset_path=str(tmp_path / "trainer" / "dataset.sqlite"), artifact_root=str(root),
        policy_name=policy_name, reward_model_name=reward_name, reward_url=f"127.0.0.1:{ports['reward']}",
        min_new_comparisons=1_000_000, canary_percent=50, promote_after=50, housekeeping_s=0.5,
        torch_num_threads=1, local_workers=0)
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    policy = policy_pb2_grpc.PolicyServiceStub(channels["policy"])
    component = TrainerComponent(config)
    with processes(commands, tmp_path) as procs, HostThread(lambda: ServiceHost(config, [component])):
        # 1. both services serving, the trainer in its group; stable is the SFT policy the policy service serves
        wait_for(lambda: serving(channels["policy"]) and serving(channels["reward"]), 120, "policy and reward", procs)
        wait_for(lambda: {t for t, _ in component.consumer.lag} == {"rlhf.feedback.v1", "rlhf.responses.v1"}, 120,
                 "the trainer joined", procs)
        stable = policy.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5).policies[0].version.version
        component.dataset.put_version(stable, "policy", "stable", {"name": policy_name, "uri": str(sft_policy)})
        component.canary.set_stable(stable)
        # 2. a product calls Generate throughout, each call with its own routing key
        stop, failures, served = threading.Event(), [], []
        prompts, _ = split_prompts(0.2, seed=0)

        def product() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    reply = policy.Generate(policy_pb2.GenerateRequest(
                        prompt=prompts[n % len(prompts)].text, routing_key=f"user-{run}-{n}", product="canary-test",
                        sampling=common_pb2.SamplingParams(seed=n)), timeout=60)
                    served.append(reply.policy_version)
                except grpc.RpcError as e:
                    failures.append(e)

        thread = threading.Thread(target=product, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(served) >= 5, 120, "stable serving the product", procs)
            # 3. the noised version arrives as the learner saves one: a folder under the artifact root, a saved record
            noised = f"{policy_name}-noised"
            from rlhf.core.models import load_causal_lm

            model, tokenizer = load_causal_lm(str(sft_policy))
            save_artifact(str(root / "policy" / noised), add_noise(model, seed=0), tokenizer,
                          Manifest(kind="policy", version=noised, parent=stable))
            component.dataset.put_version(noised, "policy", "saved", {
                "name": policy_name, "uri": f"policy/{noised}", "parent": stable,
                "reward_model_version": f"{reward_name}-1", "run_id": f"canary-{run}"})
            wait_for(lambda: noised in served, 180, "the canary serving part of the traffic", procs)
            # 4. after promote_after of its responses: scored through the reward service, rolled back
            wait_for(lambda: component.canary.decisions, 300, "a canary decision", procs)
            decision = component.canary.decisions[-1]
            assert decision.version == noised and not decision.promoted, decision
            assert decision.canary_mean < decision.stable_mean and decision.canary_responses >= 50, decision
            status = {v["version"]: v["status"] for v in component.dataset.versions(kind="policy")}
            assert status[noised] == "rolled_back" and status[stable] == "stable", status
            # 5. the policy service drops it; from then on only stable answers
            wait_for(lambda: [p.version.version for p in policy.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5)
                              .policies] == [stable], 120, "the policy service serving only stable", procs)
            after = len(served) + 1  # (the call in flight may have been routed before the rollback)
            wait_for(lambda: len(served) >= after + 10, 120, "ten more answers", procs)
            assert set(served[after:]) == {stable}, served[after:]
        finally:
            stop.set()
            thread.join(90)
        for channel in channels.values():
            channel.close()
    assert not failures, f"{len(failures)} of {len(failures) + len(served)} Generate calls failed: {failures[0]}"
    assert served.count(noised) >= 50 and served.count(stable) >= 50, (served.count(noised), served.count(stable))
