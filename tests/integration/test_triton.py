"""The policy on a real Triton Inference Server: deploy/local/triton.py starts tritonserver (PyPI nvidia-pytriton's
binary, CPU only) on free ports with a copy of deploy/triton/model_repository; rlhf.policy.triton_client talks to it.

What is proven: Triton's text equals in-process ``rlhf.core.generation`` for the same (prompt, seed, params); the
dynamic batcher really forms batches; the decoupled model streams deltas that add up to the unary text; a new version
loads under a new name while traffic flows and the old one unloads with zero failed requests; the Prometheus endpoint
answers.

The first run installs the server (about 15 s and 250 MB under ~/.cache/rlhf); later runs reuse it. The tests share one
server and run in file order: the version swap, which unloads policy__v1, comes last.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from pathlib import Path

import pytest

from rlhf.core.generation import SamplingParams, decode_responses, encode_prompts, generate
from rlhf.core.models import ModelSize, build_causal_lm, load_causal_lm
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.policy.triton_client import GenerationRequest, TritonClientError, TritonPolicyClient, version_model_name
from support.triton import TRITON_MARKS, running_triton

pytestmark = TRITON_MARKS

V1, V2 = version_model_name("v1"), version_model_name("v2")
STREAM_V1 = version_model_name("v1", streaming=True)
# One torch thread per model instance: three stub processes share the machine's cores with the test itself.
MODEL_PARAMETERS = {"torch_num_threads": "1"}

CORPUS = [
    "the cat sat on the mat .",
    "a dog ran to the park and back !",
    "hello world , how are you today ?",
    "the bird sang a song in the tree .",
] * 4
PROMPTS = ["the cat", "a dog ran", "hello", "the bird sang a", "how are you", "the park", "world", "a song"]


def build_versions(root: Path) -> None:
    """Two random-init 2-layer GPT-2 versions (different seeds) with one small word-level tokenizer."""
    tokenizer = train_tokenizer(CORPUS, TokenizerConfig(kind="word"))
    size = ModelSize(arch="gpt2", n_layer=2, n_embd=32, n_head=2, max_positions=128)
    for name, seed in (("v1", 1), ("v2", 2)):
        model = build_causal_lm(tokenizer, size, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """The running server: {"grpc": host:port, "metrics": url, "models": model root}, with v1 loaded (unary and
    streaming)."""
    tmp = tmp_path_factory.mktemp("triton")
    models = tmp / "models"
    build_versions(models)
    with running_triton(tmp, models) as server:
        async def load() -> None:
            async with TritonPolicyClient(server["grpc"], template_repository=server["templates"]) as client:
                await asyncio.gather(
                    client.load_version(V1, "v1", parameters=MODEL_PARAMETERS),
                    client.load_version(STREAM_V1, "v1", streaming=True, parameters=MODEL_PARAMETERS),
                )

        asyncio.run(load())
        yield {**server, "models": models}


def client_for(server) -> TritonPolicyClient:
    return TritonPolicyClient(server["grpc"], template_repository=server["templates"])


def in_process(model_dir: Path, requests: list[GenerationRequest]) -> list[tuple[str, str, int]]:
    """(text, finish reason, completion tokens) per request, each generated alone with rlhf.core.generation."""
    model, tokenizer = load_causal_lm(str(model_dir))
    model.eval()
    results = []
    for r in requests:
        input_ids, attention_mask = encode_prompts(tokenizer, [r.prompt])
        params = SamplingParams(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p
        )
        out = generate(
            model, input_ids, attention_mask, params,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seeds=[r.seed],
        )
        results.append((decode_responses(tokenizer, out)[0], out.finish_reasons[0], int(out.lengths[0])))
    return results


def requests_with(settings: list[tuple[float, int, float]]) -> list[GenerationRequest]:
    """Eight rows with different prompts, seeds and lengths, cycling through (temperature, top_k, top_p) settings."""
    return [
        GenerationRequest(prompt, max_new_tokens=6 + 2 * i, temperature=t, top_k=k, top_p=p, seed=1000 + 7 * i)
        for i, (prompt, (t, k, p)) in enumerate(zip(PROMPTS, (settings * 8)[: len(PROMPTS)], strict=True))
    ]


def triton_matches_in_process(server, requests: list[GenerationRequest]) -> None:
    async def run():
        async with client_for(server) as client:
            return await client.generate(V1, requests)

    results = asyncio.run(run())
    expected = in_process(server["models"] / "v1", requests)
    got = [(r.text, r.finish_reason, r.completion_tokens) for r in results]
    assert got == expected
    assert all(len(r.token_ids) == r.completion_tokens and r.prompt_tokens > 0 for r in results)


def test_concurrent_requests_match_in_process_generation(triton):
    """Rows that the dynamic batcher puts together, greedy and sampled at several temperatures."""
    triton_matches_in_process(triton, requests_with([(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 0, 1.0)]))


def test_concurrent_requests_with_top_k_top_p_match_in_process_generation(triton):
    """Rows with top-k / top-p batched with rows without: each still gets the text it gets alone."""
    triton_matches_in_process(
        triton, requests_with([(1.0, 0, 1.0), (0.8, 5, 1.0), (1.2, 0, 0.9), (1.0, 3, 0.8), (0.0, 0, 1.0)])
    )


def test_dynamic_batching_forms_batches(triton):
    requests = [GenerationRequest(p, max_new_tokens=8, seed=i) for i, p in enumerate(PROMPTS * 2)]

    async def run():
        async with client_for(triton) as client:
            rows0, executions0 = await client.batch_statistics(V1)
            await client.generate(V1, requests)
            rows1, executions1 = await client.batch_statistics(V1)
        return rows1 - rows0, executions1 - executions0

    rows, executions = asyncio.run(run())
    assert rows == len(requests)
    assert executions < rows, f"{rows} concurrent requests ran in {executions} executions: no batch was formed"


def test_bad_request_fails_alone(triton):
    good = GenerationRequest("the cat", max_new_tokens=4, seed=1)
    bad = [
        GenerationRequest("the cat", top_p=0.0),  # out of (0, 1]
        GenerationRequest("the cat", max_new_tokens=500),  # beyond the 128-token context
        GenerationRequest(""),  # no tokens
    ]

    async def run():
        async with client_for(triton) as client:
            return await asyncio.gather(*(client.generate(V1, [r]) for r in [good, *bad]), return_exceptions=True)

    first, *errors = asyncio.run(run())
    assert first[0].completion_tokens == 4
    for error in errors:
        assert isinstance(error, TritonClientError) and error.status == "INVALID_ARGUMENT", error


def test_stream_adds_up_to_the_unary_text(triton):
    candidates = [GenerationRequest("the bird sang a", max_new_tokens=20, seed=seed) for seed in range(8)]

    async def run():
        async with client_for(triton) as client:
            # A random model often ends at once; stream a request whose answer has a few words.
            answers = await client.generate(V1, candidates)
            unary, request = max(zip(answers, candidates, strict=True), key=lambda pair: len(pair[0].text))
            chunks = [c async for c in client.stream(STREAM_V1, request)]
            # Leaving a stream early cancels it; the model serves the next one as usual.
            long_request = GenerationRequest("hello", max_new_tokens=100)
            async with contextlib.aclosing(client.stream(STREAM_V1, long_request)) as stream:
                async for _ in stream:
                    break
            after = [c async for c in client.stream(STREAM_V1, request)]
        return chunks, unary, after

    chunks, unary, after = asyncio.run(run())
    assert len(chunks) >= 3, chunks
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.text_delta for c in chunks) == unary.text
    assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].completion_tokens == unary.completion_tokens
    assert after == chunks


def test_prometheus_metrics_endpoint(triton):
    with urllib.request.urlopen(triton["metrics"], timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf'^nv_inference_request_success\{{model="{V1}",version="1"\}} (\d+)', text, re.M)
    assert match and int(match.group(1)) > 0, "no nv_inference_request_success for policy__v1"


def test_version_swap_under_traffic_has_no_failures(triton):
    """Load v2 under a new name while three clients keep asking, switch, drain v1, unload it: no request fails."""

    async def run():
        async with client_for(triton) as client:
            current = V1
            served = {V1: 0, V2: 0}
            in_flight = {V1: 0, V2: 0}
            failures: list[str] = []
            stop = asyncio.Event()

            async def traffic(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    name = current  # routing: read once per request, as the service will
                    in_flight[name] += 1
                    try:
                        await client.generate(name, [GenerationRequest("the cat", max_new_tokens=6, seed=worker + i)])
                        served[name] += 1
                    except TritonClientError as e:
                        failures.append(f"{name}: {e}")
                    finally:
                        in_flight[name] -= 1
                    i += 1
                    await asyncio.sleep(0.02)  # steady traffic that leaves the CPU to the loading model too

            workers = [asyncio.create_task(traffic(w * 1000)) for w in range(3)]
            await asyncio.sleep(0.5)
            await client.load_version(V2, "v2", parameters=MODEL_PARAMETERS)
            assert await client.is_ready(V2)
            current = V2
            while in_flight[V1]:  # drain: the requests already routed to v1 finish there
                await asyncio.sleep(0.01)
            await client.unload(V1)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            return served, failures, await client.is_ready(V1), await client.loaded_models()

    served, failures, v1_ready, loaded = asyncio.run(run())
    assert failures == []
    assert served[V1] > 0 and served[V2] > 0, served
    assert not v1_ready
    assert V1 not in loaded and V2 in loaded
