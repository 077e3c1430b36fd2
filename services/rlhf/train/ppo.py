"""``rlhf ppo --policy PATH --reward-model PATH|grpc://HOST:PORT --prompts prompts.jsonl --out DIR``: PPO of a causal
LM against a reward model, KL-anchored to the policy it starts from, with the core's stage
(`rlhf.core.ppo.PPOTrainer`). Prompts are {prompt} or {messages} JSONL (formatted with the policy's chat template;
the reward model formats them with its own)."""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.core.data import PromptRecord
from rlhf.core.models import Manifest, config_dict, frozen_copy
from rlhf.core.ppo import CHECKPOINT_FILE, PPOConfig, PPOTrainer, evaluate_policy
from rlhf.core.train_loop import DataParallel
from rlhf.train import inputs, outputs
from rlhf.train.common import Console, RunOptions, add_arguments as add_common, apply_lora, execute
from rlhf.train.options import UsageError
from rlhf.train.sft import _summary, _version


@dataclass(frozen=True, kw_only=True)
class PPORun(RunOptions):
    """`rlhf ppo`'s inputs."""

    policy: str
    """The policy to optimise (usually the SFT model): a local causal-LM checkpoint folder. The reference of the KL
    penalty is a frozen copy of it."""
    reward_model: str
    """A reward-model checkpoint folder (one label, e.g. `rlhf rm`'s output), or grpc://HOST:PORT of a running
    reward service (rlhf.v1 RewardService.Score)."""
    prompts: str
    """Prompts, JSONL: {"prompt"} or {"messages": [{"role","content"}, ...]} (or any record with a prompt)."""
    steps: int = 100
    """PPO steps (each: batch_size rollouts, scoring, then ppo_epochs x num_mini_batches optimizer steps)."""
    max_length: int = 0
    """Longest prompt + response in tokens; 0 = the policy's context. A prompt that leaves less than
    response_length tokens is an error naming its line."""
    eval_batch_size: int = 32
    """Prompts per generation batch in the evaluation."""
    reward_batch_size: int = 64
    """Responses per forward pass of a local reward model."""
    reward_auth_token: str = ""
    """Bearer token for a reward service that requires one (its product token)."""
    reward_max_items: int = 256
    """Most items per Score request to a reward service (its max_items)."""
    reward_attempts: int = 5
    """Tries per Score request (UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with backoff)."""
    reward_timeout_s: float = 30.0
    """Deadline of one Score request."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, PPORun, PPOConfig, "PPOConfig (rlhf.core.ppo)")


def run(args: argparse.Namespace) -> int:
    return execute("rlhf ppo", args, PPORun, PPOConfig, train)


class LocalReward:
    """PPO's reward from a reward model in this process: its score of (prompt, response), the prompt formatted
    with the reward model's own tokenizer (as the reward service formats it)."""

    def __init__(self, reward_model: Any, batch_size: int) -> None:
        self.reward_model, self.batch_size = reward_model, batch_size

    def __call__(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> torch.Tensor:
        tok = self.reward_model.tokenizer
        formatted = [inputs.format_any_prompt(tok, p) for p in prompts]
        # An empty response still gets its eos from the tokenization: scored like any other.
        return self.reward_model.score(formatted, list(responses), self.batch_size)


def _reward(run: PPORun, par: DataParallel, console: Console) -> tuple[Any, Any, str]:
    """(reward_fn, what to close, a name for the manifest)."""
    if run.reward_model.startswith("grpc://"):
        from rlhf.train.reward_client import RetryPolicy, RewardClient

        try:
            client = RewardClient(run.reward_model, run.reward_auth_token, run.reward_max_items,
                                  RetryPolicy(attempts=run.reward_attempts, timeout_s=run.reward_timeout_s))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return client, client, run.reward_model
    reward_model = inputs.load_reward_model_checked("--reward-model", run.reward_model, run.dtype, par.device, False,
                                                    0, console.note)
    reward_model.requires_grad_(False)
    return LocalReward(reward_model, run.reward_batch_size), None, inputs.parent_version(run.reward_model)


def train(run: PPORun, config: PPOConfig, par: DataParallel, console: Console) -> int:
    from rlhf.train.reward_client import RewardServiceError

    started = time.perf_counter()
    if par.fsdp:
        raise UsageError("--fsdp is for rlhf sft and rlhf rm; rlhf ppo under torchrun runs DDP (drop --fsdp)")
    # 1. inputs: the policy and its reference, the reward, the prompts (each checked against the context).
    policy, tokenizer = inputs.load_causal_lm_checked("--policy", run.policy, run.dtype, par.device,
                                                      run.gradient_checkpointing, console.note)
    policy, peft_model = apply_lora(run, policy, "causal", par, console)
    if peft_model is not None:
        from rlhf.train.lora import AdapterDisabled

        ref = AdapterDisabled(peft_model)  # the base weights with the adapters off: no second copy
    else:
        ref = frozen_copy(policy)
    reward_fn, closer, reward_name = _reward(run, par, console)
    records = inputs.load_prompt_records("--prompts", run.prompts)
    if run.eval_data:
        train_items, eval_items = records, inputs.load_prompt_records("--eval-data", run.eval_data)
    else:
        train_items, eval_items = inputs.split_eval(records, run.eval_share, config.seed)
    context = inputs.context_length(policy.config, run.max_length, "--max-length", run.policy, console.note)
    inputs.check_prompt_lengths(tokenizer, train_items + eval_items, lambda p: p, context - config.response_length + 1,
                                f"--max-length {context} less response_length {config.response_length}")
    prompts = [item.record for item in train_items]
    held_out = [item.record for item in eval_items]

    def encode(prompt: PromptRecord) -> list[int]:
        return tokenizer(inputs.format_any_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]

    try:
        trainer = PPOTrainer(config, policy, ref, tokenizer, reward_fn, prompts, encode_prompt=encode, parallel=par)
    except ValueError as e:
        raise UsageError(str(e)) from None
    console.note(f"{len(prompts)} prompts for training, {len(held_out)} held out; reward from {reward_name}")

    def evaluate() -> dict[str, float]:
        if not held_out:
            return {}
        return evaluate_policy(policy, ref, tokenizer, held_out, encode, reward_fn, config.response_length,
                               config.temperature, seed=config.seed + 7919, batch_size=run.eval_batch_size,
                               parallel=par)

    try:
        # 2. train: resume, then PPO steps with a checkpoint every save_every and at the end.
        checkpoint_dir = os.path.join(run.out, outputs.CHECKPOINT_DIR)
        path = os.path.join(checkpoint_dir, CHECKPOINT_FILE)
        if run.resume:
            if not os.path.exists(path):
                raise UsageError(f"--resume: no checkpoint in {run.out} ({path} does not exist)")
            try:
                trainer.load_checkpoint(checkpoint_dir)
            except ValueError as e:
                raise UsageError(f"--resume: {e}") from None
        elif os.path.exists(path):
            raise UsageError(f"{run.out} already holds a checkpoint ({path}); pass --resume to continue it, or "
                             "choose another --out")
        before = evaluate() if not run.resume else {}
        log = outputs.MetricsLog(run.out, par.is_main, trainer.global_step if run.resume else None)
        stop = run.steps if not run.max_steps else min(run.steps, run.max_steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=min(trainer.global_step, stop), desc="ppo",
                   disable=not (run.progress and par.is_main), leave=False)
        while trainer.global_step < stop:
            metrics = trainer.step()
            log.write(metrics)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.2f}")
            if run.save_every and trainer.global_step % run.save_every == 0:
                save(trainer, checkpoint_dir, par)
        bar.close()
        save(trainer, checkpoint_dir, par)
        after = evaluate()
    except RewardServiceError as e:
        raise UsageError(str(e)) from None
    finally:
        if closer is not None:
            closer.close()

    # 3. save and report
    log.curves(run.out, [("reward (reward-model score)", ["score"]), ("kl to reference (nats per response)", ["kl"]),
                         ("entropy (nats per token)", ["entropy"]), ("response length (tokens)", ["response_length"])],
               "ppo step")
    manifest = Manifest(
        kind="policy", version=run.version or _version("policy"), parent=inputs.parent_version(run.policy),
        data={"source": os.path.abspath(run.prompts), "sha256_16": inputs.file_digest(run.prompts),
              "prompts": len(prompts), "held_out": len(held_out), "reward_model": reward_name},
        config={**config_dict(config), "run": {**config_dict(run), "reward_auth_token": ""}},
    )
    outputs.save_model(run.out, policy, tokenizer, manifest, par, peft_model, run.merge)
    results = {"steps": trainer.global_step, **after, **{f"{k}_before": v for k, v in before.items()
                                                          if k != "eval_prompts"},
               "first_score": log.rows[0]["score"] if log.rows else None,
               "last_score": log.rows[-1]["score"] if log.rows else None,
               "wall_s": round(time.perf_counter() - started, 2)}
    if par.is_main:
        outputs.write_eval(run.out, results)
    console.say(_summary("ppo", results, run.out))
    par.barrier()
    return 0


def save(trainer: PPOTrainer, checkpoint_dir: str, par: DataParallel) -> None:
    """The trainer state, written by rank 0 (every rank holds the same state: DDP keeps replicas equal)."""
    if par.is_main:
        trainer.save_checkpoint(checkpoint_dir)
    par.barrier()
