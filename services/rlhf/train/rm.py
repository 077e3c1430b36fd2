"""``rlhf rm --model PATH --data pairs_or_rankings.jsonl --out DIR``: reward-model training on preference pairs
({prompt, chosen, rejected[, margin]}) and K-wise rankings ({prompt, responses, ranking}), with the core's stage
(`rlhf.core.reward_training.RewardTrainer`). ``--model`` is a causal LM (usually the SFT policy) or an encoder, which
gets a scalar head, or a reward model to train further."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from rlhf.core.data import PreferencePair, Ranking
from rlhf.core.models import Manifest, config_dict
from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig
from rlhf.core.train_loop import DataParallel, LoopOptions
from rlhf.train import inputs, outputs
from rlhf.train.common import Console, RunOptions, add_arguments as add_common, apply_lora, execute
from rlhf.train.sft import _resume_step, _summary, _version


@dataclass(frozen=True, kw_only=True)
class RMRun(RunOptions):
    """`rlhf rm`'s inputs."""

    model: str
    """The backbone: a local checkpoint folder of a causal LM (e.g. the SFT policy; InstructGPT's choice), an
    encoder, or a reward model (one label) to train further."""
    data: str
    """Preference pairs and/or rankings, JSONL (rlhf.core.data): {"prompt","chosen","rejected"[,"margin"]} or
    {"prompt","responses","ranking"}."""
    max_length: int = 0
    """Longest prompt + response in tokens (longer inputs keep their end); 0 = the model's context."""
    eval_batch_size: int = 32
    """Rankings per forward pass in the evaluation."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, RMRun, RewardTrainingConfig, "RewardTrainingConfig (rlhf.core.reward_training)")


def run(args: argparse.Namespace) -> int:
    return execute("rlhf rm", args, RMRun, RewardTrainingConfig, train)


def _rankings(items: list[inputs.Numbered]) -> list[Ranking]:
    return [i.record.as_ranking() if isinstance(i.record, PreferencePair) else i.record for i in items]


def train(run: RMRun, config: RewardTrainingConfig, par: DataParallel, console: Console) -> int:
    started = time.perf_counter()
    # 1. inputs (seeded first: a fresh reward head is drawn from torch's RNG, the same in every process and run)
    torch.manual_seed(config.seed)
    reward_model = inputs.load_reward_model_checked("--model", run.model, run.dtype, par.device,
                                                    run.gradient_checkpointing, run.max_length, console.note)
    reward_model.model, peft_model = apply_lora(run, reward_model.model, "reward", par, console)
    records = inputs.load_records("--data", run.data, None, (PreferencePair, Ranking), "pairs or rankings")
    if run.eval_data:
        train_items = records
        eval_items = inputs.load_records("--eval-data", run.eval_data, None, (PreferencePair, Ranking),
                                         "pairs or rankings")
    else:
        train_items, eval_items = inputs.split_eval(records, run.eval_share, config.seed)
    limit = reward_model.max_length
    inputs.check_prompt_lengths(reward_model.tokenizer, train_items + eval_items, lambda r: r.prompt, limit,
                                f"the reward model's {limit} tokens (--max-length)")
    rankings, held_out = _rankings(train_items), _rankings(eval_items)
    console.note(f"{len(rankings)} rankings for training, {len(held_out)} held out; "
                 f"{par.world_size} process(es) on {par.device}")
    trainer = RewardTrainer(reward_model, config)
    before = trainer.evaluate(held_out, run.eval_batch_size, par) if held_out else {}

    # 2. train
    checkpoint_dir = os.path.join(run.out, outputs.CHECKPOINT_DIR)
    log = outputs.MetricsLog(run.out, par.is_main, _resume_step(run, checkpoint_dir))
    options = LoopOptions(parallel=par, max_steps=run.max_steps or None, checkpoint_dir=checkpoint_dir,
                          save_every=run.save_every, resume=run.resume, on_step=log.write)
    trainer.train(rankings, progress=run.progress, options=options)

    # 3. evaluate, save, report
    after = trainer.evaluate(held_out, run.eval_batch_size, par) if held_out else {}
    log.curves(run.out, [("loss", ["loss"]), ("pair accuracy (training batches)", ["accuracy"])], "step")
    manifest = Manifest(
        kind="reward", version=run.version or _version("reward"), parent=inputs.parent_version(run.model),
        data={"source": os.path.abspath(run.data), "sha256_16": inputs.file_digest(run.data),
              "rankings": len(rankings), "held_out": len(held_out),
              "eval_source": os.path.abspath(run.eval_data) if run.eval_data else None},
        config={**config_dict(config), "run": config_dict(run), "world_size": par.world_size,
                "max_length": reward_model.max_length},
    )
    outputs.save_model(run.out, reward_model, reward_model.tokenizer, manifest, par, peft_model, run.merge)
    results = {"steps": len(log.rows), "first_loss": log.rows[0]["loss"] if log.rows else None,
               "last_loss": log.rows[-1]["loss"] if log.rows else None, **after,
               **{f"{k}_before": v for k, v in before.items() if k != "eval_rankings"},
               "wall_s": round(time.perf_counter() - started, 2)}
    if par.is_main:
        outputs.write_eval(run.out, results)
    console.say(_summary("rm", results, run.out))
    par.barrier()
    return 0
