"""LoRA adapters through peft (the optional extra ``pip install 'rlhf-platform[lora]'``).

``--lora-rank R`` freezes the checkpoint and trains low-rank adapters on ``--lora-target-modules`` (default: every
linear layer of the transformer blocks, peft's "all-linear"); a reward model's new scalar head is trained in full.
For PPO the reference policy is the same weights with the adapters switched off (`AdapterDisabled`), so no second
copy of the model is held. The output keeps the adapter in ``--out/adapter`` and, with ``--merge``, the merged
model in ``--out`` itself (what the policy and reward services load); without ``--merge`` ``--out`` holds the
adapter files (load with ``peft.AutoPeftModelForCausalLM.from_pretrained``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from rlhf.train.options import UsageError

ADAPTER_DIR = "adapter"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UsageError("--lora-rank needs peft: pip install 'rlhf-platform[lora]' (or pip install peft)") from None
    return peft


def add_adapters(model: nn.Module, rank: int, alpha: float, target_modules: tuple[str, ...], task: str) -> Any:
    """``model`` wrapped as a peft model with fresh LoRA adapters (B = 0: the model's function is unchanged)."""
    peft = _peft()
    task_type = {"causal": peft.TaskType.CAUSAL_LM, "reward": peft.TaskType.SEQ_CLS}[task]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type=task_type,
                             target_modules=list(target_modules) if target_modules else "all-linear")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise UsageError(f"--lora-target-modules: {e}") from None


def inner_model(peft_model: Any) -> nn.Module:
    """The Hugging Face model inside a peft model, with the LoRA layers in it (what the core's stages call)."""
    return peft_model.base_model.model


class AdapterDisabled(nn.Module):
    """The base model of a peft model: calls run with the adapters switched off. PPO's reference without a copy.

    The peft model is held outside the module tree (not a submodule), so that what the trainer does to its
    reference (``requires_grad_(False)``, ``eval()``, ``state_dict()``) does not reach the policy's parameters.
    """

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft_model.disable_adapter():
            return inner_model(self._peft_model)(*args, **kwargs)


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(1, total):.2f}%)"


def is_lora_key(name: str) -> bool:
    return "lora_" in name

