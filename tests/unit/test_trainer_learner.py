"""Rollout worker and learner over the in-process rollout buffer: synchronous mode is the core's PPO exactly,
staleness is bounded (admission) and enforced (drops, counted), stale batches are importance-weighted, a restarted
learner continues from its checkpoint without using a batch twice."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from rlhf.core.models import Manifest, load_causal_lm, save_artifact
from rlhf.core.ppo import PPOConfig, PPOTrainer
from rlhf.trainer.buffer import InMemoryRolloutBuffer
from rlhf.trainer.learner import Learner, LearnerSettings
from rlhf.trainer.rollouts import PoolPrompt, PromptPool, RolloutBatch, prompt_id_of
from rlhf.trainer.worker import RolloutWorker, ScoredBatch, WorkerSettings
from unit.core.ppo_testing import PROMPTS, one_torch_thread, tiny_gpt2, tiny_tokenizer

TOKENIZER = tiny_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def yes_fraction(prompts, responses) -> torch.Tensor:
    return torch.tensor([r.split().count("yes") / max(1, len(r.split())) for r in responses])


def encode(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def config(**overrides) -> PPOConfig:
    base = {"batch_size": 8, "num_mini_batches": 2, "ppo_epochs": 2, "response_length": 6, "learning_rate": 3e-3,
            "value_learning_rate": 3e-3, "kl_coef": 0.01, "seed": 3}
    return PPOConfig(**{**base, **overrides})


@dataclasses.dataclass
class Loop:
    learner: Learner
    worker: RolloutWorker
    buffer: InMemoryRolloutBuffer


def make_loop(tmp_path, cfg: PPOConfig, *, max_staleness=0, publish_every=1, worker_staleness=None,
              buffer=None, checkpoint_every=1) -> Loop:
    root = tmp_path / "artifacts"
    parent = root / "policy" / "parent"
    if not parent.exists():
        save_artifact(str(parent), tiny_gpt2(seed=0), TOKENIZER, Manifest(kind="policy", version="parent"))
    buffer = buffer or InMemoryRolloutBuffer()
    policy, tokenizer = load_causal_lm(str(parent))
    trainer = PPOTrainer(cfg, policy, None, tokenizer, None, [], encode_prompt=encode)
    learner = Learner(LearnerSettings(run_id="run-1", parent_version="parent", parent_uri="policy/parent",
                                      artifact_root=str(root), checkpoint_dir=str(tmp_path / "ckpt"),
                                      max_staleness=max_staleness, publish_every=publish_every,
                                      checkpoint_every=checkpoint_every, read_block_s=0.05),
                      trainer, tokenizer, buffer)
    pool = PromptPool(seed=cfg.seed, served_share=0.0)
    pool.add(PoolPrompt(prompt_id_of(p), p, "dataset") for p in PROMPTS)
    worker = RolloutWorker(
        WorkerSettings(batch_size=cfg.batch_size, response_length=cfg.response_length, temperature=cfg.temperature,
                       seed=cfg.seed, max_staleness=max_staleness if worker_staleness is None else worker_staleness,
                       publish_every=publish_every, artifact_root=str(root)),
        buffer, pool, lambda ps, rs: ScoredBatch(yes_fraction(ps, rs), "reward-test"))
    return Loop(learner, worker, buffer)


def test_sync_mode_gives_the_parameters_of_the_core_trainer(tmp_path):
    cfg = config()
    steps = 3
    core = PPOTrainer(cfg, tiny_gpt2(seed=0), None, TOKENIZER, yes_fraction, PROMPTS, encode_prompt=encode)
    core_metrics = [core.step() for _ in range(steps)]

    loop = make_loop(tmp_path, cfg)
    loop.learner.publish_progress("running")
    for i in range(steps):
        assert loop.worker.step() is not None
        assert loop.worker.step() is None, "synchronous mode: no second batch before the learner's update"
        result = loop.learner.step()
        assert result is not None and result.used and result.staleness == 0
        assert result.saved is not None and result.saved.index == i + 1
        assert result.metrics["kl"] == pytest.approx(core_metrics[i]["kl"], abs=0)
        assert "importance_weight" not in result.metrics
    assert loop.buffer.depth() == 0
    for (name, a), (_, b) in zip(core.model.named_parameters(), loop.learner.trainer.model.named_parameters()):
        assert torch.equal(a, b), name
    assert loop.learner.trainer.global_step == steps and loop.learner.version_index == steps


def test_a_batch_older_than_max_staleness_is_dropped_and_counted(tmp_path):
    loop = make_loop(tmp_path, config(), max_staleness=0, worker_staleness=5)
    loop.learner.publish_progress("running")
    first, second = loop.worker.step(), loop.worker.step()  # both sampled by version 0
    assert first is not None and second is not None and loop.buffer.depth() == 2
    used = loop.learner.step()
    assert used.used and used.saved is not None
    dropped = loop.learner.step()
    assert not dropped.used and dropped.staleness == 1 and "stale" in dropped.reason
    assert loop.learner.dropped_stale == 1 and loop.learner.trainer.global_step == 1
    assert loop.buffer.depth() == 1, "acknowledged with the checkpoint that counts the drop"
    loop.learner.flush()
    assert loop.buffer.depth() == 0


def test_a_stale_batch_within_the_bound_is_weighted_by_truncated_importance_sampling(tmp_path):
    loop = make_loop(tmp_path, config(), max_staleness=1)
    loop.learner.publish_progress("running")
    assert loop.worker.step() is not None
    assert loop.worker.step() is not None  # staleness 1 is allowed: the worker runs one version ahead
    assert loop.worker.step() is None
    first, second = loop.learner.step(), loop.learner.step()
    assert first.staleness == 0 and "importance_weight" not in first.metrics
    assert second.used and second.staleness == 1
    w = second.metrics["importance_weight"]
    assert 0 < w <= config().importance_clip and w != 1.0
    assert 0.0 <= second.metrics["importance_clipfrac"] <= 1.0


def test_admission_waits_for_a_paused_or_missing_run(tmp_path):
    loop = make_loop(tmp_path, config())
    assert loop.worker.step() is None  # no progress published yet
    loop.learner.publish_progress("paused")
    assert loop.worker.step() is None
    loop.learner.publish_progress("running")
    assert loop.worker.step() is not None


def test_a_restarted_learner_redoes_exactly_the_batches_its_checkpoint_lacks(tmp_path):
    cfg = config()
    buffer = InMemoryRolloutBuffer()
    loop = make_loop(tmp_path, cfg, max_staleness=3, publish_every=2, checkpoint_every=2, buffer=buffer)
    loop.learner.publish_progress("running")
    for _ in range(3):
        assert loop.worker.step() is not None
    assert loop.learner.step().used and loop.learner.step().used  # step 2: a version and a checkpoint
    assert buffer.depth() == 1
    third = loop.learner.step()  # used, not yet checkpointed: a crash now loses its effect
    assert third.used and buffer.depth() == 1
    reference = {k: v.clone() for k, v in loop.learner.trainer.model.state_dict().items()}

    # The learner "crashes": a new one on the same checkpoint and buffer gets the unacknowledged batch again.
    again = make_loop(tmp_path, cfg, max_staleness=3, publish_every=2, checkpoint_every=2, buffer=buffer)
    assert again.learner.resume()
    assert again.learner.trainer.global_step == 2 and again.learner.batches_used == 2
    redo = again.learner.step()
    assert redo.used and redo.batch_id == third.batch_id
    for k, v in again.learner.trainer.model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert again.learner.batches_used == 3


def test_rollout_batches_round_trip_and_refuse_foreign_bytes(tmp_path):
    loop = make_loop(tmp_path, config())
    loop.learner.publish_progress("running")
    batch = loop.worker.step()
    back = RolloutBatch.from_bytes(batch.to_bytes())
    assert back.batch_id == batch.batch_id and back.prompt_ids == batch.prompt_ids
    assert torch.equal(back.rollout.sequences, batch.rollout.sequences)
    assert torch.equal(back.rollout.behaviour_logprobs, batch.rollout.behaviour_logprobs)
    with pytest.raises(ValueError, match="not a rollout batch"):
        RolloutBatch.from_bytes(b"garbage")
