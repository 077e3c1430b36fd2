"""A policy for embedded mode when none is configured: a tiny random-init model and a word-level tokenizer trained on
the built-in task's texts, built once under the artifact root. It answers with random words until the built-in demo
(``rlhf demo``) trains a real one and publishes it; it exists so that ``rlhf up`` serves every API from nothing."""
from __future__ import annotations

import os

INITIAL_VERSION = "policy-init"


def ensure_initial_policy(artifact_root: str, version: str = INITIAL_VERSION, size: str = "tiny") -> str:
    """The folder of the initial policy under ``artifact_root``, built on first use (seconds, no download)."""
    from rlhf.core.models import MANIFEST_FILE, Manifest, build_causal_lm, save_artifact
    from rlhf.core.task import world_texts
    from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer

    path = os.path.join(artifact_root, version)
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        return path
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    model = build_causal_lm(tokenizer, size, seed=0)
    tmp = f"{path}.partial-{os.getpid()}"
    save_artifact(tmp, model, tokenizer, Manifest(
        kind="base", version=version, data={"source": "random init; rlhf demo trains the real policy"},
        config={"size": size},
    ))
    os.replace(tmp, path)
    return path
