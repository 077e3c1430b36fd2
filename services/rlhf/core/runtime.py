"""Where and how a model runs: the device and dtype named in a service's config, and a model's context length."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype | None:
    if name in ("", "auto"):
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (float32, bfloat16, float16 or auto)")
    return dtype


def model_context(config: object, limit: int = 0) -> int:
    """Longest prompt + response of a model config (GPT-2's n_positions is mapped onto max_position_embeddings),
    cut to ``limit`` when that is set; 0 when neither says."""
    own = int(getattr(config, "max_position_embeddings", 0) or 0)
    if limit and own:
        return min(limit, own)
    return limit or own
