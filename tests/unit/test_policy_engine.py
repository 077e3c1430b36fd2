"""The torch backend's continuous batcher on tiny models: rows batched together (and joining mid-batch) get exactly the
tokens core.generate gives each alone; slots, queue, cancellation, deadlines, max wait and failures."""
from __future__ import annotations

import asyncio
import inspect
import contextlib
import threading
import time

import pytest
import torch

from rlhf.core.generation import SamplingParams, encode_prompts, generate
from rlhf.core.models import ModelSize, build_causal_lm
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.policy.engine import CANCELLED, DEADLINE, ERROR, LENGTH, BatchEngine, EngineMetrics, QueueFull, Row

CORPUS = [
    "the cat sat on the mat .",
    "a dog ran to the park and back !",
    "hello world , how are you today ?",
    "the bird sang a song in the tree .",
] * 4
PROMPTS = ["the cat", "a dog ran to the", "hello", "the bird sang a song in the", "how are you", "the park",
           "world", "a song"]
TOKENIZER = train_tokenizer(CORPUS, TokenizerConfig(kind="word"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    size = ModelSize(arch=request.param, n_layer=2, n_embd=32, n_head=2, max_positions=128)
    return build_causal_lm(TOKENIZER, size, seed=7).eval()


class Recorder:
    """Prometheus-like children that remember what they were given."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.total = 0.0

    def set(self, value: float) -> None:
        self.values.append(value)

    def observe(self, value: float) -> None:
        self.values.append(value)

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount


def recording_metrics() -> EngineMetrics:
    return EngineMetrics(queue_depth=Recorder(), active_rows=Recorder(), batch_size=Recorder(), expired=Recorder(),
                         steps=Recorder())


def alone(model, prompt: str, params: SamplingParams, seed: int) -> tuple[list[int], str]:
    ids, mask = encode_prompts(TOKENIZER, [prompt])
    out = generate(model, ids, mask, params, eos_token_id=TOKENIZER.eos_token_id,
                   pad_token_id=TOKENIZER.pad_token_id, seeds=[seed])
    return out.response_ids[0, : int(out.lengths[0])].tolist(), out.finish_reasons[0]


class Collector:
    """A row's events, gathered on the loop; ``done`` resolves with (tokens, finish, events)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tokens: list[int] = []
        self.events = []
        self.done = loop.create_future()

    def __call__(self, event) -> None:
        self.events.append(event)
        self.tokens.extend(event.tokens)
        if event.finish is not None and not self.done.done():
            self.done.set_result((list(self.tokens), event.finish))


def make_row(loop, prompt: str, params: SamplingParams, seed: int, **kwargs) -> tuple[Row, Collector]:
    collector = Collector(loop)
    return Row(TOKENIZER(prompt)["input_ids"], params, seed, collector, **kwargs), collector


@contextlib.asynccontextmanager
async def running(model, **kwargs):
    engine = BatchEngine(model, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id,
                         loop=asyncio.get_running_loop(), **kwargs).start()
    try:
        yield engine
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)


SETTINGS = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 0, 1.0)]


def cases(settings) -> list[tuple[str, SamplingParams, int]]:
    return [
        (prompt, SamplingParams(max_new_tokens=4 + 3 * i, temperature=t, top_k=k, top_p=p), 1000 + 7 * i)
        for i, (prompt, (t, k, p)) in enumerate(zip(PROMPTS * 2, (settings * 16)[:16], strict=True))
    ]


def run_batched(model, rows, *, stagger_s: float, stream_every: int = 2, max_batch_size: int = 4):
    async def main():
        metrics = recording_metrics()
        loop = asyncio.get_running_loop()
        async with running(model, max_batch_size=max_batch_size, max_wait_s=0.002, metrics=metrics) as engine:
            collectors = []
            for i, (prompt, params, seed) in enumerate(rows):
                row, collector = make_row(loop, prompt, params, seed, stream=i % stream_every == 0)
                engine.submit([row])
                collectors.append(collector)
                if stagger_s:
                    await asyncio.sleep(stagger_s * (i % 3))  # some join a running batch, some arrive together
            results = await asyncio.wait_for(asyncio.gather(*(c.done for c in collectors)), 60)
        return results, metrics

    return asyncio.run(main())


def test_batched_rows_equal_each_row_alone(model):
    rows = cases(SETTINGS)
    results, metrics = run_batched(model, rows, stagger_s=0.002)
    expected = [alone(model, *row) for row in rows]
    assert [(tokens, finish) for tokens, finish in results] == expected
    assert max(metrics.batch_size.values) > 1, "rows were never decoded together"
    assert max(metrics.active_rows.values) <= 4
    assert metrics.active_rows.values[-1] == 0 and metrics.queue_depth.values[-1] == 0


def test_batched_rows_with_top_k_top_p_equal_each_row_alone(model):
    rows = cases([(1.0, 0, 1.0), (0.8, 5, 1.0), (1.2, 0, 0.9), (1.0, 3, 0.8), (0.0, 0, 1.0)])
    results, _ = run_batched(model, rows, stagger_s=0.002)
    assert [tuple(r) for r in results] == [tuple(alone(model, *row)) for row in rows]


def test_idle_engine_waits_max_wait_for_company(model):
    async def main():
        loop = asyncio.get_running_loop()
        metrics = recording_metrics()
        async with running(model, max_batch_size=8, max_wait_s=0.3, metrics=metrics) as engine:
            collectors = []
            for i in range(4):
                row, c = make_row(loop, PROMPTS[i], SamplingParams(max_new_tokens=3, temperature=0), i)
                engine.submit([row])
                collectors.append(c)
                await asyncio.sleep(0.01)
            await asyncio.gather(*(c.done for c in collectors))
        return metrics.batch_size.values

    sizes = asyncio.run(main())
    assert sizes[0] == 4, f"the first decode step had {sizes[0]} rows; the 4 rows arrived within max_wait"


def test_cancel_frees_the_slot_and_the_queue(model):
    async def main():
        loop = asyncio.get_running_loop()
        metrics = recording_metrics()
        async with running(model, max_batch_size=1, max_wait_s=0, metrics=metrics) as engine:
            long, long_c = make_row(loop, "hello", SamplingParams(max_new_tokens=100, temperature=1.0), 1, stream=True)
            waiting, waiting_c = make_row(loop, "the cat", SamplingParams(max_new_tokens=3, temperature=0), 2)
            engine.submit([long])
            while not long_c.events:
                await asyncio.sleep(0.001)
            engine.submit([waiting])
            assert engine.queue_depth == 1  # no free slot: it waits
            engine.cancel([waiting])  # leaves the queue at once
            assert engine.queue_depth == 0
            assert (await waiting_c.done) == ([], CANCELLED)
            engine.cancel([long])
            tokens, finish = await long_c.done
            assert finish in (CANCELLED, "stop", LENGTH)
            after, after_c = make_row(loop, "the cat", SamplingParams(max_new_tokens=3, temperature=0), 2)
            engine.submit([after])
            return await after_c.done, engine.active_rows, engine.queue_depth

    (tokens, finish), active, depth = asyncio.run(main())
    assert 0 < len(tokens) <= 3 and active == 0 and depth == 0


def test_row_whose_deadline_passed_in_the_queue_is_not_generated(model):
    async def main():
        loop = asyncio.get_running_loop()
        metrics = recording_metrics()
        async with running(model, max_batch_size=1, max_wait_s=0, metrics=metrics) as engine:
            blocker, blocker_c = make_row(loop, "hello", SamplingParams(max_new_tokens=20, temperature=1.0), 3,
                                          stream=True)
            engine.submit([blocker])
            while not blocker_c.events:
                await asyncio.sleep(0.001)
            late, late_c = make_row(loop, "the cat", SamplingParams(max_new_tokens=5, temperature=0), 4,
                                    deadline=time.monotonic() + 0.001)  # < the blocker's 19 tokens left
            engine.submit([late])
            await asyncio.sleep(0.05)
            engine.cancel([blocker])
            return await late_c.done, metrics.expired.total

    (tokens, finish), expired = asyncio.run(main())
    assert (tokens, finish, expired) == ([], DEADLINE, 1)


def test_full_queue_refuses_rows(model):
    async def main():
        loop = asyncio.get_running_loop()
        engine = BatchEngine(model, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id,
                             loop=loop, max_queue=2)  # not started: rows stay queued
        rows = [make_row(loop, "hello", SamplingParams(max_new_tokens=2), i)[0] for i in range(3)]
        engine.submit(rows[:2])
        with pytest.raises(QueueFull):
            engine.submit(rows[2:])

    asyncio.run(main())


class Flaky(torch.nn.Module):
    """Wraps a model; its forward fails once when ``fail`` is set. Build it with :func:`flaky`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model
        self.fail = threading.Event()

    def forward(self, *args, **kwargs):
        if self.fail.is_set():
            self.fail.clear()
            raise RuntimeError("simulated device error")
        return self.inner(*args, **kwargs)


def flaky(model) -> Flaky:
    """A Flaky whose forward has the wrapped model's signature: forward_spec reads it (per class) to name the cache
    argument, which transformers renamed (past_key_values -> cache in 5.24)."""
    def forward(self, *args, **kwargs):
        return Flaky.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(type(model).forward)
    return type(f"Flaky{type(model).__name__}", (Flaky,), {"forward": forward})(model)


def test_a_failed_forward_fails_its_rows_and_the_engine_goes_on(model):
    flaky_model = flaky(model)

    async def main():
        loop = asyncio.get_running_loop()
        async with running(flaky_model, max_batch_size=4) as engine:
            flaky_model.fail.set()
            row, c = make_row(loop, "hello", SamplingParams(max_new_tokens=3, temperature=0), 1)
            engine.submit([row])
            failed = await c.done
            row, c = make_row(loop, "hello", SamplingParams(max_new_tokens=3, temperature=0), 1)
            engine.submit([row])
            return failed, await c.done, c.events[-1]

    failed, ok, last = asyncio.run(main())
    assert failed == ([], ERROR)
    assert ok == alone(model, "hello", SamplingParams(max_new_tokens=3, temperature=0), 1)
    assert last.first_token_at is not None
