"""The training commands ``rlhf sft``, ``rlhf rm`` and ``rlhf ppo``: the core's stages (`rlhf.core.sft`,
`rlhf.core.reward_training`, `rlhf.core.ppo`) on a user's checkpoint and JSONL data, on one process or many
(``torchrun``).

    options.py       flags and ``--config YAML`` through the stages' own frozen dataclasses; --help from their docs
    inputs.py        loading and checking checkpoints, tokenizers and data; `UsageError` for bad input
    distributed.py   the process group under torchrun (gloo on CPU, NCCL on GPU) as a `DataParallel`
    outputs.py       metrics JSONL, PNG of the curves, the saved model with its lineage manifest
    reward_client.py a small client of a running reward service (rlhf.v1 RewardService.Score) with retries
    sft.py rm.py ppo.py   the three commands
"""
