"""PolicyService on the Triton backend: a real tritonserver (PyPI nvidia-pytriton's binary, CPU only, started by
deploy/local/triton.py) with the repository's policy models, the service in front of it over gRPC, real Kafka and Redis.

What is proven: concurrent requests through the service and the model's continuous batching on Triton get exactly
the in-process generation of each alone; a stream adds up to the unary text; stop sequences; a cancelled stream stops
on Triton; a version swap under continuous load fails no request, and every request routed after it is answered by the
new version, whose Triton model replaces the old one.

Triton loads take 10-20 s per model here, so the tests share one server and one service and run in file order:
the swap comes last.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid

import grpc
import pytest
import torch

from rlhf.core.generation import SamplingParams, decode_responses, generate, left_pad
from rlhf.core.models import Manifest, ModelSize, build_causal_lm, load_causal_lm, save_artifact
from rlhf.sim import world_texts
from rlhf.core.tokenizer import TokenizerConfig, format_prompt, train_tokenizer
from rlhf.policy.config import PolicyConfig
from rlhf.policy.servicer import PolicyComponent
from rlhf.policy.triton_backend import model_name
from rlhf.policy.triton_client import TritonPolicyClient
from rlhf.serving.server import ServiceHost
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from support.hosting import HostThread
from support.load import generate_in_a_loop
from support.triton import TRITON_MARKS, running_triton

pytestmark = TRITON_MARKS

FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
PROMPTS = ["how do I cook rice", "tell me about my garden", "what should I pack for a trip", "my bike tire is flat",
           "how can I save money", "my puppy will not sleep"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-artifacts")
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    size = ModelSize(arch="gpt2", n_layer=2, n_embd=32, n_head=2, max_positions=256)
    for name, seed in (("v1", 1), ("v2", 2)):
        save_artifact(str(root / name), build_causal_lm(tokenizer, size, seed=seed), tokenizer,
                      Manifest(kind="base", version=name))
    return root


@pytest.fixture(scope="module")
def triton(tmp_path_factory, artifacts):
    """A running tritonserver with no model loaded: {"grpc": host:port, "templates": repository}."""
    with running_triton(tmp_path_factory.mktemp("triton"), artifacts) as server:
        yield server


@pytest.fixture(scope="module")
def service(triton, artifacts, kafka_bootstrap, redis_url):
    version = f"tv1-{uuid.uuid4().hex[:6]}"
    config = PolicyConfig(
        host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.5, backend="triton",
        triton_url=triton["grpc"], triton_model_repository=str(triton["templates"]),
        artifact_root=str(artifacts), model_path="v1", initial_version=version,
        bus_url=f"kafka://{kafka_bootstrap}", cache_url=redis_url, follow_model_events=False,
        torch_num_threads=1, max_batch_size=8, default_max_new_tokens=16, drain_timeout_s=60,
    )
    with HostThread(lambda: ServiceHost(config, [PolicyComponent(config)])) as host:
        host.version = version
        with host.channel() as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            deadline = time.monotonic() + 240
            while not any(p.state == policy_pb2.POLICY_STATE_READY
                          for p in stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5).policies):
                assert time.monotonic() < deadline, "the initial version never loaded on Triton"
                time.sleep(0.2)
        yield host


@pytest.fixture
def stub(service):
    with service.channel() as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def request(prompt: str, **sampling) -> policy_pb2.GenerateRequest:
    num_samples = sampling.pop("num_samples", 0)
    return policy_pb2.GenerateRequest(prompt=prompt, num_samples=num_samples,
                                      sampling=common_pb2.SamplingParams(**sampling))


@pytest.fixture(scope="module")
def reference(artifacts):
    model, tokenizer = load_causal_lm(str(artifacts / "v1"))
    model.eval()

    def sample(prompt: str, *, seed: int, max_new_tokens: int = 16, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> tuple[str, int, int]:
        ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=True)["input_ids"]
        input_ids, mask = left_pad([ids], tokenizer.pad_token_id)
        with torch.inference_mode():
            out = generate(model, input_ids, mask, SamplingParams(max_new_tokens=max_new_tokens,
                                                                  temperature=temperature, top_k=top_k, top_p=top_p),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seeds=[seed])
        return decode_responses(tokenizer, out)[0], FINISH[out.finish_reasons[0]], int(out.lengths[0])

    return sample


def test_concurrent_requests_equal_in_process_generation(service, stub, reference):
    settings = [dict(temperature=1.0), dict(temperature=0.0, top_k=1), dict(temperature=0.7, top_k=20),
                dict(temperature=1.1, top_p=0.8)]
    cases = [(PROMPTS[i % len(PROMPTS)], dict(settings[i % len(settings)], seed=50 + 13 * i, max_new_tokens=6 + i),
              1 + i % 2) for i in range(8)]

    def call(case):
        prompt, sampling, n = case
        return stub.Generate(request(prompt, num_samples=n, **sampling), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(call, cases))
    for (prompt, sampling, n), reply in zip(cases, replies, strict=True):
        assert reply.policy_version == service.version and len(reply.samples) == n
        for i, sample in enumerate(reply.samples):
            expected = reference(prompt, **dict(sampling, seed=sampling["seed"] + i))
            assert (sample.text, sample.finish_reason, sample.completion_tokens) == expected, (prompt, sampling, i)


def test_stream_gives_the_unary_text_and_stop_sequences_work(stub):
    req = request("what should I pack for a trip", seed=4, max_new_tokens=24, temperature=0.9)
    unary = stub.Generate(req, timeout=60).samples[0]
    messages = list(stub.GenerateStream(req, timeout=60))
    assert "".join(m.text_delta for m in messages) == unary.text
    assert (messages[-1].finish_reason, messages[-1].completion_tokens) == (unary.finish_reason,
                                                                            unary.completion_tokens)
    words = unary.text.split()
    if len(words) >= 4:
        stop = f" {words[3]}"
        cut = unary.text[: unary.text.index(stop)]
        req.sampling.stop.append(stop)
        stopped = stub.Generate(req, timeout=60).samples[0]
        assert (stopped.text, stopped.finish_reason) == (cut, common_pb2.FINISH_REASON_STOP_SEQUENCE)
        streamed = list(stub.GenerateStream(req, timeout=60))
        assert "".join(m.text_delta for m in streamed) == cut
        assert streamed[-1].completion_tokens == stopped.completion_tokens


def test_a_cancelled_stream_is_cancelled_on_triton(stub):
    call = stub.GenerateStream(request("plan a picnic", seed=1, max_new_tokens=200), timeout=60)
    first = next(call)
    call.cancel()
    assert first.response_id
    assert stub.Generate(request("plan a picnic", max_new_tokens=3), timeout=60).samples[0].completion_tokens > 0


def test_version_swap_under_load_fails_nothing(service, stub, triton):
    old, new = service.version, f"tv2-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    # steady traffic that leaves the CPU to the loading models too
    results, threads = generate_in_a_loop(
        stub, stop,
        lambda worker, i: request(PROMPTS[(worker + i) % len(PROMPTS)], seed=worker * 1000 + i, max_new_tokens=6),
        workers=3, timeout_s=120, pause_s=0.02,
    )
    time.sleep(0.5)
    reply = stub.LoadPolicy(policy_pb2.LoadPolicyRequest(
        version=common_pb2.ModelVersion(version=new, uri="v2"), traffic_percent=100), timeout=300)
    swapped_at = time.monotonic()
    assert reply.previous_version == old
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()

    assert [r for r in results if r[2].startswith("error")] == []
    before = {v for started, _, v in results if started < swapped_at - 1.0}
    after = [v for started, _, v in results if started > swapped_at]
    assert before == {old} and after and set(after) == {new}

    async def loaded() -> list[str]:
        async with TritonPolicyClient(triton["grpc"], template_repository=triton["templates"]) as client:
            deadline = time.monotonic() + 60
            names = await client.loaded_models()
            while model_name(old) in names and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                names = await client.loaded_models()
            return names

    names = asyncio.run(loaded())
    assert model_name(new) in names
    assert model_name(old) not in names, f"the old version's model is still loaded: {names}"
    with contextlib.suppress(grpc.RpcError):
        policies = stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5).policies
        assert [p.version.version for p in policies] == [new]
