"""The reward service's batching engine: length buckets, oldest first, deadlines, cancellation, the queue bound, and
scores equal to the reward model's own forward pass whatever the batch."""
from __future__ import annotations

import asyncio

import pytest
import torch

from rlhf.core.models import ModelSize, RewardInput, build_causal_lm, build_reward_model
from rlhf.sim import world_texts
from rlhf.core.tokenizer import TokenizerConfig, format_prompt, train_tokenizer
from rlhf.reward.engine import EngineStopped, Expired, QueueFull, ScoringEngine, bucket_of


class LengthModel:
    """Scores an item by its length and records which lengths shared each forward pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def collate(self, rows):
        return {"lengths": torch.tensor([r.length for r in rows])}

    def __call__(self, lengths):
        self.batches.append(lengths.tolist())
        return lengths.float()


def item(length: int) -> RewardInput:
    return RewardInput({"input_ids": [1] * length}, 1)


def test_bucket_of_groups_lengths_within_the_ratio():
    assert [bucket_of(n, 2.0) for n in (1, 2, 3, 4, 7, 8, 15, 16)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert bucket_of(0, 2.0) == 0
    assert bucket_of(100, 10.0) == 2 and bucket_of(99, 10.0) == 1


def run(coro):
    return asyncio.run(coro)


def test_a_forward_pass_holds_one_bucket_oldest_first_up_to_the_batch_size():
    async def main():
        model = LengthModel()
        engine = ScoringEngine(model, loop=asyncio.get_running_loop(), max_batch_size=3, max_wait_s=0.2)
        lengths = [5, 40, 6, 7, 41, 4, 5]  # buckets 2, 5, 2, 2, 5, 2, 2
        futures = engine.submit([item(n) for n in lengths])
        scores = await asyncio.gather(*futures)
        engine.close()
        return model.batches, scores

    batches, scores = run(main())
    assert scores == [5.0, 40.0, 6.0, 7.0, 41.0, 4.0, 5.0]
    assert batches == [[5, 6, 7], [40, 41], [4, 5]]  # the oldest item's bucket first, at most 3 per pass
    for batch in batches:
        assert max(batch) < 2 * min(batch)  # padding below half of a pass


def test_expired_and_cancelled_items_are_not_scored():
    async def main():
        model = LengthModel()
        loop = asyncio.get_running_loop()
        engine = ScoringEngine(model, loop=loop, max_batch_size=8, max_wait_s=0.3)
        expired = engine.submit([item(3)], deadline=loop.time() - 1)  # time.monotonic() is the loop's clock
        cancelled = engine.submit([item(4)])
        kept = engine.submit([item(5)])
        cancelled[0].cancel()
        with pytest.raises(Expired):
            await expired[0]
        assert await kept[0] == 5.0
        engine.close()
        return model.batches

    assert run(main()) == [[5]]


def test_the_queue_is_bounded_and_close_fails_what_waits():
    async def main():
        model = LengthModel()
        engine = ScoringEngine(model, loop=asyncio.get_running_loop(), max_batch_size=8, max_wait_s=10.0,
                               max_queue=4)
        waiting = engine.submit([item(2)] * 3)
        with pytest.raises(QueueFull):
            engine.submit([item(2)] * 2)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        with pytest.raises(EngineStopped):
            engine.submit([item(2)])
        return results

    results = run(main())
    assert all(isinstance(r, EngineStopped) for r in results)


def test_scores_equal_the_reward_models_own_forward_pass_in_any_batch():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    backbone = build_causal_lm(tokenizer, ModelSize(arch="llama", n_layer=2, n_embd=32, n_head=2), seed=0)
    reward_model = build_reward_model(backbone, tokenizer)
    torch.nn.init.normal_(reward_model.model.score.weight)
    reward_model.eval()
    pairs = [("how do I cook rice", "boil it ."), ("plan a picnic", "bring food , a blanket and water to the park ."),
             ("fix a leaking tap", "turn off the water , then replace the washer and check the seal .")] * 3
    prompts = [format_prompt(tokenizer, p) for p, _ in pairs]
    alone = [float(reward_model.score([p], [r])[0]) for p, (_, r) in zip(prompts, pairs)]

    async def main():
        engine = ScoringEngine(reward_model, loop=asyncio.get_running_loop(), max_batch_size=16, max_wait_s=0.05,
                               bucket_ratio=8.0)  # one bucket: every length in one padded pass
        futures = engine.submit([reward_model.tokenize(p, r) for p, (_, r) in zip(prompts, pairs)])
        scores = await asyncio.gather(*futures)
        engine.close()
        return scores

    assert run(main()) == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_batched_tokenization_equals_the_cores_pair_encoding(kind):
    """RewardModel.tokenize_many (one tokenizer call per side) gives exactly what the trainers' encode_prompt_response
    gives item by item: prompt and response apart, eos after the response."""
    from rlhf.core.tokenizer import encode_prompt_response

    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind=kind, vocab_size=800))
    backbone = build_causal_lm(tokenizer, ModelSize(arch="gpt2", n_layer=1, n_embd=16, n_head=2), seed=0)
    reward_model = build_reward_model(backbone, tokenizer, max_length=12)
    prompts = [format_prompt(tokenizer, p) for p in ("how do I cook rice", "plan a picnic for my family today")]
    responses = ["boil it .", "bring food , a blanket and water to the park and find some shade near the lake ."]
    for truncate in (False, True):
        got = reward_model.tokenize_many(prompts, responses, truncate=truncate)
        for p, r, item in zip(prompts, responses, got):
            prompt_ids, response_ids = encode_prompt_response(tokenizer, p, r)
            want = prompt_ids + response_ids
            assert item.features["input_ids"] == (want[-12:] if truncate else want)
            assert item.prompt_tokens == len(prompt_ids)
