"""``--resume``: a run stopped by ``--max-steps`` and resumed ends equal to one that was not stopped (SFT, RM, PPO),
and metrics.jsonl holds each step once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main
from support import tiny_checkpoints as tc

COMMON = ["--threads", "1", "--no-progress", "--save-every", "2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(keep_torch_threads):
    yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    tc.gpt2_plain(root / "gpt2")
    tc.write_data(root, 24, 24, 16)
    return root


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def stopped_and_resumed(work: Path, name: str, argv: list, total: int, stop_at: int) -> tuple[Path, Path]:
    whole, parts = work / f"{name}-whole", work / f"{name}-parts"
    assert main([str(a) for a in [*argv, "--out", whole, *COMMON]]) == 0
    assert main([str(a) for a in [*argv, "--out", parts, "--max-steps", stop_at, *COMMON]]) == 0
    assert steps_logged(parts) == list(range(1, stop_at + 1))
    assert main([str(a) for a in [*argv, "--out", parts, "--resume", *COMMON]]) == 0
    assert steps_logged(parts) == list(range(1, total + 1))
    return whole, parts


def test_sft_resume_equals_an_unstopped_run(work):
    argv = ["sft", "--model", work / "gpt2", "--data", work / "demos.jsonl", "--num-steps", "8", "--batch-size", "5",
            "--learning-rate", "3e-3", "--warmup-steps", "2"]
    assert_same(*stopped_and_resumed(work, "sft", argv, 8, 3))


def test_rm_resume_equals_an_unstopped_run(work):
    argv = ["rm", "--model", work / "gpt2", "--data", work / "pairs.jsonl", "--num-epochs", "2", "--batch-size", "6",
            "--learning-rate", "3e-3"]
    assert_same(*stopped_and_resumed(work, "rm", argv, 8, 5))


def test_ppo_resume_equals_an_unstopped_run(work):
    argv = ["ppo", "--policy", work / "gpt2", "--reward-model", work / "rm-whole", "--prompts", work / "prompts.jsonl",
            "--steps", "4", "--batch-size", "4", "--num-mini-batches", "2", "--ppo-epochs", "1",
            "--response-length", "6", "--learning-rate", "1e-3"]
    if not (work / "rm-whole").exists():
        pytest.skip("needs the reward model of test_rm_resume_equals_an_unstopped_run")
    assert_same(*stopped_and_resumed(work, "ppo", argv, 4, 2))
