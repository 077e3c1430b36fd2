"""LoRA through peft (`--lora-rank`): only adapter parameters change, the merged model gives the logits of base +
adapter, and PPO's reference is the base with the adapters switched off (no copy; the adapters stay trainable)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.cli import main
from support import tiny_checkpoints as tc

import peft  # noqa: E402 - the test extra installs it; a missing peft fails here, it is never skipped

COMMON = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(keep_torch_threads):
    yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    tc.llama_chatml(root / "llama")
    tc.write_data(root, 32, 32, 16)
    return root


@pytest.fixture(scope="module")
def lora_sft(work) -> Path:
    out = work / "sft-lora"
    assert main([str(a) for a in ["sft", "--model", work / "llama", "--data", work / "demos.jsonl", "--out", out,
                                  "--num-steps", "10", "--batch-size", "8", "--learning-rate", "1e-2",
                                  "--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules",
                                  "q_proj,v_proj,up_proj", "--merge", *COMMON]]) == 0
    return out


def test_only_adapter_parameters_change(work, lora_sft):
    base = load_file(work / "llama" / "model.safetensors")
    trained = torch.load(lora_sft / "checkpoint" / "trainer_state.pt", weights_only=False)["model"]
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and all(any(m in k for m in ("q_proj", "v_proj", "up_proj")) for k in lora_keys)
    assert any(float(trained[k].abs().max()) > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0
    compared = 0
    for key, value in trained.items():
        if "lora_" in key:
            continue
        name = key.replace(".base_layer", "")
        if name in base:
            torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=name)
            compared += 1
    assert compared == len([k for k in trained if "lora_" not in k]) - ("lm_head.weight" in trained
                                                                         and "lm_head.weight" not in base)


def test_merged_model_gives_base_plus_adapter_logits(work, lora_sft):
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(lora_sft).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(work / "llama")
        adapted = peft.PeftModel.from_pretrained(base, lora_sft / "adapter").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(work / "llama").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert float((merged - plain).abs().max()) > 1e-3  # the adapter did something


def test_adapter_disabled_reference_is_the_base_and_leaves_the_adapters_trainable(work):
    from rlhf.core.ppo import PPOConfig, PPOTrainer
    from rlhf.train.lora import AdapterDisabled, add_adapters, inner_model

    base = AutoModelForCausalLM.from_pretrained(work / "llama")
    plain = AutoModelForCausalLM.from_pretrained(work / "llama").eval()
    peft_model = add_adapters(base, 4, 8.0, (), "causal")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 17, 33]])
    ref = AdapterDisabled(peft_model)
    trainer = PPOTrainer(PPOConfig(batch_size=2, num_mini_batches=1), inner_model(peft_model), ref,
                         AutoTokenizerLike(), lambda p, r: torch.zeros(len(r)), ["a", "b"])
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    assert not list(trainer.ref_policy.parameters())  # holds no weights of its own
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, plain(ids).logits, atol=1e-6, rtol=0)
        assert float((inner_model(peft_model)(input_ids=ids).logits - plain(ids).logits).abs().max()) > 1e-3


class AutoTokenizerLike:
    """What PPOTrainer reads of a tokenizer when it is not asked to generate."""

    eos_token_id = 3
    pad_token_id = 3


def test_lora_reward_model_and_ppo_run_and_save_merged(work, lora_sft):
    from transformers import AutoModelForSequenceClassification

    rm_out, ppo_out = work / "rm-lora", work / "ppo-lora"
    assert main([str(a) for a in ["rm", "--model", work / "llama", "--data", work / "pairs.jsonl", "--out", rm_out,
                                  "--num-epochs", "2", "--batch-size", "8", "--learning-rate", "1e-2",
                                  "--lora-rank", "4", "--merge", *COMMON]]) == 0
    assert AutoModelForSequenceClassification.from_pretrained(rm_out).config.num_labels == 1
    assert main([str(a) for a in ["ppo", "--policy", lora_sft, "--reward-model", rm_out, "--prompts",
                                  work / "prompts.jsonl", "--out", ppo_out, "--steps", "2", "--batch-size", "4",
                                  "--num-mini-batches", "2", "--response-length", "6", "--lora-rank", "4",
                                  *COMMON]]) == 0
    assert (ppo_out / "adapter_config.json").exists() and (ppo_out / "adapter" / "adapter_model.safetensors").exists()
    model = peft.AutoPeftModelForCausalLM.from_pretrained(ppo_out)
    assert model is not None
