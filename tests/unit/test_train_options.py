"""The training commands' options: one flag per field of the run and stage dataclasses, documented from the
dataclass's own docs; ``--config`` YAML under flags; the stage dataclass's checks as usage errors."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from rlhf.core.ppo import PPOConfig
from rlhf.core.reward_training import RewardTrainingConfig
from rlhf.core.sft import SFTConfig
from rlhf.train import ppo, rm, sft
from rlhf.train.options import UsageError, build, field_docs, parse_value

COMMANDS = [(sft, sft.SFTRun, SFTConfig), (rm, rm.RMRun, RewardTrainingConfig), (ppo, ppo.PPORun, PPOConfig)]


def parser_of(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x")
    module.add_arguments(parser)
    return parser


@pytest.mark.parametrize(("module", "run_cls", "stage_cls"), COMMANDS, ids=["sft", "rm", "ppo"])
def test_help_documents_every_field(module, run_cls, stage_cls):
    text = " ".join(parser_of(module).format_help().split())
    for cls in (run_cls, stage_cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, f"{cls.__name__}.{f.name} has no flag"
            assert f.name in docs and docs[f.name], f"{cls.__name__}.{f.name} has no docstring"
            assert " ".join(docs[f.name].split()[:6]) in text, f"{flag}'s help is not its docstring"


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model: m\ndata: d\nout: o\nlearning_rate: 0.002\nbatch_size: 4\ngradient_checkpointing: true\n")
    args = parser_of(sft).parse_args(["--config", str(config), "--batch-size", "16", "--no-progress"])
    from rlhf.train.options import read_yaml

    run, stage = build([sft.SFTRun, SFTConfig], args, read_yaml(str(config)), str(config))
    assert (run.model, run.data, run.out, run.gradient_checkpointing, run.progress) == ("m", "d", "o", True, False)
    assert stage.learning_rate == 0.002 and stage.batch_size == 16 and stage.num_steps == SFTConfig().num_steps


def test_optional_and_literal_values():
    from typing import Literal

    assert parse_value(float | None, "none", "--x") is None
    assert parse_value(float | None, "0.5", "--x") == 0.5
    assert parse_value(Literal["k1", "k3"], "k3", "--x") == "k3"
    with pytest.raises(UsageError, match=r"--x: must be one of \['k1', 'k3'\], got 'k2'"):
        parse_value(Literal["k1", "k3"], "k2", "--x")
    with pytest.raises(UsageError, match="expected true or false"):
        parse_value(bool, "maybe", "--x")


def test_stage_checks_become_usage_errors():
    args = parser_of(ppo).parse_args(["--policy", "p", "--reward-model", "r", "--prompts", "q", "--out", "o",
                                      "--batch-size", "6", "--num-mini-batches", "4"])
    with pytest.raises(UsageError, match="multiple of num_mini_batches"):
        build([ppo.PPORun, PPOConfig], args)


def test_bfloat16_and_gradient_checkpointing_apply(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from rlhf.cli import main
    from support import tiny_checkpoints as tc

    before = torch.get_num_threads()
    try:
        tc.llama_chatml(tmp_path / "llama")
        tc.write_jsonl(tmp_path / "demos.jsonl", tc.demonstrations(16))
        out = tmp_path / "out"
        assert main(["sft", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "demos.jsonl"), "--out",
                     str(out), "--num-steps", "3", "--batch-size", "4", "--dtype", "bfloat16",
                     "--gradient-checkpointing", "--max-length", "48", "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    run = json.loads((out / "manifest.json").read_text())["config"]
    assert run["max_length"] == 48 and run["run"]["gradient_checkpointing"] is True
