"""Pieces shared by the supervised and reward-model trainers: seeding, AdamW with a warmup-cosine schedule, one
optimizer step with gradient clipping, epoch-wise shuffled minibatch indices, and the step loop itself with data
parallelism (DDP or FSDP2 under torchrun), checkpoints and resume."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains and biases are not pulled towards 0 (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
    max_grad_norm: float | None,
) -> float:
    """Backward, clip, step, schedule; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    scheduler.step()
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
        norm = norm.full_tensor()
    return float(norm)


def minibatch_indices(n: int, batch_size: int, num_steps: int, seed: int) -> Iterator[list[int]]:
    """``num_steps`` minibatches of indices into ``n`` examples: epochs of a fresh permutation each, the last
    minibatch of an epoch possibly shorter."""
    if n == 0:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    steps = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, batch_size):
            if steps == num_steps:
                return
            yield order[start : start + batch_size]
            steps += 1


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism, checkpoints and the step loop shared by the supervised and reward-model stages.
#
# The rule that makes N processes train exactly as one: every rank draws the same *global* minibatch (the same
# ``minibatch_indices``), takes its slice ``indices[rank::world]``, and scales its local mean loss by
# ``local_weight / global_weight * world`` (weights: target tokens for SFT, rankings for the reward model). DDP then
# averages the gradients over the ranks, which turns the scaled losses back into the global mean: the gradient is the
# one a single process computes on the whole minibatch (up to float summation order).


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands in a data-parallel run: its rank, the world size and its device.

    The default is one process. Under ``torchrun`` the command layer (`rlhf.train.distributed`) initialises the
    process group and passes one of these; the stages never read the environment themselves.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``) instead of replicating (DDP)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, metrics and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's slice of a global batch (or of an evaluation set): ``items[rank::world]``."""
        return list(items[self.rank :: self.world_size])

    def eval_shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of an evaluation set. Under FSDP every rank evaluates all of it (each forward pass is
        a collective, so every rank must run the same passes); `eval_sum` then does not sum again."""
        return list(items) if self.fsdp else self.shard(items)

    def eval_sum(self, values: Sequence[float]) -> list[float]:
        """Sums of what `eval_shard`'s shares gave, over the ranks."""
        return [float(v) for v in values] if self.fsdp else self.all_reduce_sum(values)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts and loss sums stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to call forward on: DDP around it, FSDP2 in place on it, or the module itself alone."""
        if not self.distributed:
            return module
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # Each transformer block its own unit (gathered just before it runs), then the root for the rest.
            for block in _transformer_blocks(module):
                fully_shard(block)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE_PROCESS = DataParallel()


def _transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes, e.g. LlamaDecoderLayer)."""
    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


@dataclass
class LoopOptions:
    """How a stage's loop runs, beyond its hyperparameters: processes, early stop, checkpoints, metrics.

    The commands (`rlhf sft`, `rlhf rm`) and the trainer service set these; the defaults are one process, no
    checkpoint and no early stop, as the demo runs.
    """

    parallel: DataParallel = SINGLE_PROCESS
    """This process's place in a data-parallel run."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (counted from the start of the run, a resumed run included); the
    schedule stays that of the full run, so a later ``resume`` continues it exactly."""
    checkpoint_dir: str | None = None
    """Where the trainer state is written (``trainer_state.pt``); None = never."""
    save_every: int = 0
    """Write the trainer state every this many steps (and always at the end); 0 = only at the end."""
    resume: bool = False
    """Continue from ``checkpoint_dir/trainer_state.pt`` when it exists."""
    on_step: Callable[[dict[str, float]], None] | None = None
    """Called on every rank after every step with that step's metrics (global values: equal on every rank)."""


CHECKPOINT_FILE = "trainer_state.pt"
STEP_FILE = "trainer_state.json"


@dataclass
class StepOutput:
    """What a stage computes on this rank's slice of one minibatch."""

    loss: torch.Tensor
    """The mean loss over this rank's slice (with gradients)."""
    weight: float
    """What that mean is over (target tokens, rankings); 0 for an empty slice whose ``loss`` is a dummy."""
    sums: dict[str, float] = field(default_factory=dict)
    """Metric sums over this rank's slice (summed over the ranks, then divided by the global weight)."""


def _state_options(full: bool = True) -> Any:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers the full state onto rank 0's CPU (it needs a process group).
    return StateDictOptions(full_state_dict=full, cpu_offload=dist.is_available() and dist.is_initialized())


def save_train_state(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, config: Any) -> str:
    """Write ``directory/trainer_state.pt`` atomically: model, optimizer, scheduler, step, RNGs, the config.

    The model and optimizer states are *full* and keyed by parameter name (torch.distributed.checkpoint's
    ``get_state_dict``), whether the run is one process, DDP or FSDP2, so a checkpoint resumes on any number of
    processes and either kind of parallelism. Every rank must call it (FSDP gathers); rank 0 writes."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    path = os.path.join(directory, CHECKPOINT_FILE)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "config": _config_json(config),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
        with open(os.path.join(directory, STEP_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step}, f)  # what a command reads before resuming, without loading the state
    return path


def checkpoint_step(directory: str) -> int | None:
    """The step of the checkpoint in ``directory`` (None when there is none)."""
    if not os.path.exists(os.path.join(directory, CHECKPOINT_FILE)):
        return None
    try:
        with open(os.path.join(directory, STEP_FILE), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError):
        return int(torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=False)["step"])


def load_train_state(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, config: Any) -> int:
    """Restore what `save_train_state` wrote (on any number of processes); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = os.path.join(directory, CHECKPOINT_FILE)
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, now = state.get("config"), _config_json(config)
    if saved is not None and saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"{path} was written with a different config (fields: {changed}); resume with the same one")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def _config_json(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return dict(config or {})


def run_steps(
    model: torch.nn.Module,
    forward_model: torch.nn.Module,
    num_steps: int,
    batch_size: int,
    num_examples: int,
    compute: Callable[[torch.nn.Module, list[int]], StepOutput],
    hyper: Any,
    options: LoopOptions | None = None,
    desc: str = "train",
    progress: bool = True,
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
) -> list[dict[str, float]]:
    """The supervised and reward-model loop: ``num_steps`` AdamW steps with a warmup-cosine schedule on shuffled
    global minibatches, each rank computing its slice (``compute(forward_model, local_indices)``).

    ``hyper`` is the stage's config (``learning_rate``, ``weight_decay``, ``max_grad_norm``, ``min_lr_ratio``,
    ``seed``; and ``warmup`` as ``hyper.warmup_steps`` when an int, else given by the caller through ``num_steps``).
    Returns the metrics of the steps run in this call (``step`` is 1-based and global).
    """
    options = options or LoopOptions()
    par = options.parallel
    warmup = getattr(hyper, "warmup_steps")
    warmup = warmup(num_examples) if callable(warmup) else int(warmup)
    seed_everything(hyper.seed)
    optimizer = make_optimizer(model, hyper.learning_rate, hyper.weight_decay)
    scheduler = warmup_cosine(optimizer, warmup, num_steps, hyper.min_lr_ratio)
    start = 0
    if options.resume and options.checkpoint_dir and os.path.exists(os.path.join(options.checkpoint_dir, CHECKPOINT_FILE)):
        start = load_train_state(options.checkpoint_dir, model, optimizer, scheduler, hyper)
    stop = num_steps if options.max_steps is None else min(num_steps, options.max_steps)
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(total=stop, initial=min(start, stop), desc=desc, disable=not (progress and par.is_main), leave=False)
    began = time.perf_counter()
    for step, indices in enumerate(minibatch_indices(num_examples, batch_size, num_steps, hyper.seed)):
        if step < start:
            continue  # the resumed run skips the minibatches already trained on (the order is a pure function)
        if step >= stop:
            break
        local = par.shard(indices)
        out = compute(forward_model, local if local else indices[:1])
        weight = out.weight if local else 0.0
        sums = {"loss": float(out.loss.detach()) * out.weight, **out.sums}
        sum_keys = sorted(sums)
        totals = par.all_reduce_sum([weight, *(sums[k] if local else 0.0 for k in sum_keys)])
        global_weight = totals[0]
        # DDP averages gradients over ranks: scaling by world turns that average into the global mean's gradient.
        scaled = out.loss * (weight / global_weight * par.world_size if global_weight else 0.0)
        lr = float(optimizer.param_groups[0]["lr"])
        grad_norm = optimizer_step(model, optimizer, scheduler, scaled, hyper.max_grad_norm)
        metrics = {"step": float(step + 1), "loss": totals[1 + sum_keys.index("loss")] / global_weight}
        metrics.update({k: totals[1 + i] / global_weight for i, k in enumerate(sum_keys) if k != "loss"})
        metrics.update(learning_rate=lr, grad_norm=grad_norm, weight=global_weight,
                       elapsed_s=time.perf_counter() - began)
        history.append(metrics)
        bar.update(1)
        if postfix is not None:
            bar.set_postfix(postfix(metrics))
        if options.on_step is not None:
            options.on_step(metrics)
        done = step + 1
        if options.checkpoint_dir and options.save_every and done % options.save_every == 0 and done < stop:
            save_train_state(options.checkpoint_dir, model, optimizer, scheduler, done, hyper)
    bar.close()
    if options.checkpoint_dir and stop > start:
        save_train_state(options.checkpoint_dir, model, optimizer, scheduler, stop, hyper)
    model.eval()
    return history
