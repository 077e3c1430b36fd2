"""The reward service's fast input paths give exactly the core's texts, ids and tensors: formatting a call's items in
one chat-template call, tokenizing them in one backend call, padding a pass in one tensor per input; and the engine's
one-future-per-call path (order, cancellation, deadlines, shutdown)."""
from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch

from rlhf.core.models import ModelSize, build_causal_lm, build_reward_model
from rlhf.core.tokenizer import TokenizerConfig, format_chat, format_prompt, train_tokenizer
from rlhf.reward.engine import EngineStopped, Expired, ScoringEngine
from rlhf.reward.inputs import InputBuilder
from rlhf.reward.service import ValidItem
from rlhf.reward.versions import PROBE
from rlhf.serving.errors import InvalidArgument
from rlhf.sim import world_texts
from unit.test_reward_engine import LengthModel, item

PROMPTS = ["how do I cook rice", "plan a picnic for my family today", "  spaces  around  ", "émigré café naïve",
           "what is <|assistant|> here", ""]
RESPONSES = ["boil it .", "bring food , a blanket and water to the park and find some shade near the lake .",
             "x", "ünïcödé 🙂 text", "<|assistant|> twice <|assistant|>", "  "]


def reward_model(kind: str, n_embd: int = 16):
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind=kind, vocab_size=800))
    backbone = build_causal_lm(tokenizer, ModelSize(arch="llama", n_layer=1, n_embd=n_embd, n_head=2), seed=0)
    model = build_reward_model(backbone, tokenizer)
    torch.nn.init.normal_(model.model.score.weight)
    return model.eval()


@pytest.fixture(scope="module", params=["word", "bpe"])
def model(request):
    return reward_model(request.param)


def test_one_backend_call_gives_the_cores_ids(model):
    builder = InputBuilder(model)
    builder.check(PROBE)
    assert builder.fast_tokenize  # the path under test is the one taken
    prompts = [format_prompt(model.tokenizer, p) for p in PROMPTS]
    got = builder.tokenize_many(prompts, RESPONSES)
    want = model.tokenize_many(prompts, RESPONSES, truncate=False)
    assert [(g.features, g.prompt_tokens) for g in got] == [(w.features, w.prompt_tokens) for w in want]
    assert builder.tokenize_many([], []) == []


def test_a_backend_left_truncating_is_not_used(model):
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    other = copy.copy(model)
    other.tokenizer = tokenizer
    builder = InputBuilder(other)
    long = [format_prompt(tokenizer, PROMPTS[1])]
    got = builder.tokenize_many(long, [RESPONSES[1]])  # the core's path: every token, no truncation at 3
    assert got[0].length > 10
    assert got[0].features == model.tokenize_many(long, [RESPONSES[1]], truncate=False)[0].features


def test_the_check_switches_off_a_backend_that_differs(model):
    class WrongBackend:
        truncation = padding = None
        encode_special_tokens = False

        def encode_batch(self, texts, add_special_tokens):
            return [type("E", (), {"ids": [1]})() for _ in texts]

    builder = InputBuilder(model)
    builder._backend = lambda: WrongBackend()  # type: ignore[method-assign]
    builder.check(PROBE)
    assert not builder.fast_tokenize
    texts = [format_prompt(model.tokenizer, p) for p, _ in PROBE]
    responses = [r for _, r in PROBE]
    assert [g.features for g in builder.tokenize_many(texts, responses)] == [
        w.features for w in model.tokenize_many(texts, responses, truncate=False)]


def test_one_template_call_formats_like_the_core_and_names_a_rejected_item(model):
    tokenizer = model.tokenizer
    items = [ValidItem(p, (), r) for p, r in zip(PROMPTS, RESPONSES)]
    items.insert(2, ValidItem(None, (("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "rice?")),
                              "boil it ."))
    builder = InputBuilder(model)
    assert builder.batched_format
    want = [format_prompt(tokenizer, i.prompt) if i.prompt is not None
            else format_chat(tokenizer, [{"role": r, "content": c} for r, c in i.messages]) for i in items]
    assert builder.format_many(items) == want

    strict = copy.copy(model)
    strict.tokenizer = copy.deepcopy(tokenizer)
    strict.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(InvalidArgument) as e:
        InputBuilder(strict).format_many(items)
    assert "items[2].messages" in str(e.value)


def test_a_tokenizer_without_a_chat_template_formats_as_the_core():
    model = reward_model("word")
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.chat_template = None
    builder = InputBuilder(model)
    assert not builder.batched_format
    items = [ValidItem("how do I cook rice", (), "boil it ."), ValidItem(None, (("user", "hi"),), "hello")]
    assert builder.format_many(items) == ["how do I cook rice", "user: hi\nassistant:"]


def test_a_pass_pads_exactly_as_the_core_and_scores_the_same():
    model = reward_model("word", n_embd=32)
    prompts = [format_prompt(model.tokenizer, p) for p in PROMPTS]
    rows = model.tokenize_many(prompts, RESPONSES, truncate=False)

    async def main():
        engine = ScoringEngine(model, loop=asyncio.get_running_loop(), max_batch_size=16, max_wait_s=0.05,
                               bucket_ratio=100.0)  # one bucket: every length in one padded pass
        collated = engine._collate(rows)
        scores = await engine.submit_call(rows)
        engine.close()
        return collated, scores

    collated, scores = asyncio.run(main())
    want = model.collate(rows)
    assert set(collated) == set(want)
    for key in want:
        assert collated[key].dtype == want[key].dtype and torch.equal(collated[key], want[key])
    with torch.no_grad():
        assert scores == model(**want).float().tolist()


def test_one_future_per_call_resolves_in_item_order_across_passes_and_buckets():
    async def main():
        model = LengthModel()
        engine = ScoringEngine(model, loop=asyncio.get_running_loop(), max_batch_size=2, max_wait_s=0.2)
        lengths = [5, 40, 6, 7, 41, 4]
        scores = await engine.submit_call([item(n) for n in lengths])
        empty = await engine.submit_call([])
        engine.close()
        return model.batches, scores, empty

    batches, scores, empty = asyncio.run(main())
    assert scores == [5.0, 40.0, 6.0, 7.0, 41.0, 4.0] and empty == []
    assert batches == [[5, 6], [40, 41], [7, 4]]  # oldest bucket first, at most 2 per pass


def test_a_cancelled_call_leaves_the_queue_and_an_expired_one_fails():
    async def main():
        model = LengthModel()
        loop = asyncio.get_running_loop()
        engine = ScoringEngine(model, loop=loop, max_batch_size=8, max_wait_s=0.3)
        expired = engine.submit_call([item(3), item(3)], deadline=time.monotonic() - 1)
        cancelled = engine.submit_call([item(4), item(4)])
        kept = engine.submit_call([item(5)])
        cancelled.cancel()
        with pytest.raises(Expired):
            await expired
        assert await kept == [5.0]
        engine.close()
        return model.batches, engine.pending

    batches, pending = asyncio.run(main())
    assert batches == [[5]] and pending == 0


def test_close_fails_a_waiting_call():
    async def main():
        engine = ScoringEngine(LengthModel(), loop=asyncio.get_running_loop(), max_batch_size=8, max_wait_s=10.0)
        waiting = engine.submit_call([item(2)] * 3)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(EngineStopped):
            await waiting
        with pytest.raises(EngineStopped):
            engine.submit_call([item(2)])

    asyncio.run(main())
