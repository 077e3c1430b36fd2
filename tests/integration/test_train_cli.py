"""`rlhf sft`, `rlhf rm` and `rlhf ppo` end to end on real checkpoint shapes built here: a Llama with a ChatML
byte-level BPE tokenizer, tied embeddings and no pad token, and a plain GPT-2 (tests/support/tiny_checkpoints.py).

Each command runs in this process (`rlhf.cli.main`), on small JSONL files; each test checks that training worked
(the loss fell; for PPO the reward rose), that the output loads with `from_pretrained`, and that it is served: the
policy by the policy service, the reward model by the reward service (which PPO then scores through, grpc://).
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.bus.memory import InMemoryBus
from rlhf.cache.memory import InMemoryCache
from rlhf.cli import main
from rlhf.policy.config import PolicyConfig
from rlhf.policy.servicer import PolicyComponent
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving.config import ServerConfig
from rlhf.serving.server import ServiceHost
from rlhf.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from support import tiny_checkpoints as tc
from support.hosting import HostThread

pytestmark = pytest.mark.slow

SERVER = dict(host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.2, shutdown_grace_s=1.0)
SFT = ["--num-steps", "40", "--batch-size", "8", "--learning-rate", "3e-3", "--warmup-steps", "2"]
RM = ["--num-epochs", "4", "--batch-size", "8", "--learning-rate", "3e-3"]
PPO = ["--steps", "12", "--batch-size", "16", "--num-mini-batches", "2", "--ppo-epochs", "2", "--response-length",
       "16", "--learning-rate", "5e-4", "--value-learning-rate", "1e-3", "--kl-coef", "0.01"]
COMMON = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(keep_torch_threads):
    yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    tc.llama_chatml(root / "llama")
    tc.gpt2_plain(root / "gpt2")
    tc.write_data(root, 64, 64, 32)
    return root


def rlhf(*argv: str) -> int:
    return main([str(a) for a in argv])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@contextlib.contextmanager
def policy_service(model_path: Path) -> Iterator[policy_pb2_grpc.PolicyServiceStub]:
    config = PolicyConfig(**SERVER, bus_url="memory://", cache_url="memory://", backend="torch",
                          artifact_root=str(model_path.parent), model_path=str(model_path), torch_num_threads=1,
                          max_batch_size=4, default_max_new_tokens=8, follow_model_events=False, drain_timeout_s=5)
    component = PolicyComponent(config, bus=InMemoryBus(), cache=InMemoryCache())
    with HostThread(lambda: ServiceHost(ServerConfig(**SERVER), [component])) as host, host.channel() as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


@contextlib.contextmanager
def reward_service(model_path: Path) -> Iterator[str]:
    config = RewardConfig(**SERVER, bus_url="memory://", cache_url="memory://", artifact_root=str(model_path.parent),
                          model_path=str(model_path), torch_num_threads=1, follow_model_events=False,
                          drain_timeout_s=5)
    component = RewardComponent(config, bus=InMemoryBus(), cache=InMemoryCache())
    with HostThread(lambda: ServiceHost(ServerConfig(**SERVER), [component])) as host:
        yield host.address


def until_ready(call, timeout_s: float = 60.0):
    """The first answer of ``call()`` once the service has loaded its model (UNAVAILABLE until then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def served_text(model_path: Path, messages: bool) -> str:
    with policy_service(model_path) as stub:
        if messages:
            from rlhf.v1 import common_pb2

            request = policy_pb2.GenerateRequest(messages=common_pb2.Conversation(messages=[
                common_pb2.ChatMessage(role="user", content="What colour is the red car?")]))
        else:
            request = policy_pb2.GenerateRequest(prompt="What colour is the red car?")
        reply = until_ready(lambda: stub.Generate(request, timeout=30))
    assert reply.samples and reply.samples[0].response_id
    return reply.samples[0].text


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def sft_out(request, work) -> Path:
    out = work / f"sft-{request.param}"
    assert rlhf("sft", "--model", work / request.param, "--data", work / "demos.jsonl", "--out", out,
                "--eval-share", "0.2", *SFT, *COMMON) == 0
    return out


def test_sft_lowers_the_loss_and_the_output_is_served(sft_out):
    rows = metrics(sft_out)
    assert len(rows) == 40 and [r["step"] for r in rows] == list(range(1, 41))
    assert mean(rows[-5:], "loss") < 0.8 * mean(rows[:5], "loss")
    results = json.loads((sft_out / "eval.json").read_text())
    assert results["eval_loss"] < rows[0]["loss"] and results["eval_tokens"] > 0
    manifest = json.loads((sft_out / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["data"]["held_out"] == 13 and manifest["config"]["num_steps"] == 40
    assert (sft_out / "curves.png").read_bytes().startswith(b"\x89PNG")
    model = AutoModelForCausalLM.from_pretrained(sft_out)
    tokenizer = AutoTokenizer.from_pretrained(sft_out)
    assert tokenizer.pad_token is not None  # the eos token, as the note said, saved with it
    if "llama" in sft_out.name:
        assert model.config.tie_word_embeddings
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert isinstance(served_text(sft_out, messages="llama" in sft_out.name), str)


@pytest.fixture(scope="module")
def rm_out(work, sft_out) -> Path:
    out = work / f"rm-{sft_out.name}"
    assert rlhf("rm", "--model", sft_out, "--data", work / "pairs.jsonl", "--out", out, "--eval-share", "0.2",
                *RM, *COMMON) == 0
    return out


def test_rm_learns_the_preferences_and_is_served_by_the_reward_service(rm_out):
    rows = metrics(rm_out)
    assert mean(rows[-5:], "loss") < 0.5 * mean(rows[:5], "loss")
    results = json.loads((rm_out / "eval.json").read_text())
    assert results["eval_accuracy"] > results["eval_accuracy_before"] and results["eval_accuracy"] >= 0.8
    assert AutoModelForSequenceClassification.from_pretrained(rm_out).config.num_labels == 1
    with reward_service(rm_out) as address, grpc.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(items=[
            reward_pb2.ScoreItem(prompt="What colour is the red car?", response="Thank you, the car is red. Have a nice day!"),
            reward_pb2.ScoreItem(prompt="What colour is the red car?", response="No. car car car."),
        ])
        good, bad = until_ready(lambda: stub.Score(request, timeout=30)).scores
    assert good > bad


@pytest.mark.parametrize("through", ["folder", "grpc"])
def test_ppo_raises_the_reward_and_the_policy_is_served(work, sft_out, rm_out, through):
    out = work / f"ppo-{sft_out.name}-{through}"
    with contextlib.ExitStack() as stack:
        reward = rm_out if through == "folder" else "grpc://" + stack.enter_context(reward_service(rm_out))
        assert rlhf("ppo", "--policy", sft_out, "--reward-model", reward, "--prompts", work / "prompts.jsonl",
                    "--out", out, "--eval-share", "0.25", *PPO, *COMMON) == 0
    rows = metrics(out)
    assert len(rows) == 12
    assert mean(rows[-4:], "score") > mean(rows[:4], "score")
    results = json.loads((out / "eval.json").read_text())
    # Held out, the reward does not fall (the SFT policy may already be near the reward model's top here).
    assert results["eval_reward"] >= results["eval_reward_before"] - 0.05
    assert results["eval_kl_before"] == pytest.approx(0.0, abs=1e-6) and results["eval_kl"] >= 0.0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "policy"
    assert isinstance(served_text(out, messages=False), str)
