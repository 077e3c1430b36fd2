"""Models: building from a named size, the frozen reference, the reward model, save/load with a manifest."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf.core.models import (
    MANIFEST_FILE,
    SIZES,
    Manifest,
    ModelSize,
    build_causal_lm,
    build_reward_model,
    count_parameters,
    frozen_copy,
    load_artifact,
    load_causal_lm,
    read_manifest,
    save_artifact,
)
from rlhf.core.tokenizer import format_prompt, train_tokenizer

TEXTS = ["How do I cook rice?", "Read the whole recipe before you start.", "Heat the pan before you add the food."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS)


def _batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_save_load_round_trip(tokenizer, tmp_path, arch):
    model = build_causal_lm(tokenizer, ModelSize(arch=arch, n_layer=1, n_embd=32, n_head=2)).eval()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    manifest = Manifest(
        kind="sft", version="sft-1", parent="base-1", data={"demonstrations": 3}, config={"learning_rate": 1e-3}
    )
    save_artifact(str(tmp_path), model, tokenizer, manifest)

    loaded, loaded_tokenizer, loaded_manifest = load_artifact(str(tmp_path))
    assert loaded_manifest == manifest
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.eval()(**batch).logits)
    assert loaded_tokenizer(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]

    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert {"version", "parent", "data", "config", "created_at", "kind"} <= raw.keys()
    # Plain Hugging Face loading works too (no manifest needed).
    plain, _ = load_causal_lm(str(tmp_path))
    assert type(plain) is type(model)


def test_named_sizes(tokenizer):
    assert {"tiny", "small"} <= SIZES.keys()
    tiny, small = build_causal_lm(tokenizer, "tiny"), build_causal_lm(tokenizer, "small")
    assert count_parameters(tiny) < count_parameters(small)
    with pytest.raises(ValueError, match="unknown model size"):
        build_causal_lm(tokenizer, "huge")
    with pytest.raises(ValueError, match="divisible"):
        ModelSize(n_embd=30, n_head=4)


def test_frozen_copy_is_detached(tokenizer):
    model = build_causal_lm(tokenizer, "tiny")
    ref = frozen_copy(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))


def test_reward_model_from_causal_backbone_save_load(tokenizer, tmp_path):
    policy = build_causal_lm(tokenizer, "tiny")
    rm = build_reward_model(policy, tokenizer)
    # The body is the policy's; the head starts at zero.
    for name, p in policy.base_model.state_dict().items():
        assert torch.equal(p, rm.model.base_model.state_dict()[name])
    with torch.no_grad():
        rm.model.score.weight.normal_()
    prompts = [format_prompt(tokenizer, TEXTS[0])] * 2
    responses = [TEXTS[1], TEXTS[2] + " " + TEXTS[1]]
    scores = rm.score(prompts, responses)
    assert scores.shape == (2,)
    # Padding does not change a row's score (last-token pooling finds the real last token).
    assert torch.allclose(rm.score(prompts[:1], responses[:1]), scores[:1], atol=1e-5)

    save_artifact(str(tmp_path), rm, tokenizer, Manifest(kind="reward", version="rm-1", parent="sft-1"))
    loaded, _, manifest = load_artifact(str(tmp_path))
    assert manifest.kind == "reward" and manifest.parent == "sft-1"
    assert torch.allclose(loaded.score(prompts, responses), scores, atol=1e-6)
    assert read_manifest(str(tmp_path)).version == "rm-1"


def test_read_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(str(tmp_path))


def test_models_loaded_by_two_threads_at_once_are_complete(tokenizer, tmp_path):
    """The embedded platform loads its policy and its reward model in two worker threads at once; transformers builds
    models on the meta device under a process-wide context, which left parameters there (rlhf.core.models.LOAD_LOCK)."""
    import threading

    from rlhf.core.models import load_reward_model

    policy = build_causal_lm(tokenizer, "tiny", seed=0)
    save_artifact(str(tmp_path / "policy"), policy, tokenizer, Manifest(kind="base", version="p"))
    reward = build_reward_model(policy, tokenizer)
    save_artifact(str(tmp_path / "reward"), reward, tokenizer, Manifest(kind="reward", version="r"))
    loaded: list[torch.nn.Module] = []
    errors: list[BaseException] = []

    def load(fn) -> None:
        try:
            loaded.append(fn().to("cpu"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for _ in range(4):
        threads = [threading.Thread(target=load, args=(lambda: load_causal_lm(str(tmp_path / "policy"))[0],)),
                   threading.Thread(target=load, args=(lambda: load_reward_model(str(tmp_path / "reward")).model,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(loaded) == 8
    assert all(p.device.type == "cpu" for m in loaded for p in m.parameters())
