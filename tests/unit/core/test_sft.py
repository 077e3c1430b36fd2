"""Supervised fine-tuning: prompt tokens get no loss, and a tiny run changes every parameter and lowers the loss."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.models import ModelSize, build_causal_lm
from rlhf.core.sft import IGNORE_INDEX, SFTConfig, build_lm_batch, build_sft_batch, pretrain, train_sft
from rlhf.sim import make_demonstrations, split_prompts, world_texts
from rlhf.core.tokenizer import format_prompt, train_tokenizer

MICRO = ModelSize(n_layer=1, n_embd=32, n_head=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_texts())


def test_prompt_tokens_get_no_loss(tokenizer):
    prompts = [format_prompt(tokenizer, "How do I cook rice?"), format_prompt(tokenizer, "Briefly, how do I bake bread?")]
    responses = ["Read the whole recipe before you start.", "Heat the pan before you add the food. I hope this helps."]
    batch = build_sft_batch(tokenizer, prompts, responses)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1  # + eos
        labels = batch.labels[row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt : n_prompt + n_response], batch.input_ids[row, n_prompt : n_prompt + n_response])
        assert labels[n_prompt + n_response - 1] == tokenizer.eos_token_id
        assert (labels[n_prompt + n_response :] == IGNORE_INDEX).all()  # padding
        assert batch.attention_mask[row].sum() == n_prompt + n_response
    assert batch.num_target_tokens == sum(
        len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in responses
    )


def test_loss_ignores_prompt_tokens(tokenizer):
    """Changing the prompt's labels could not matter: the loss equals a cross-entropy over response tokens only."""
    model = build_causal_lm(tokenizer, MICRO).eval()
    batch = build_sft_batch(tokenizer, [format_prompt(tokenizer, "How do I cook rice?")], ["Read the label on the bottle."])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    targets = batch.labels[0, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[0, :-1][keep], targets[keep])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_lm_batch_labels_every_token(tokenizer):
    batch = build_lm_batch(tokenizer, ["How do I cook rice?"])
    assert batch.input_ids[0, 0] == tokenizer.bos_token_id and batch.input_ids[0, -1] == tokenizer.eos_token_id
    assert torch.equal(batch.labels, batch.input_ids)


def test_tiny_sft_run_changes_every_parameter_and_lowers_loss(tokenizer):
    torch.manual_seed(0)
    model = build_causal_lm(tokenizer, MICRO)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, _ = split_prompts()
    demos = make_demonstrations(train, 64, seed=0)
    result = train_sft(model, tokenizer, demos, SFTConfig(num_steps=30, batch_size=16, learning_rate=1e-2,
                                                          warmup_steps=2), progress=False)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    assert result.final_loss(window=5) < 0.7 * result.first_loss


def test_pretrain_lowers_loss(tokenizer):
    model = build_causal_lm(tokenizer, MICRO)
    result = pretrain(model, tokenizer, world_texts()[:64], SFTConfig(num_steps=20, batch_size=16, learning_rate=3e-3,
                                                                       warmup_steps=2), progress=False)
    assert result.final_loss(window=5) < 0.8 * result.first_loss


def test_too_long_prompt_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        build_sft_batch(tokenizer, [format_prompt(tokenizer, "How do I cook rice?")], ["x"], max_length=4)
