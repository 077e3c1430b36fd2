"""The KV-cached decoding loop: HF greedy equivalence, per-row seeds, stopping, sampling filters, the step API."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.generation import (
    GenerationOutput,
    SamplingParams,
    RowParams,
    sample_tokens,
    decode_responses,
    encode_prompts,
    generate,
    generate_steps,
)
from rlhf.core.masking import response_mask
from unit.core.ppo_testing import one_torch_thread, EOS_ID, PAD_ID, PROMPTS, tiny_gpt2, tiny_llama, tiny_tokenizer

TOKENIZER = tiny_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(seed=3)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=4)


def run(model, prompts, params, seeds=None, **kwargs) -> GenerationOutput:
    ids, mask = encode_prompts(TOKENIZER, prompts)
    return generate(model, ids, mask, params, eos_token_id=EOS_ID, pad_token_id=PAD_ID, seeds=seeds, **kwargs)


def test_encode_prompts_left_pads():
    ids, mask = encode_prompts(TOKENIZER, ["hello", "the cat sat"])
    assert ids.tolist() == [[PAD_ID, PAD_ID] + TOKENIZER("hello")["input_ids"], TOKENIZER("the cat sat")["input_ids"]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_greedy_equals_hf_generate(which, request):
    model = request.getfixturevalue(which)
    ids, mask = encode_prompts(TOKENIZER, PROMPTS)
    ours = generate(model, ids, mask, SamplingParams(max_new_tokens=10, temperature=0), eos_token_id=EOS_ID,
                    pad_token_id=PAD_ID)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID)[:, ids.shape[1]:]
    assert torch.equal(ours.response_ids, hf[:, : ours.response_ids.shape[1]])
    assert torch.all(hf[:, ours.response_ids.shape[1]:] == PAD_ID)


def test_a_rows_output_depends_only_on_its_seed_and_prompt(gpt2):
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, top_p=0.95)
    together = run(gpt2, PROMPTS, params, seeds=list(range(100, 100 + len(PROMPTS))))
    for row in (0, 1, 5):
        alone = run(gpt2, [PROMPTS[row]], params, seeds=[100 + row])
        n = int(alone.lengths[0])
        assert together.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert together.finish_reasons[row] == alone.finish_reasons[0]
    # the same row again, now between other prompts in another order
    shuffled = [PROMPTS[3], PROMPTS[0], PROMPTS[7]]
    again = run(gpt2, shuffled, params, seeds=[7, 100, 8])
    n = int(again.lengths[1])
    assert again.response_ids[1, :n].tolist() == together.response_ids[0, :n].tolist()


def test_seeds_matter_and_repeat(gpt2):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    a = run(gpt2, PROMPTS, params, seeds=[1] * 8)
    b = run(gpt2, PROMPTS, params, seeds=[1] * 8)
    c = run(gpt2, PROMPTS, params, seeds=[2] * 8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_finished_rows_emit_pad_and_report_why(gpt2):
    out = run(gpt2, PROMPTS * 4, SamplingParams(max_new_tokens=16, temperature=1.5), seeds=list(range(32)))
    assert out.response_ids.shape[1] <= 16
    assert set(out.finish_reasons) == {"stop", "length"}, "the test wants both kinds of ending; change the seeds"
    for row, reason in enumerate(out.finish_reasons):
        n = int(out.lengths[row])
        assert out.response_mask[row, :n].all() and not out.response_mask[row, n:].any()
        assert torch.all(out.response_ids[row, n:] == PAD_ID)
        if reason == "stop":
            assert out.response_ids[row, n - 1] == EOS_ID
            assert EOS_ID not in out.response_ids[row, : n - 1].tolist()
        else:
            assert n == 16 and EOS_ID not in out.response_ids[row].tolist()


def test_mask_agrees_with_response_mask_when_pad_is_eos(gpt2):
    ids, mask = encode_prompts(TOKENIZER, PROMPTS * 4)
    out = generate(gpt2, ids, mask, SamplingParams(max_new_tokens=16, temperature=1.5), eos_token_id=EOS_ID,
                   pad_token_id=EOS_ID, seeds=list(range(32)))
    assert torch.equal(out.response_mask, response_mask(out.response_ids, EOS_ID, EOS_ID))


def test_stop_token_ids_end_a_row(gpt2):
    greedy = run(gpt2, PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0))
    stop_at = int(greedy.response_ids[0, 2])
    first = greedy.response_ids[0].tolist().index(stop_at)
    out = run(gpt2, PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop_at,)))
    assert out.finish_reasons == ["stop"]
    assert out.response_ids[0, : first + 1].tolist() == greedy.response_ids[0, : first + 1].tolist()
    assert int(out.lengths[0]) == first + 1


def test_per_row_params(gpt2):
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    sampled = SamplingParams(max_new_tokens=3, temperature=1.0)
    mixed = run(gpt2, PROMPTS[:2], [greedy, sampled], seeds=[0, 0])
    alone = run(gpt2, PROMPTS[:1], greedy)
    n = int(alone.lengths[0])
    assert mixed.response_ids[0, :n].tolist() == alone.response_ids[0, :n].tolist()
    assert int(mixed.lengths[1]) <= 3


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=8, top_k=1),
                                    SamplingParams(max_new_tokens=8, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(gpt2, params):
    greedy = run(gpt2, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    assert torch.equal(run(gpt2, PROMPTS, params, seeds=list(range(8))).response_ids, greedy.response_ids)


def test_step_api_yields_what_generate_returns(gpt2):
    params = SamplingParams(max_new_tokens=10, temperature=1.2)
    ids, mask = encode_prompts(TOKENIZER, PROMPTS)
    seeds = list(range(8))
    steps = list(generate_steps(gpt2, ids, mask, params, eos_token_id=EOS_ID, pad_token_id=PAD_ID, seeds=seeds))
    out = generate(gpt2, ids, mask, params, eos_token_id=EOS_ID, pad_token_id=PAD_ID, seeds=seeds)
    assert [s.index for s in steps] == list(range(len(steps)))
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), out.response_ids)
    assert torch.equal(torch.stack([s.emitted for s in steps], 1), out.response_mask)
    assert steps[-1].finish_reasons() == out.finish_reasons
    assert steps[-1].finished.all() and not steps[0].finished.all()
    # a row is reported finished from the step of its last token on, and emits nothing after it
    for row in range(8):
        n = int(out.lengths[row])
        assert [bool(s.finished[row]) for s in steps] == [t >= n - 1 for t in range(len(steps))]


def test_stopping_the_iteration_early_is_fine(gpt2):
    ids, mask = encode_prompts(TOKENIZER, PROMPTS)
    it = generate_steps(gpt2, ids, mask, SamplingParams(max_new_tokens=50), eos_token_id=None, pad_token_id=PAD_ID)
    first = next(it)
    it.close()
    assert first.tokens.shape == (8,)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_logprobs_match_a_full_forward(gpt2):
    params = SamplingParams(max_new_tokens=8, temperature=0.7)
    ids, mask = encode_prompts(TOKENIZER, PROMPTS)
    out = generate(gpt2, ids, mask, params, eos_token_id=EOS_ID, pad_token_id=PAD_ID, seeds=list(range(8)),
                   return_logprobs=True)
    full = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, out.response_mask.long()], 1)
    with torch.no_grad():
        logits = gpt2(full, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
    t = out.response_ids.shape[1]
    ref = torch.log_softmax(logits[:, -t - 1 : -1] / 0.7, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    ref = torch.where(out.response_mask, ref, torch.zeros(()))
    torch.testing.assert_close(out.logprobs, ref, atol=1e-4, rtol=1e-4)


def test_outputs_are_ordinary_tensors(gpt2):
    out = run(gpt2, PROMPTS, SamplingParams(max_new_tokens=4), seeds=list(range(8)), return_logprobs=True)
    assert not out.response_ids.is_inference() and not out.logprobs.is_inference()
    emb = gpt2.get_input_embeddings()(out.response_ids)  # autograd may save these indices
    assert emb.requires_grad


def test_decode_responses_drops_eos_and_padding(gpt2):
    out = run(gpt2, PROMPTS * 2, SamplingParams(max_new_tokens=12, temperature=1.5), seeds=list(range(16)))
    texts = decode_responses(TOKENIZER, out)
    assert len(texts) == 16 and all("<eos>" not in t and "<pad>" not in t for t in texts)


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    batch = logits.expand(n, -1)

    def frequencies(params: SamplingParams) -> torch.Tensor:
        rows = RowParams.build([params] * n, 5, torch.device("cpu"))
        tokens, _ = sample_tokens(batch, rows, uniforms, want_logprobs=False)
        return torch.bincount(tokens, minlength=5).float() / n

    probs = torch.softmax(logits / 0.8, 0)
    torch.testing.assert_close(frequencies(SamplingParams(temperature=0.8)), probs, atol=0.01, rtol=0)
    top2 = torch.zeros(5)
    top2[:2] = torch.softmax(logits[:2], 0)
    torch.testing.assert_close(frequencies(SamplingParams(top_k=2)), top2, atol=0.01, rtol=0)
    # top_p = 0.8: tokens 0 (p = 0.563) and 1 (0.207) hold 0.770 < 0.8, so the next, 4 (0.126), joins; 2 and 3 not.
    p = torch.softmax(logits, 0)
    nucleus = torch.where(torch.tensor([1, 1, 0, 0, 1]).bool(), p, torch.zeros(()))
    torch.testing.assert_close(frequencies(SamplingParams(top_p=0.8)), nucleus / nucleus.sum(), atol=0.01, rtol=0)


def test_bad_inputs_say_what_to_do(gpt2):
    with pytest.raises(ValueError, match="left-padded"):
        generate(gpt2, torch.tensor([[5, 6, PAD_ID]]), torch.tensor([[1, 1, 0]]), SamplingParams(),
                 eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="seeds"):
        run(gpt2, PROMPTS[:2], SamplingParams(), seeds=[1])


def test_plain_rows_do_not_depend_on_filtered_neighbours():
    """A row without top-k/top-p samples the same tokens whether or not another row of its batch is filtered."""
    import torch

    from rlhf.core.generation import SamplingParams, generate
    from unit.core.ppo_testing import EOS_ID, PAD_ID, tiny_gpt2

    model = tiny_gpt2(seed=3)
    ids = torch.tensor([[EOS_ID, 5, 6, 7]] * 4)
    mask = torch.ones_like(ids)
    plain = SamplingParams(max_new_tokens=12, temperature=1.0)
    filtered = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=5, top_p=0.8)
    common = dict(eos_token_id=EOS_ID, pad_token_id=PAD_ID, seeds=[11, 12, 13, 14])
    alone = generate(model, ids, mask, [plain] * 4, **common)
    mixed = generate(model, ids, mask, [plain, filtered, plain, filtered], **common)
    for row in (0, 2):
        assert torch.equal(alone.response_ids[row], mixed.response_ids[row])
