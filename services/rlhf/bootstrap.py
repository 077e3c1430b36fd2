"""Models for embedded mode when none is configured, built once under the artifact root (seconds, no download): a tiny
random-init policy with a word-level tokenizer trained on the built-in task's texts, and a tiny random-init reward
model on the same tokenizer. They answer with random words and scores until ``rlhf demo`` trains real ones; they exist
so that ``rlhf up`` serves every API from nothing."""
from __future__ import annotations

import os
from collections.abc import Callable

INITIAL_POLICY = "policy-init"
INITIAL_REWARD = "reward-init"


def _build_once(path: str, build: Callable[[str], None]) -> str:
    """``build(tmp)`` writes an artifact into ``tmp``, renamed to ``path`` when complete (a crash leaves no half)."""
    from rlhf.core.models import MANIFEST_FILE

    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        return path
    tmp = f"{path}.partial-{os.getpid()}"
    build(tmp)
    os.replace(tmp, path)
    return path


def _tokenizer():
    from rlhf.sim import world_texts
    from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer(world_texts(), TokenizerConfig(kind="word"))


def ensure_initial_policy(artifact_root: str, version: str = INITIAL_POLICY, size: str = "tiny") -> str:
    """The folder of the initial policy under ``artifact_root``, built on first use."""
    from rlhf.core.models import Manifest, build_causal_lm, save_artifact

    def build(tmp: str) -> None:
        tokenizer = _tokenizer()
        save_artifact(tmp, build_causal_lm(tokenizer, size, seed=0), tokenizer, Manifest(
            kind="base", version=version, data={"source": "random init; rlhf demo trains the real policy"},
            config={"size": size},
        ))

    return _build_once(os.path.join(artifact_root, version), build)


def ensure_initial_reward_model(artifact_root: str, version: str = INITIAL_REWARD, size: str = "tiny") -> str:
    """The folder of the initial reward model under ``artifact_root`` (a scalar head on a random-init causal LM),
    built on first use."""
    from rlhf.core.models import Manifest, build_causal_lm, build_reward_model, save_artifact

    def build(tmp: str) -> None:
        tokenizer = _tokenizer()
        backbone = build_causal_lm(tokenizer, size, seed=0)
        reward_model = build_reward_model(backbone, tokenizer, seed=0)
        head = getattr(reward_model.model, "score", None)
        if head is not None:  # build_reward_model zeroes the head for training; give this one scores that differ
            import torch

            torch.manual_seed(0)
            torch.nn.init.normal_(head.weight, std=0.5)
        save_artifact(tmp, reward_model, tokenizer, Manifest(
            kind="reward", version=version,
            data={"source": "random init; rlhf demo and the trainer train real reward models"}, config={"size": size},
        ))

    return _build_once(os.path.join(artifact_root, version), build)
