"""PolicyService end to end on the torch backend: a real gRPC server on a real socket, a real Kafka broker, a real
Redis, a real Prometheus, tiny random-init models saved under a temporary artifact root.

Tests that change versions get a service of their own (starting one takes about a second); the others share one.
Version ids are unique per service, so the process-wide Prometheus series of one service never mix with another's.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import re
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf import keys
from rlhf.bus import topics
from rlhf.bus.kafka import KafkaBus, KafkaConfig
from rlhf.cache import cache_from_url
from rlhf.core.generation import SamplingParams, decode_responses, generate, left_pad
from rlhf.core.models import Manifest, ModelSize, build_causal_lm, load_causal_lm, save_artifact
from rlhf.sim import world_texts
from rlhf.core.tokenizer import TokenizerConfig, format_prompt, train_tokenizer
from rlhf.policy.config import PolicyConfig
from rlhf.policy.routing import bucket
from rlhf.policy.servicer import PolicyComponent
from rlhf.serving.server import ServiceHost
from rlhf.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc
from support.hosting import HostThread
from support.load import generate_in_a_loop
from support.kafka_read import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
PROMPTS = ["how do I cook rice", "tell me about my garden", "what should I pack for a trip", "my bike tire is flat",
           "how can I save money", "my puppy will not sleep", "fix a leaking tap", "plan a picnic"]
CONTEXT = 512


# --------------------------------------------------------------------------------------------- models and services


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two random-init versions (different seeds) with one word-level tokenizer (chat template included)."""
    root = tmp_path_factory.mktemp("artifacts")
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    size = ModelSize(arch="gpt2", n_layer=2, n_embd=32, n_head=2, max_positions=CONTEXT)
    for name, seed in (("v1", 1), ("v2", 2)):
        model = build_causal_lm(tokenizer, size, seed=seed)
        save_artifact(str(root / name), model, tokenizer, Manifest(kind="base", version=name))
    return root


def make_config(artifacts, kafka_bootstrap, redis_url, **overrides) -> PolicyConfig:
    values = dict(
        host="127.0.0.1", port=0, metrics_port=0, health_interval_s=0.3, backend="torch",
        artifact_root=str(artifacts), bus_url=f"kafka://{kafka_bootstrap}", cache_url=redis_url,
        torch_num_threads=1, max_batch_size=8, max_wait_s=0.005, default_max_new_tokens=16,
        model_name=f"policy-test-{uuid.uuid4().hex[:8]}", record_ttl_s=600, drain_timeout_s=30,
    )
    values.update(overrides)
    return PolicyConfig(**values)


@contextlib.contextmanager
def policy_service(artifacts, kafka_bootstrap, redis_url, **overrides):
    config = make_config(artifacts, kafka_bootstrap, redis_url, **overrides)
    component = PolicyComponent(config)
    with HostThread(lambda: ServiceHost(config, [component])) as host:
        host.component = component
        host.config = config
        yield host


def unique_version(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def wait_ready(stub, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        policies = stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5).policies
        if any(p.version.version == version and p.state == policy_pb2.POLICY_STATE_READY for p in policies):
            return
        time.sleep(0.05)
    raise AssertionError(f"{version} never became READY: {policies}")


@pytest.fixture(scope="module")
def service(artifacts, kafka_bootstrap, redis_url):
    version = unique_version("shared")
    with policy_service(artifacts, kafka_bootstrap, redis_url, model_path="v1", initial_version=version) as host:
        host.version = version
        with host.channel() as channel:
            wait_ready(policy_pb2_grpc.PolicyServiceStub(channel), version)
        yield host


@pytest.fixture
def stub(service):
    with service.channel() as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def request(prompt="how do I cook rice", *, num_samples=0, routing_key="", **sampling) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(prompt=prompt, num_samples=num_samples, routing_key=routing_key,
                                      sampling=common_pb2.SamplingParams(**sampling))


# --------------------------------------------------------------------------------------------- in-process reference


class Reference:
    """core.generate on one row at a time, the way the service formats and tokenizes prompts."""

    def __init__(self, path) -> None:
        self.model, self.tokenizer = load_causal_lm(str(path))
        self.model.eval()

    def sample(self, prompt: str, *, seed: int, max_new_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0) -> tuple[str, int, int]:
        """(text, finish reason, completion tokens) of ``prompt`` generated alone."""
        ids = self.tokenizer(format_prompt(self.tokenizer, prompt), add_special_tokens=True)["input_ids"]
        input_ids, mask = left_pad([ids], self.tokenizer.pad_token_id)
        out = generate(self.model, input_ids, mask,
                       SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p),
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id, seeds=[seed])
        return decode_responses(self.tokenizer, out)[0], FINISH[out.finish_reasons[0]], int(out.lengths[0])


@pytest.fixture(scope="module")
def reference(artifacts):
    return Reference(artifacts / "v1")


# --------------------------------------------------------------------------------------------- metrics


def scrape(host) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{host.host.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_metric(host, name: str, predicate, timeout_s: float = 10, **labels) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = metric(scrape(host), name, **labels)
        if predicate(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{name}{labels} stayed {value}")


# --------------------------------------------------------------------------------------------- tests


def test_health_is_not_serving_until_a_policy_is_loaded(artifacts, kafka_bootstrap, redis_url):
    with policy_service(artifacts, kafka_bootstrap, redis_url) as host, host.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        time.sleep(0.5)
        for name in ("", "rlhf.v1.PolicyService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        version = unique_version("first")
        reply = stub.LoadPolicy(policy_pb2.LoadPolicyRequest(
            version=common_pb2.ModelVersion(version=version, uri="v1")), timeout=60)
        [loaded] = reply.policies
        assert (loaded.version.version, loaded.state, loaded.role, loaded.traffic_percent, loaded.backend) == (
            version, policy_pb2.POLICY_STATE_READY, policy_pb2.POLICY_ROLE_STABLE, 100, "torch")
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != SERVING:
            assert time.monotonic() < deadline, "health never became SERVING after LoadPolicy"
            time.sleep(0.1)
        assert stub.Generate(request(), timeout=10).policy_version == version


def test_concurrent_clients_get_what_each_request_gets_alone(service, stub, reference):
    """Twelve clients at once, different prompts, seeds and sampling settings (greedy, temperatures, top-k, top-p,
    several samples): each gets exactly the in-process, unbatched generation, while the service batched them."""
    settings = [dict(temperature=1.0), dict(temperature=0.0, top_k=1), dict(temperature=0.7),
                dict(temperature=1.2, top_k=20), dict(temperature=0.9, top_p=0.8)]
    cases = [(PROMPTS[i % len(PROMPTS)], dict(settings[i % len(settings)], seed=100 + 17 * i,
                                               max_new_tokens=8 + i), 1 + i % 3) for i in range(12)]
    before = metric(scrape(service), "rlhf_policy_batch_size_count", version=service.version) or 0
    barrier = threading.Barrier(len(cases))

    def call(case):
        prompt, sampling, n = case
        barrier.wait()
        return stub.Generate(request(prompt, num_samples=n, **sampling), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(call, cases))

    for (prompt, sampling, n), reply in zip(cases, replies, strict=True):
        assert reply.policy_version == service.version
        assert len(reply.samples) == n and len({s.response_id for s in reply.samples}) == n
        for i, sample in enumerate(reply.samples):
            expected = reference.sample(prompt, **dict(sampling, seed=sampling["seed"] + i))
            assert (sample.text, sample.finish_reason, sample.completion_tokens) == expected, (prompt, sampling, i)
    text = scrape(service)
    steps = (metric(text, "rlhf_policy_batch_size_count", version=service.version) or 0) - before
    rows = sum(len(r.samples) for r in replies)
    assert 0 < steps < sum(s.completion_tokens for r in replies for s in r.samples), "rows were never batched"
    assert rows == 24


def test_stream_gives_the_unary_text(stub):
    req = request("what should I pack for a trip", num_samples=2, seed=7, max_new_tokens=24, temperature=0.9)
    unary = stub.Generate(req, timeout=30)
    messages = list(stub.GenerateStream(req, timeout=30))
    for i, sample in enumerate(unary.samples):
        mine = [m for m in messages if m.sample_index == i]
        assert mine[0].response_id and all(m.response_id == mine[0].response_id for m in mine)
        assert "".join(m.text_delta for m in mine) == sample.text
        assert [bool(m.finish_reason) for m in mine] == [False] * (len(mine) - 1) + [True]
        assert (mine[-1].finish_reason, mine[-1].completion_tokens) == (sample.finish_reason, sample.completion_tokens)
        assert len(mine) > 2 or sample.completion_tokens <= 2  # text came in pieces
    assert {m.policy_version for m in messages} == {unary.policy_version}
    assert {m.prompt_tokens for m in messages} == {unary.prompt_tokens}


def test_stop_sequence_ends_the_text_before_it(stub):
    full = stub.Generate(request("tell me about my garden", seed=3, max_new_tokens=30, temperature=0.8), timeout=30)
    words = full.samples[0].text.split()
    assert len(words) >= 6, full
    stop = f" {words[4]} {words[5]}"
    cut = full.samples[0].text[: full.samples[0].text.index(stop)]
    req = request("tell me about my garden", seed=3, max_new_tokens=30, temperature=0.8, stop=[stop, "zzz"])
    unary = stub.Generate(req, timeout=30).samples[0]
    assert (unary.text, unary.finish_reason) == (cut, common_pb2.FINISH_REASON_STOP_SEQUENCE)
    assert unary.completion_tokens < full.samples[0].completion_tokens
    streamed = list(stub.GenerateStream(req, timeout=30))
    assert "".join(m.text_delta for m in streamed) == cut
    assert streamed[-1].finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert streamed[-1].completion_tokens == unary.completion_tokens


def test_chat_messages_use_the_chat_template(stub):
    conversation = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role="user", content="how do I cook rice")])
    chat = stub.Generate(policy_pb2.GenerateRequest(
        messages=conversation, sampling=common_pb2.SamplingParams(seed=9, max_new_tokens=10)), timeout=30)
    plain = stub.Generate(request("how do I cook rice", seed=9, max_new_tokens=10), timeout=30)
    # A plain prompt is one user turn of the template (as the trainer formats prompts): the same text.
    assert chat.samples[0].text == plain.samples[0].text
    assert chat.prompt_tokens == plain.prompt_tokens


def long_seed(stub, prompt: str, max_new_tokens: int) -> int:
    """A seed whose answer runs to max_new_tokens (a random model sometimes ends early). Sample i of a request has
    seed ``seed + i``: eight candidates per (batched) call."""
    for base in range(0, 64, 8):
        reply = stub.Generate(request(prompt, seed=base, max_new_tokens=max_new_tokens, num_samples=8), timeout=60)
        for i, sample in enumerate(reply.samples):
            if sample.finish_reason == common_pb2.FINISH_REASON_LENGTH:
                return base + i
    raise AssertionError("no seed ran to max_new_tokens")


def test_a_cancelled_stream_frees_its_slot(service, stub):
    seed = long_seed(stub, "plan a picnic", 100)
    call = stub.GenerateStream(request("plan a picnic", seed=seed, max_new_tokens=100), timeout=60)
    received = [next(call), next(call)]
    assert received[0].text_delta
    call.cancel()
    wait_metric(service, "rlhf_policy_active_rows", lambda v: v == 0, version=service.version)
    assert metric(scrape(service), "rlhf_policy_queue_depth", version=service.version) == 0
    cancelled = metric(scrape(service), "rlhf_policy_request_errors_total", method="GenerateStream",
                       version=service.version, code="CANCELLED")
    assert cancelled and cancelled >= 1
    assert stub.Generate(request("plan a picnic", max_new_tokens=4), timeout=10).samples[0].completion_tokens > 0


def test_a_request_whose_deadline_passes_in_the_queue_is_not_generated(artifacts, kafka_bootstrap, redis_url,
                                                                       stub):
    seed = long_seed(stub, "plan a picnic", 500)  # on the shared service: the same weights (v1), batched
    version = unique_version("deadline")
    with policy_service(artifacts, kafka_bootstrap, redis_url, model_path="v1", initial_version=version,
                        max_batch_size=1, follow_model_events=False) as host, host.channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        wait_ready(stub, version)
        text = scrape(host)
        samples_before = {reason: metric(text, "rlhf_policy_samples_total", version=version, finish_reason=reason) or 0
                          for reason in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")}
        blocker = stub.GenerateStream(request("plan a picnic", seed=seed, max_new_tokens=500), timeout=60)
        next(blocker)  # the only slot is taken for the next half second or so
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request("how do I cook rice", max_new_tokens=5), timeout=0.1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert metric(scrape(host), "rlhf_policy_queue_depth", version=version) == 0  # it left the queue
        assert metric(scrape(host), "rlhf_policy_active_rows", version=version) == 1  # the blocker only
        messages = list(blocker)
        assert messages[-1].completion_tokens == 500
        wait_metric(host, "rlhf_policy_active_rows", lambda v: v == 0, version=version)
        text = scrape(host)
        # One more sample finished (the blocker); the expired request never produced one.
        samples_after = {reason: metric(text, "rlhf_policy_samples_total", version=version, finish_reason=reason) or 0
                         for reason in samples_before}
        assert samples_after == {**samples_before, "FINISH_REASON_LENGTH": samples_before["FINISH_REASON_LENGTH"] + 1}


def run_load(stub, stop: threading.Event, workers: int = 4, max_new_tokens: int = 6):
    """Clients asking in a loop until ``stop``: [(started, finished, version or error)]."""
    return generate_in_a_loop(
        stub, stop,
        lambda worker, i: request(PROMPTS[(worker + i) % len(PROMPTS)], seed=worker * 1000 + i,
                                  max_new_tokens=max_new_tokens, routing_key=f"user-{worker}-{i}"),
        workers=workers, timeout_s=30,
    )


def test_version_swap_and_rollback_under_load_drop_nothing(artifacts, kafka_bootstrap, redis_url):
    old, new = unique_version("old"), unique_version("new")
    with policy_service(artifacts, kafka_bootstrap, redis_url, model_path="v1", initial_version=old,
                        follow_model_events=False) as host, host.channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        wait_ready(stub, old)
        stop = threading.Event()
        results, threads = run_load(stub, stop)
        time.sleep(0.7)
        reply = stub.LoadPolicy(policy_pb2.LoadPolicyRequest(
            version=common_pb2.ModelVersion(version=new, uri="v2"), traffic_percent=100), timeout=60)
        swapped_at = time.monotonic()
        assert reply.previous_version == old
        time.sleep(0.7)
        rollback_sent_at = time.monotonic()
        reply = stub.Rollback(policy_pb2.RollbackPolicyRequest(), timeout=60)
        rolled_back_at = time.monotonic()
        time.sleep(0.7)
        stop.set()
        for t in threads:
            t.join()
        policies = stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=5)

    errors = [r for r in results if r[2].startswith("error")]
    assert errors == []
    assert len(results) > 20
    # Routed after the swap returned and answered before the rollback was asked for: the new version.
    between = [v for started, finished, v in results if swapped_at < started and finished < rollback_sent_at]
    after = [v for started, _, v in results if started > rolled_back_at]
    assert between and set(between) == {new}, "a request routed after the swap was answered by the old version"
    assert after and set(after) == {old}, "a request routed after the rollback was answered by the new version"
    assert {v for started, _, v in results if started < swapped_at - 0.3} == {old}
    stable = [p for p in policies.policies if p.role == policy_pb2.POLICY_ROLE_STABLE]
    assert [p.version.version for p in stable] == [old]
    assert reply.previous_version == ""


def test_traffic_split_is_sticky_by_routing_key(artifacts, kafka_bootstrap, redis_url):
    stable, candidate = unique_version("stable"), unique_version("canary")
    with policy_service(artifacts, kafka_bootstrap, redis_url, model_path="v1", initial_version=stable,
                        follow_model_events=False) as host, host.channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        wait_ready(stub, stable)
        reply = stub.LoadPolicy(policy_pb2.LoadPolicyRequest(
            version=common_pb2.ModelVersion(version=candidate, uri="v2"), traffic_percent=30), timeout=60)
        roles = {p.version.version: (p.role, p.traffic_percent) for p in reply.policies}
        assert roles == {stable: (policy_pb2.POLICY_ROLE_STABLE, 70), candidate: (policy_pb2.POLICY_ROLE_CANDIDATE, 30)}

        keys_ = [f"session-{i}" for i in range(200)]

        def version_for(key: str) -> str:
            return stub.Generate(request(max_new_tokens=1, routing_key=key), timeout=10).policy_version

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answered = dict(zip(keys_, pool.map(version_for, keys_), strict=True))
        on_candidate = {k for k, v in answered.items() if v == candidate}
        assert on_candidate == {k for k in keys_ if bucket(k) < 30}  # the same hash every replica uses
        assert 0.2 < len(on_candidate) / len(keys_) < 0.4
        assert all(version_for(k) == answered[k] for k in keys_[:20])  # sticky
        # A pinned version answers whatever the split says.
        pinned = stub.Generate(policy_pb2.GenerateRequest(prompt="hello", version=candidate, routing_key=keys_[0]),
                               timeout=10)
        assert pinned.policy_version == candidate

        reply = stub.SetTrafficSplit(policy_pb2.SetTrafficSplitRequest(candidate_version=candidate,
                                                                       traffic_percent=60), timeout=10)
        assert {p.version.version: p.traffic_percent for p in reply.policies} == {stable: 40, candidate: 60}
        assert all(version_for(k) == candidate for k in on_candidate)  # ramping up keeps the canary's users
        reply = stub.Rollback(policy_pb2.RollbackPolicyRequest(), timeout=30)
        assert all(version_for(k) == stable for k in list(on_candidate)[:20])
        assert reply.previous_version == ""


def test_model_events_load_promote_and_roll_back(artifacts, kafka_bootstrap, redis_url):
    """A version published on rlhf.models.v1 (the real topic, this service's own model name) is loaded and gets
    traffic; a ROLLED_BACK event sends traffic back."""
    first, second = unique_version("ev1"), unique_version("ev2")
    with policy_service(artifacts, kafka_bootstrap, redis_url, model_path="v1", initial_version=first) as host, \
            host.channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        wait_ready(stub, first)
        name = host.config.model_name
        bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        try:
            def publish(action, version, percent=0, previous="", uri="v2"):
                event = events_pb2.ModelEvent(
                    version=common_pb2.ModelVersion(name=name, version=version, kind=common_pb2.MODEL_KIND_POLICY,
                                                    uri=uri),
                    action=action, traffic_percent=percent, previous_version=previous)
                bus.send(topics.MODELS, event.SerializeToString(), key=name.encode()).result(30)

            publish(events_pb2.MODEL_ACTION_PUBLISHED, second, 100)
            deadline = time.monotonic() + 60
            while stub.Generate(request(max_new_tokens=2), timeout=10).policy_version != second:
                assert time.monotonic() < deadline, "the published version never got traffic"
                time.sleep(0.2)
            publish(events_pb2.MODEL_ACTION_ROLLED_BACK, first, previous=second, uri="v1")
            while stub.Generate(request(max_new_tokens=2), timeout=10).policy_version != first:
                assert time.monotonic() < deadline, "the rollback event was not applied"
                time.sleep(0.2)
        finally:
            bus.close(5)


INVALID = {
    "empty prompt": (policy_pb2.GenerateRequest(prompt=""), "prompt"),
    "prompt longer than the context": (policy_pb2.GenerateRequest(prompt="rice " * 600), "prompt"),
    "chat longer than the context": (policy_pb2.GenerateRequest(messages=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role="user", content="rice " * 600)])), "messages"),
    "bad role": (policy_pb2.GenerateRequest(messages=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role="wizard", content="hi")])), "messages.messages[0].role"),
    "temperature": (request(temperature=3.0), "sampling.temperature"),
    "top_p": (request(top_p=1.5), "sampling.top_p"),
    "top_k": (request(top_k=5000), "sampling.top_k"),
    "max_new_tokens": (request(max_new_tokens=100_000), "sampling.max_new_tokens"),
    "stop": (request(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    "too many samples": (request(num_samples=100), "num_samples"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_requests_are_rejected_naming_the_field(stub, case):
    req, field = INVALID[case]
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith(f"{field}: "), e.value.details()


def test_unknown_pinned_version_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(policy_pb2.GenerateRequest(prompt="hello", version="no-such-version"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-version" in e.value.details()


def test_served_responses_land_in_redis_and_on_the_responses_topic(service, stub, kafka_bootstrap, redis_url):
    prompt_id = f"prompt-{uuid.uuid4().hex}"
    reply = stub.Generate(policy_pb2.GenerateRequest(
        prompt="fix a leaking tap", num_samples=2, prompt_id=prompt_id, product="test-product", routing_key="u-1",
        sampling=common_pb2.SamplingParams(seed=11, max_new_tokens=6)), timeout=30)
    ids = [s.response_id for s in reply.samples]

    cache = cache_from_url(redis_url)
    try:
        deadline = time.monotonic() + 15
        while True:
            values = service.call(cache.get_many([keys.served_response(rid) for rid in ids]))
            if all(values) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        service.call(cache.close())
    assert all(values), "served-response records missing in Redis"
    records = [events_pb2.ServedResponse.FromString(v) for v in values]
    for i, (record, sample) in enumerate(zip(records, reply.samples, strict=True)):
        assert (record.response_id, record.prompt_id, record.text, record.policy_version) == (
            sample.response_id, prompt_id, sample.text, service.version)
        assert (record.product, record.routing_key, record.finish_reason) == ("test-product", "u-1",
                                                                              sample.finish_reason)
        assert record.sampling.seed == 11 + i and record.sampling.max_new_tokens == 6
        assert record.prompt.startswith("<bos><|user|>fix a leaking tap")
        assert record.completion_tokens == sample.completion_tokens and record.served_at.seconds > 0

    found = {}
    for key, value in read_topic(kafka_bootstrap, topics.RESPONSES, lambda: set(found) >= set(ids), timeout_s=60):
        if key is not None and key.decode() in ids:
            found[key.decode()] = events_pb2.ServedResponse.FromString(value)
    assert set(found) == set(ids)
    assert found[ids[0]] == records[0]
    assert metric(scrape(service), "rlhf_policy_records_total", sink="bus") >= 2


def test_metrics_reach_prometheus(service, stub, prometheus):
    with prometheus.target("policy-test", f"127.0.0.1:{service.host.metrics_port}"):
        stub.Generate(request(max_new_tokens=3), timeout=10)
        version = service.version
        for query in (
            f'sum(rlhf_policy_requests_total{{job="policy-test",version="{version}"}})',
            'histogram_quantile(0.5, sum by (le) (rate(rlhf_policy_request_duration_seconds_bucket'
            '{job="policy-test"}[1m])))',
            f'sum(rlhf_policy_time_to_first_token_seconds_count{{job="policy-test",version="{version}"}})',
            f'sum(rlhf_policy_generated_tokens_total{{job="policy-test",version="{version}"}})',
            f'sum(rlhf_policy_batch_size_count{{job="policy-test",version="{version}"}})',
            f'rlhf_policy_queue_depth{{job="policy-test",version="{version}"}}',
            f'rlhf_policy_traffic_percent{{job="policy-test",version="{version}",role="stable"}}',
        ):
            prometheus.wait_for(query, timeout=20)
