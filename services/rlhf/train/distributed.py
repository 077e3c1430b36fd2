"""The process group of a ``torchrun`` launch, as the core's `DataParallel` (one process without torchrun).

``torchrun --nproc-per-node N -m rlhf sft ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; this joins the
group with gloo on the CPU and NCCL on CUDA devices. A multi-node run is the same command with torchrun's rendezvous
flags (``--nnodes``, ``--rdzv-endpoint``). This is the one place the training commands read the environment.
"""
from __future__ import annotations

import datetime
import os

import torch

from rlhf.core.train_loop import DataParallel
from rlhf.train.options import UsageError


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def setup(device: str = "auto", fsdp: bool = False) -> DataParallel:
    """Join the torchrun group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    elif fsdp:
        raise UsageError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N (N >= 2)")
    return DataParallel(rank=rank, world_size=world, device=dev, fsdp=fsdp and world > 1)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
