"""RewardService end to end: a real gRPC server on a real socket, a real Kafka broker (rlhf.models.v1), a real Redis
(score cache; a private one where the test stops it), a real Prometheus, tiny random-init reward models saved under a
temporary artifact root: ours (a scalar head on a Llama-style causal LM, word-level tokenizer with a chat template) and
a stock Hugging Face GPT-2 sequence-classification checkpoint with a byte-level BPE tokenizer and no pad token.

Every service gets a model name of its own, so the process-wide metrics and the shared models topic never mix tests.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf.bus import topics
from rlhf.bus.kafka import KafkaBus, KafkaConfig
from rlhf.core.models import Manifest, ModelSize, build_causal_lm, build_reward_model, load_reward_model, save_artifact
from rlhf.sim import world_texts
from rlhf.core.tokenizer import TokenizerConfig, format_chat, format_prompt, train_tokenizer
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving.server import ServiceHost
from rlhf.v1 import common_pb2, events_pb2, reward_pb2, reward_pb2_grpc
from support.hosting import HostThread
from support.waiting import wait_for
from support.load import call_in_a_loop

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SERVING = health_pb2.HealthCheckResponse.SERVING
CONTEXT = 128
ITEMS = [
    ("how do I cook rice", "rinse the rice , then simmer it in water ."),
    ("tell me about my garden", "water the plants in the morning ."),
    ("what should I pack for a trip", "pack light clothes and a charger ."),
    ("my bike tire is flat", "patch the tube and pump it up again , then check the valve for a slow leak ."),
    ("how can I save money", "cook at home ."),
    ("plan a picnic", "bring food , a blanket and water to the park and find some shade near the lake ."),
]


def _reward_version(root, name: str, tokenizer, seed: int) -> str:
    size = ModelSize(arch="llama", n_layer=2, n_embd=32, n_head=2, max_positions=CONTEXT)
    reward_model = build_reward_model(build_causal_lm(tokenizer, size, seed=seed), tokenizer, seed=seed)
    torch.manual_seed(seed)
    torch.nn.init.normal_(reward_model.model.score.weight, std=1.0)  # scores that differ between texts
    save_artifact(str(root / name), reward_model, tokenizer, Manifest(kind="reward", version=name))
    return name


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """r1, r2 (ours, different seeds), hf-gpt2 (a stock HF checkpoint, BPE, no pad token), broken (unloadable)."""
    root = tmp_path_factory.mktemp("reward-artifacts")
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    for name, seed in (("r1", 1), ("r2", 2)):
        _reward_version(root, name, tokenizer, seed)
    # A Hugging Face checkpoint as a user would bring one: GPT-2 sequence classification, byte-level BPE, no pad token,
    # no chat template, no manifest.
    bpe = train_tokenizer(world_texts(), TokenizerConfig(kind="bpe", vocab_size=600))
    bpe.pad_token = None
    bpe.chat_template = None
    torch.manual_seed(3)
    hf = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(bpe), n_embd=32, n_layer=2, n_head=2, n_positions=CONTEXT, num_labels=1,
        eos_token_id=bpe.eos_token_id, bos_token_id=bpe.bos_token_id,
    ))
    hf.save_pretrained(root / "hf-gpt2")
    bpe.save_pretrained(root / "hf-gpt2")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    (broken / "manifest.json").write_text(json.dumps({"kind": "reward", "version": "broken"}))
    return root


def make_config(artifacts, kafka_bootstrap, redis_url, **overrides) -> RewardConfig:
    # Version ids repeat across test runs (r1, r2): a key prefix of its own keeps each service's score cache apart.
    values = dict(
        host="127.0.0.1", port=0, metrics_port=0, health_interval_s=0.3, artifact_root=str(artifacts),
        bus_url=f"kafka://{kafka_bootstrap}", cache_url=f"{redis_url}?key_prefix=test-{uuid.uuid4().hex[:8]}:", model_path="r1", torch_num_threads=1,
        model_name=f"reward-test-{uuid.uuid4().hex[:8]}", drain_timeout_s=20, max_wait_s=0.002,
    )
    values.update(overrides)
    return RewardConfig(**values)


@contextlib.contextmanager
def reward_service(config: RewardConfig):
    with HostThread(lambda: ServiceHost(config, [RewardComponent(config)])) as host:
        channel = host.channel()
        wait_serving(channel)
        yield host, reward_pb2_grpc.RewardServiceStub(channel)
        channel.close()


def wait_serving(channel: grpc.Channel, timeout: float = 60.0) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("the reward service never reported SERVING")


def request(pairs, version: str = "") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in pairs],
                                   version=version)


def direct_scores(path, pairs) -> list[float]:
    """The reward model's own forward pass, one item at a time, formatted as the core formats for training."""
    model = load_reward_model(str(path))
    return [float(model.score([format_prompt(model.tokenizer, p)], [r])[0]) for p, r in pairs]


# --------------------------------------------------------------------------------------------- scores


def test_scores_equal_the_direct_forward_pass_alone_batched_and_cached(artifacts, kafka_bootstrap, redis_url):
    expected = direct_scores(artifacts / "r1", ITEMS)
    assert len({round(s, 4) for s in expected}) == len(expected)  # the texts get different scores
    # A long wait so that concurrent calls share forward passes.
    config = make_config(artifacts, kafka_bootstrap, redis_url, max_wait_s=0.05, score_cache_ttl_s=600)
    with reward_service(config) as (_, stub):
        # 1. alone, one item per call
        for (p, r), want in zip(ITEMS, expected):
            got = stub.Score(request([(p, r)]), timeout=30)
            assert got.reward_model_version == "r1" and got.cache_hits == 0
            assert got.scores[0] == pytest.approx(want, abs=1e-5)
        # 2. new texts (no cache hits), many concurrent calls whose items share batches of mixed lengths
        fresh = [(p + " please", r + " ok") for p, r in ITEMS] * 1
        want_fresh = direct_scores(artifacts / "r1", fresh)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stub.Score, request([fresh[i], fresh[(i + 3) % len(fresh)]]), timeout=30)
                     for i in range(len(fresh))]
            answers = [c.result() for c in calls]
        for i, answer in enumerate(answers):
            assert answer.scores[0] == pytest.approx(want_fresh[i], abs=1e-5)
            assert answer.scores[1] == pytest.approx(want_fresh[(i + 3) % len(fresh)], abs=1e-5)
        # 3. from the cache: the same items again are all hits, with the same scores
        again = stub.Score(request(ITEMS), timeout=30)
        assert again.cache_hits == len(ITEMS)
        assert list(again.scores) == pytest.approx(expected, abs=1e-5)


def test_chat_messages_are_scored_through_the_chat_template(artifacts, kafka_bootstrap, redis_url):
    messages = [("system", "be brief ."), ("user", "how do I cook rice")]
    response = "simmer it in water ."
    model = load_reward_model(str(artifacts / "r1"))
    prompt = format_chat(model.tokenizer, [{"role": r, "content": c} for r, c in messages])
    assert prompt.startswith(model.tokenizer.bos_token) and "<|system|>" in prompt  # the template was applied
    want = float(model.score([prompt], [response])[0])
    config = make_config(artifacts, kafka_bootstrap, redis_url, score_cache_ttl_s=0)
    with reward_service(config) as (_, stub):
        item = reward_pb2.ScoreItem(response=response, messages=common_pb2.Conversation(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]))
        got = stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30)
        assert got.scores[0] == pytest.approx(want, abs=1e-5)


def test_a_hugging_face_checkpoint_without_pad_token_is_served(artifacts, kafka_bootstrap, redis_url):
    expected = direct_scores(artifacts / "hf-gpt2", ITEMS)
    config = make_config(artifacts, kafka_bootstrap, redis_url, model_path="hf-gpt2", score_cache_ttl_s=0,
                         max_wait_s=0.05)
    with reward_service(config) as (_, stub):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda pair: stub.Score(request([pair]), timeout=30), ITEMS))
        assert [a.scores[0] for a in answers] == pytest.approx(expected, abs=1e-5)
        assert answers[0].reward_model_version == "hf-gpt2"  # no manifest: the folder name


# --------------------------------------------------------------------------------------------- the score cache


def test_a_repeated_item_is_a_cache_hit_and_redis_down_degrades_to_the_model(artifacts, kafka_bootstrap,
                                                                             private_redis, prometheus):
    from rlhf.reward import metrics

    expected = direct_scores(artifacts / "r1", ITEMS[:2])
    config = make_config(artifacts, kafka_bootstrap, private_redis.url, score_cache_ttl_s=600)
    with reward_service(config) as (host, stub):
        first = stub.Score(request(ITEMS[:2]), timeout=30)
        assert first.cache_hits == 0
        assert stub.Score(request(ITEMS[:2]), timeout=30).cache_hits == 2
        # Redis stops: every item is scored by the model, correctly, and the failures are counted.
        errors_before = metrics.CACHE_ERRORS.labels("get")._value.get()
        private_redis.stop()
        for _ in range(3):
            answer = stub.Score(request(ITEMS[:2]), timeout=30)
            assert answer.cache_hits == 0
            assert list(answer.scores) == pytest.approx(expected, abs=1e-5)
        assert metrics.CACHE_ERRORS.labels("get")._value.get() >= errors_before + 3
        # Redis is back (empty: it kept nothing): the service uses it again.
        private_redis.start()
        wait_for(lambda: stub.Score(request(ITEMS[2:4]), timeout=30).cache_hits == 0, what="a call after restart")
        assert stub.Score(request(ITEMS[2:4]), timeout=30).cache_hits == 2
        # The real Prometheus sees the hits, misses and errors.
        with prometheus.target("reward-cache", f"127.0.0.1:{host.host.metrics_port}"):
            for expr in ('rlhf_reward_cache_hits_total{job="reward-cache"} > 0',
                         'rlhf_reward_cache_misses_total{job="reward-cache"} > 0',
                         'rlhf_reward_cache_errors_total{job="reward-cache",operation="get"} > 0'):
                prometheus.wait_for(expr)


# --------------------------------------------------------------------------------------------- versions


def publish(kafka_bootstrap, model_name: str, version: str, uri: str,
            action: int = events_pb2.MODEL_ACTION_PUBLISHED) -> None:
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka_bootstrap))
    try:
        bus.ensure_topics(topics.platform_topics(partitions=1))
        event = events_pb2.ModelEvent(action=action, version=common_pb2.ModelVersion(
            name=model_name, version=version, kind=common_pb2.MODEL_KIND_REWARD, uri=uri))
        bus.send(topics.MODELS, event.SerializeToString(), key=model_name.encode()).result(30)
    finally:
        bus.close(10)


def test_a_version_swap_under_load_drops_no_call(artifacts, kafka_bootstrap, redis_url, prometheus):
    config = make_config(artifacts, kafka_bootstrap, redis_url, score_cache_ttl_s=0)
    with reward_service(config) as (host, stub):
        stop = threading.Event()
        results, threads = call_in_a_loop(
            lambda w, i: stub.Score(request([ITEMS[(w + i) % len(ITEMS)]]), timeout=30).reward_model_version,
            stop, workers=4)
        try:
            wait_for(lambda: len(results) > 20, what="traffic on r1")
            answer = stub.LoadRewardModel(reward_pb2.LoadRewardModelRequest(
                version=common_pb2.ModelVersion(version="r2", uri="r2")), timeout=60)
            switched = time.monotonic()
            assert answer.version.version == "r2"
            wait_for(lambda: sum(1 for s, _, _ in list(results) if s > switched) > 20, what="traffic on r2")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        errors = [o for _, _, o in results if o.startswith("error")]
        assert not errors, errors[:5]
        assert {o for _, _, o in results} == {"r1", "r2"}
        after = [o for started, _, o in results if started > switched]
        assert after and set(after) == {"r2"}
        # r1 is drained and unloaded.
        wait_for(lambda: [v.version for v in stub.GetRewardModel(reward_pb2.GetRewardModelRequest()).loaded] == ["r2"],
                 what="r1 unloaded")
        # Scores are r2's own.
        assert stub.Score(request(ITEMS[:1])).scores[0] == pytest.approx(direct_scores(artifacts / "r2", ITEMS[:1])[0],
                                                                          abs=1e-5)
        with prometheus.target("reward-swap", f"127.0.0.1:{host.host.metrics_port}"):
            prometheus.wait_for('rlhf_reward_model_info{job="reward-swap",version="r2"} == 1')
            prometheus.wait_for('rlhf_reward_items_total{job="reward-swap",version="r2"} > 0')
            prometheus.wait_for('rlhf_reward_request_duration_seconds_count{job="reward-swap",version="r2"} > 0')
            prometheus.wait_for('rlhf_reward_score_count{job="reward-swap",version="r2"} > 0')
            prometheus.wait_for('rlhf_reward_batch_size_count{job="reward-swap",version="r2"} > 0')


def test_published_versions_are_followed_and_a_broken_one_is_not_switched_to(artifacts, kafka_bootstrap, redis_url):
    from rlhf.reward import metrics

    config = make_config(artifacts, kafka_bootstrap, redis_url, score_cache_ttl_s=0)
    with reward_service(config) as (_, stub):
        current = lambda: stub.GetRewardModel(reward_pb2.GetRewardModelRequest()).version.version  # noqa: E731
        assert current() == "r1"
        # 1. a published version on rlhf.models.v1 becomes current
        publish(kafka_bootstrap, config.model_name, "r2", "r2")
        wait_for(lambda: current() == "r2", what="r2 current")
        assert stub.Score(request(ITEMS[:1])).reward_model_version == "r2"
        # 2. a published version whose files are broken is not switched to; r2 keeps serving
        failed_before = metrics.VERSION_LOADS.labels("failed")._value.get()
        publish(kafka_bootstrap, config.model_name, "broken", "broken")
        wait_for(lambda: metrics.VERSION_LOADS.labels("failed")._value.get() > failed_before, what="a failed load")
        assert current() == "r2"
        assert stub.Score(request(ITEMS[:1])).reward_model_version == "r2"
        # 3. the same by hand: FAILED_PRECONDITION with the reason, nothing changes
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadRewardModel(reward_pb2.LoadRewardModelRequest(
                version=common_pb2.ModelVersion(version="broken", uri="broken")), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "broken" in err.value.details()
        assert current() == "r2"
        # 4. a rollback names a version already known: back to r1; other model names are ignored
        publish(kafka_bootstrap, config.model_name, "r1", "", action=events_pb2.MODEL_ACTION_ROLLED_BACK)
        publish(kafka_bootstrap, "another-reward-model", "r2", "r2")
        wait_for(lambda: current() == "r1", what="rollback to r1")
        assert stub.Score(request(ITEMS[:1])).reward_model_version == "r1"


def test_a_pinned_version_that_is_not_loaded_is_not_found(artifacts, kafka_bootstrap, redis_url):
    config = make_config(artifacts, kafka_bootstrap, redis_url, follow_model_events=False)
    with reward_service(config) as (_, stub):
        assert stub.Score(request(ITEMS[:1], version="r1")).reward_model_version == "r1"
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(ITEMS[:1], version="r9"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "r9" in err.value.details() and "r1" in err.value.details()


# --------------------------------------------------------------------------------------------- bad input, deadlines


def _item(**kw) -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(**kw)


LONG = "word " * (CONTEXT + 10)
INVALID = [
    (reward_pb2.ScoreRequest(), "items: must not be empty"),
    (reward_pb2.ScoreRequest(items=[_item(prompt="hi", response="ok")] * 9), "items: has 9 items; at most 8"),
    (reward_pb2.ScoreRequest(items=[_item(prompt="hi", response="ok"), _item(prompt="hi", response="")]),
     "items[1].response: must not be empty"),
    (reward_pb2.ScoreRequest(items=[_item(response="ok")]), "items[0].prompt: set prompt"),
    (reward_pb2.ScoreRequest(items=[_item(prompt="   ", response="ok")]), "items[0].prompt: must not be empty"),
    (reward_pb2.ScoreRequest(items=[_item(prompt="hi", response="ok"), _item(prompt="hi", response="ok"),
                                    _item(prompt="hi", response="ok"), _item(prompt="hi", response=LONG)]),
     "items[3].response: "),
    (reward_pb2.ScoreRequest(items=[_item(prompt=LONG, response="ok")]), "items[0].prompt: "),
    (reward_pb2.ScoreRequest(items=[_item(prompt="x" * 5000, response="ok")]), "items[0].prompt: is 5000 bytes"),
    (reward_pb2.ScoreRequest(items=[_item(response="ok", messages=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role="robot", content="hi")]))]), "items[0].messages.messages[0].role"),
    (reward_pb2.ScoreRequest(items=[_item(response="ok", messages=common_pb2.Conversation())]),
     "items[0].messages.messages: has 0 messages"),
]


def test_invalid_requests_name_the_field_and_the_item(artifacts, kafka_bootstrap, redis_url):
    config = make_config(artifacts, kafka_bootstrap, redis_url, max_items=8, max_queue=64, max_text_bytes=4096,
                         follow_model_events=False)
    with reward_service(config) as (_, stub):
        for bad, message in INVALID:
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(bad, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.value.details())
            assert err.value.details().startswith(message), (message, err.value.details())
        too_long = [d for b, d in INVALID if d == "items[3].response: "]
        assert too_long
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(INVALID[5][0])
        assert f"limit {CONTEXT}" in err.value.details() and "tokens" in err.value.details()
        # the service is fine afterwards
        assert stub.Score(request(ITEMS[:1])).scores


def test_the_deadline_is_honoured(artifacts, kafka_bootstrap, redis_url):
    # An engine that waits 3 s for a batch to fill: a call with a 0.5 s deadline ends at its deadline, not after.
    config = make_config(artifacts, kafka_bootstrap, redis_url, max_wait_s=3.0, score_cache_ttl_s=0,
                         follow_model_events=False)
    with reward_service(config) as (_, stub):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request([("a brand new prompt", "never scored before")]), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.5
