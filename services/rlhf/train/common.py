"""What the three training commands share: the run options every one takes, and running a command (bad input
printed as one line with exit status 2, the process group set up and torn down, rank 0 alone printing)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhf.core.data import DataError
from rlhf.core.train_loop import DataParallel
from rlhf.train import distributed
from rlhf.train.options import UsageError, add_dataclass_arguments, build, read_yaml


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every training command takes besides its inputs and the stage's hyperparameters."""

    out: str
    """Output folder: the trained model (save_pretrained) with manifest.json, metrics.jsonl, curves.png, eval.json
    and checkpoint/ (what --resume continues from)."""
    eval_data: str = ""
    """A JSONL file of held-out records (same format as the training data) for the evaluation at the end."""
    eval_share: float = 0.0
    """Share of the training records held out for evaluation (seeded); ignored when eval_data is given."""
    max_steps: int = 0
    """Stop after this many optimizer steps (PPO: PPO steps), keeping the full run's schedule, so that --resume
    continues it; 0 = the whole run. For smoke runs."""
    resume: bool = False
    """Continue from the last checkpoint in --out (same options; any number of processes)."""
    save_every: int = 100
    """Write the checkpoint every this many steps (and at the end)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Weights and compute dtype: float32, bfloat16 (half the memory; on a GPU with bf16 support), or auto (as saved)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30% more compute."""
    device: str = "auto"
    """Torch device: auto (cuda when visible, else cpu), cpu, cuda. Under torchrun each process takes cuda:LOCAL_RANK."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard), for models that do
    not fit on one device; default is DDP (a full copy per process)."""
    threads: int = 0
    """Torch intra-op threads per process; 0 = torch's default. One is fastest for tiny models on a busy machine."""
    progress: bool = True
    """Progress bars (rank 0 only)."""
    version: str = ""
    """Version name in manifest.json; empty = '<kind>-<UTC time>'."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank instead of every weight (needs peft: the 'lora' extra); 0 = full training."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapters' update is B A * lora_alpha / lora_rank."""
    lora_target_modules: tuple[str, ...] = ()
    """Comma-separated module names that get adapters (e.g. q_proj,v_proj; c_attn for GPT-2); empty = every linear
    layer of the transformer blocks."""
    merge: bool = False
    """With LoRA: also save the merged model (adapters folded into the weights) in --out, which the policy and
    reward services load as any checkpoint; the adapter alone always goes to --out/adapter."""


def apply_lora(run: RunOptions, model: Any, task: str, par: DataParallel, console: "Console") -> tuple[Any, Any]:
    """(the model the stage trains, the peft model or None): LoRA adapters on ``model`` when --lora-rank is set."""
    if not run.lora_rank:
        return model, None
    if par.fsdp:
        raise UsageError("--lora-rank with --fsdp is not supported; LoRA's frozen weights need no sharding of their "
                         "gradients or optimizer state: use DDP (drop --fsdp)")
    from rlhf.train import lora

    peft_model = lora.add_adapters(model, run.lora_rank, run.lora_alpha, run.lora_target_modules, task)
    inner = lora.inner_model(peft_model)
    console.note(f"LoRA rank {run.lora_rank}: {lora.trainable_summary(inner)}")
    return inner, peft_model


def add_arguments(parser: argparse.ArgumentParser, run_cls: type, stage_cls: type, stage_title: str,
                  skip: Sequence[str] = ()) -> None:
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="a YAML file of options (a flat mapping of the field names below, snake_case); "
                             "flags override it")
    add_dataclass_arguments(parser, run_cls, "run")
    add_dataclass_arguments(parser, stage_cls, stage_title, skip=skip)


def load_options(args: argparse.Namespace, run_cls: type, stage_cls: type) -> tuple[Any, Any]:
    yaml_values = read_yaml(args.config) if args.config else {}
    run, stage = build([run_cls, stage_cls], args, yaml_values, args.config or "")
    return run, stage


class Console:
    """Messages of rank 0 on stderr (notes) and stdout (results)."""

    def __init__(self, prog: str, main: bool) -> None:
        self.prog, self.main = prog, main

    def note(self, text: str) -> None:
        if self.main:
            print(f"{self.prog}: note: {text}", file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)


def execute(prog: str, args: argparse.Namespace, run_cls: type, stage_cls: type,
            body: Callable[[Any, Any, DataParallel, Console], int]) -> int:
    """Parse the options, join the process group, run ``body``; bad input -> one line on stderr, exit status 2."""
    par: DataParallel | None = None
    try:
        run, stage = load_options(args, run_cls, stage_cls)
        if run.threads:
            torch.set_num_threads(run.threads)
        _quiet_transformers()
        par = distributed.setup(run.device, run.fsdp)
        console = Console(prog, par.is_main)
        return int(body(run, stage, par, console) or 0)
    except (UsageError, DataError) as e:
        rank = f"[rank {par.rank}] " if par is not None and par.distributed else ""
        if par is None or par.is_main or not isinstance(e, UsageError):
            print(f"{prog}: error: {rank}{e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.teardown()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
