"""The PPO trainer: config checks, rewards, masks, a tiny run that learns, separate critic, resume equivalence."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from rlhf.core.ppo import CriticModel, Experience, PPOConfig, PPOTrainer
from unit.core.ppo_testing import one_torch_thread, EOS_ID, PROMPTS, tiny_gpt2, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
TARGET = "yes"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def yes_fraction(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Reward: the share of the response's words that are "yes"."""
    return torch.tensor([r.split().count(TARGET) / max(1, len(r.split())) for r in responses])


def noisy_yes_fraction(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Like yes_fraction plus noise from Python's and numpy's global RNGs (a stand-in for simulated annotators)."""
    noise = torch.tensor([random.random() * 0.01 + float(np.random.normal()) * 0.01 for _ in responses])
    return yes_fraction(prompts, responses) + noise


def small_config(**overrides) -> PPOConfig:
    base = dict(batch_size=8, num_mini_batches=2, ppo_epochs=2, response_length=6, learning_rate=3e-3,
                value_learning_rate=3e-3, kl_coef=0.01, seed=0)
    base.update(overrides)
    return PPOConfig(**base)


def make_trainer(config: PPOConfig, reward_fn=yes_fraction, **kwargs) -> PPOTrainer:
    return PPOTrainer(config, tiny_gpt2(seed=0), None, TOKENIZER, reward_fn, PROMPTS, **kwargs)


# --- config ----------------------------------------------------------------------------------------------------------


def test_config_checks_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of num_mini_batches.*batch_size=8"):
        PPOConfig(batch_size=10, num_mini_batches=4)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    cfg = PPOConfig(batch_size=32, num_mini_batches=4, ppo_epochs=3)
    assert cfg.mini_batch_size == 8 and cfg.optimizer_steps_per_step == 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 4  # type: ignore[misc]


def test_every_config_field_is_documented():
    import inspect

    source = inspect.getsource(PPOConfig)
    for f in dataclasses.fields(PPOConfig):
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1].strip()
        assert after.startswith('"""'), f"PPOConfig.{f.name} has no docstring under it"


# --- experience, rewards, advantages ----------------------------------------------------------------------------------


def test_experience_shapes_and_masks():
    trainer = make_trainer(small_config(batch_size=16, response_length=12, temperature=1.5))
    exp = trainer.make_experience(trainer.next_prompts())
    b, t = exp.action_mask.shape
    assert b == 16 and t <= 12
    assert exp.sequences.shape == exp.attention_mask.shape == (16, exp.sequences.shape[1])
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert getattr(exp, name).shape == (b, t), name
    assert torch.equal(exp.attention_mask[:, -t:].bool(), exp.action_mask)
    # policy == reference at the start, so their log-probs agree
    torch.testing.assert_close(exp.logprobs, exp.ref_logprobs)
    assert torch.all(exp.logprobs[~exp.action_mask] == 0)
    assert exp.ended.any() and not exp.ended.all(), "want responses that end early and ones that run out"
    mb = exp.select(torch.tensor([0, 3]))
    assert isinstance(mb, Experience) and mb.sequences.shape[0] == 2


def test_rewards_are_kl_penalty_plus_score_at_the_last_token():
    trainer = make_trainer(small_config(kl_coef=0.5, kl_estimator="k1"))
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    exp = Experience(
        sequences=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 6), action_mask=mask,
        logprobs=logprobs, ref_logprobs=ref, values=torch.zeros(2, 4), raw_scores=torch.tensor([2.0, -1.0]),
        scores=torch.tensor([2.0, -1.0]), ended=torch.tensor([True, True]), entropy=torch.zeros(2, 4),
    )
    rewards, kl = trainer.compute_rewards(exp)
    assert kl.tolist() == [[0.5, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 0.5, 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]]


def test_score_shaping():
    trainer = make_trainer(small_config(missing_eos_penalty=1.0, reward_clip=0.5))
    scores = trainer.shape_scores(torch.tensor([0.2, 0.2, 3.0]), ended=torch.tensor([True, False, True]))
    assert scores.tolist() == pytest.approx([0.2, -0.5, 0.5])
    norm = make_trainer(small_config(normalize_reward=True))
    out = norm.shape_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), ended=torch.ones(4, dtype=torch.bool))
    assert out.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert norm.reward_moments.count == 4


def test_no_gradient_from_padding_or_after_eos():
    trainer = make_trainer(small_config(batch_size=16, num_mini_batches=1, response_length=12, temperature=1.5))
    exp = trainer.make_experience(trainer.next_prompts())
    rewards, kl = trainer.compute_rewards(exp)
    advantages, returns = trainer.compute_advantages(exp, rewards)
    batch = dataclasses.replace(exp, rewards=rewards, kl=kl, advantages=advantages, returns=returns)
    unused = exp.attention_mask == 0  # left padding of prompts, and everything after a response's EOS
    assert unused[:, -exp.response_length :].any() and unused[:, : -exp.response_length].any()

    captured = []

    def keep_grad(module, args, output):
        output.retain_grad()
        captured.append(output)

    hook = trainer.policy.get_input_embeddings().register_forward_hook(keep_grad)
    try:
        trainer._train_minibatch(batch)
    finally:
        hook.remove()
    grad = captured[0].grad  # (B, L, H) gradient of the loss wrt each input token's embedding
    assert torch.all(grad[unused] == 0)
    assert grad[~unused].abs().sum() > 0


# --- training --------------------------------------------------------------------------------------------------------


def test_tiny_run_learns_and_changes_every_parameter():
    trainer = make_trainer(small_config(batch_size=16, num_mini_batches=2, ppo_epochs=4, response_length=8))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    ref_before = {name: p.detach().clone() for name, p in trainer.ref_policy.named_parameters()}
    history = trainer.train(25)
    scores = [m["score"] for m in history]
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.3, scores
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    for name, p in trainer.ref_policy.named_parameters():
        assert torch.equal(p, ref_before[name]), f"reference {name} changed"
    expected = {"rlhf_reward", "score", "kl", "non_score_reward", "entropy", "approx_kl", "clipfrac", "value_loss",
                "policy_loss", "explained_variance", "response_length", "beta"}
    assert expected <= set(history[-1])
    assert all(np.isfinite(v) for v in history[-1].values())
    assert history[-1]["kl"] > 0


def test_separate_critic_and_early_stop_and_adaptive_kl():
    policy = tiny_gpt2(seed=0)
    critic = CriticModel.from_causal_lm(tiny_gpt2(seed=1))
    cfg = small_config(target_kl=1e-12, adaptive_kl=True, kl_target=0.01, kl_horizon=100, ppo_epochs=3,
                       kl_estimator="k3")
    trainer = PPOTrainer(cfg, policy, None, TOKENIZER, yes_fraction, PROMPTS, value_model=critic)
    critic_before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    history = trainer.train(3)
    assert history[0]["ppo_epochs_run"] == 1  # the first epoch moved the policy past the tiny target KL
    assert any(not torch.equal(p, critic_before[n]) for n, p in critic.named_parameters())
    # beta moves up when the step's KL was above the target, down when below (step 1: policy == reference, KL 0)
    assert history[0]["kl"] == 0 and history[1]["beta"] < history[0]["beta"]
    for before, after in zip(history, history[1:]):
        assert np.sign(after["beta"] - before["beta"]) == np.sign(before["kl"] - cfg.kl_target)
    assert any(m["kl"] > cfg.kl_target for m in history[:2])


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_resumed_run_ends_with_exactly_the_same_parameters(tmp_path):
    cfg = small_config(normalize_reward=True, adaptive_kl=True, kl_target=0.5, kl_horizon=50, lr_warmup_steps=3)
    prompts = PROMPTS[:6]  # 6 prompts, batches of 8: the data position wraps mid-pass

    def fresh() -> PPOTrainer:
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
        return PPOTrainer(cfg, tiny_gpt2(seed=0), None, TOKENIZER, noisy_yes_fraction, prompts)

    straight = fresh()
    straight_metrics = straight.train(4)

    first = fresh()
    first.train(2)
    first.save_checkpoint(tmp_path / "ckpt")
    # disturb every global RNG: the checkpoint must restore them
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    resumed = PPOTrainer(cfg, tiny_gpt2(seed=5), None, TOKENIZER, noisy_yes_fraction, prompts)
    resumed.load_checkpoint(tmp_path / "ckpt")
    resumed_metrics = resumed.train(2)

    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    for key in ("score", "kl", "beta", "policy_loss", "learning_rate"):
        assert [m[key] for m in straight_metrics[2:]] == [m[key] for m in resumed_metrics], key
    assert resumed.global_step == straight.global_step == 4
    assert resumed.reward_moments.state_dict() == straight.reward_moments.state_dict()


def test_loading_a_checkpoint_of_another_config_is_refused(tmp_path):
    make_trainer(small_config()).save_checkpoint(tmp_path)
    other = make_trainer(small_config(kl_coef=0.2))
    with pytest.raises(ValueError, match="kl_coef"):
        other.load_checkpoint(tmp_path)


def test_prompts_are_visited_in_shuffled_passes():
    trainer = make_trainer(small_config(batch_size=4, num_mini_batches=1))
    seen = trainer.next_prompts() + trainer.next_prompts()
    assert sorted(seen) == sorted(PROMPTS) and seen != PROMPTS
    assert trainer._epoch == 1 and trainer._cursor == 0


def test_a_custom_prompt_encoder_feeds_the_policy_while_reward_fn_sees_the_raw_prompt():
    seen: list[str] = []

    def reward_fn(prompts, responses):
        seen.extend(prompts)
        return yes_fraction(prompts, responses)

    def encode(prompt: str) -> list[int]:
        return TOKENIZER("please " + prompt)["input_ids"]

    trainer = PPOTrainer(small_config(), tiny_gpt2(), None, TOKENIZER, reward_fn, PROMPTS, encode_prompt=encode)
    exp = trainer.make_experience(PROMPTS)
    please = TOKENIZER("please")["input_ids"][0]
    first_real = exp.attention_mask.argmax(dim=1)  # left padding: the first prompt token of each row
    assert torch.all(exp.sequences[torch.arange(8), first_real] == please)
    assert seen == PROMPTS


def test_eos_id_of_the_tokenizer_is_used():
    assert make_trainer(small_config()).eos_token_id == EOS_ID
