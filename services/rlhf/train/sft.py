"""``rlhf sft --model PATH --data demos.jsonl --out DIR``: supervised fine-tuning of any causal LM on
demonstrations ({prompt, response} JSONL), with the core's stage (`rlhf.core.sft.train_sft`)."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from rlhf.core.data import Demonstration
from rlhf.core.models import Manifest, config_dict
from rlhf.core.sft import SFTConfig, evaluate_causal_lm, sft_batcher, train_sft
from rlhf.core.train_loop import CHECKPOINT_FILE, DataParallel, LoopOptions, checkpoint_step
from rlhf.train import inputs, outputs
from rlhf.train.common import Console, RunOptions, add_arguments as add_common, apply_lora, execute, replace
from rlhf.train.options import UsageError


@dataclass(frozen=True, kw_only=True)
class SFTRun(RunOptions):
    """`rlhf sft`'s inputs."""

    model: str
    """The causal LM to fine-tune: a local Hugging Face checkpoint folder (save_pretrained), with its tokenizer."""
    data: str
    """Demonstrations: JSONL of {"prompt", "response"} (prompts are formatted with the model's chat template)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, SFTRun, SFTConfig, "SFTConfig (rlhf.core.sft)")


def run(args: argparse.Namespace) -> int:
    return execute("rlhf sft", args, SFTRun, SFTConfig, train)


def train(run: SFTRun, config: SFTConfig, par: DataParallel, console: Console) -> int:
    started = time.perf_counter()
    # 1. inputs: model, tokenizer, data, the evaluation split; every check before any training.
    model, tokenizer = inputs.load_causal_lm_checked("--model", run.model, run.dtype, par.device,
                                                     run.gradient_checkpointing, console.note)
    model, peft_model = apply_lora(run, model, "causal", par, console)
    max_length = inputs.context_length(model.config, config.max_length, "--max-length", run.model, console.note)
    config = replace(config, max_length=max_length)
    records = inputs.load_records("--data", run.data, "demonstration", (Demonstration,), "demonstrations")
    if run.eval_data:
        train_items = records
        eval_items = inputs.load_records("--eval-data", run.eval_data, "demonstration", (Demonstration,),
                                         "demonstrations")
    else:
        train_items, eval_items = inputs.split_eval(records, run.eval_share, config.seed)
    limit = f"--max-length {max_length}"
    inputs.check_prompt_lengths(tokenizer, train_items + eval_items, lambda d: d.prompt, max_length, limit)
    demos = [item.record for item in train_items]
    held_out = [item.record for item in eval_items]
    console.note(f"{len(demos)} demonstrations for training, {len(held_out)} held out; "
                 f"{par.world_size} process(es) on {par.device}")

    # 2. train, on the core's stage.
    checkpoint_dir = os.path.join(run.out, outputs.CHECKPOINT_DIR)
    resume_step = _resume_step(run, checkpoint_dir)
    log = outputs.MetricsLog(run.out, par.is_main, resume_step)
    options = LoopOptions(parallel=par, max_steps=run.max_steps or None, checkpoint_dir=checkpoint_dir,
                          save_every=run.save_every, resume=run.resume, on_step=log.write)
    train_sft(model, tokenizer, demos, config, progress=run.progress, options=options)

    # 3. evaluate, save, report.
    evaluation: dict[str, float] = {}
    if held_out:
        evaluation = evaluate_causal_lm(model, sft_batcher(tokenizer, held_out, max_length), len(held_out),
                                        config.batch_size, par)
    train_eval = evaluate_causal_lm(model, sft_batcher(tokenizer, demos[:256], max_length), min(256, len(demos)),
                                    config.batch_size, par)
    log.curves(run.out, [("loss (response tokens)", ["loss"]), ("learning rate", ["learning_rate"])], "step")
    manifest = Manifest(
        kind="sft", version=run.version or _version("sft"), parent=inputs.parent_version(run.model),
        data={"source": os.path.abspath(run.data), "sha256_16": inputs.file_digest(run.data),
              "demonstrations": len(demos), "held_out": len(held_out),
              "eval_source": os.path.abspath(run.eval_data) if run.eval_data else None},
        config={**config_dict(config), "run": config_dict(run), "world_size": par.world_size},
    )
    outputs.save_model(run.out, model, tokenizer, manifest, par, peft_model, run.merge)
    results = {"steps": len(log.rows), "final_train_loss": train_eval["eval_loss"],
               "first_loss": log.rows[0]["loss"] if log.rows else None,
               "last_loss": log.rows[-1]["loss"] if log.rows else None, **evaluation,
               "wall_s": round(time.perf_counter() - started, 2)}
    if par.is_main:
        outputs.write_eval(run.out, results)
    console.say(_summary("sft", results, run.out))
    par.barrier()
    return 0


def _resume_step(run: RunOptions, checkpoint_dir: str) -> int | None:
    """The step the checkpoint holds, when resuming; None for a fresh run (which must not clobber one)."""
    step = checkpoint_step(checkpoint_dir)
    path = os.path.join(checkpoint_dir, CHECKPOINT_FILE)
    if not run.resume:
        if step is not None:
            raise UsageError(f"{run.out} already holds a checkpoint ({path}); pass --resume to continue it, or "
                             "choose another --out")
        return None
    if step is None:
        raise UsageError(f"--resume: no checkpoint in {run.out} ({path} does not exist)")
    return step


def _version(kind: str) -> str:
    import datetime

    return f"{kind}-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def _summary(kind: str, results: dict, out: str) -> str:
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
                      if v is not None)
    return f"{kind}: {shown}\nmodel, manifest.json, metrics.jsonl, curves.png and eval.json in {os.path.abspath(out)}"
