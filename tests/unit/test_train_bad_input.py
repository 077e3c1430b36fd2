"""Bad input to `rlhf sft | rm | ppo`: each case is one message naming the file, the line and the field (or the
flag), exit status 2, and no traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf.cli import main
from support import tiny_checkpoints as tc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    tc.llama_chatml(root / "llama")
    tc.write_data(root, 8, 8, 8)
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread(keep_torch_threads):
    yield


def fails(capsys, *argv) -> str:
    """Run the command, expect exit status 2 and one error line without a traceback; return stderr."""
    code = main([str(a) for a in argv] + ["--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "error:" in err
    return err


def sft(work: Path, *extra) -> list:
    return ["sft", "--model", work / "llama", "--data", work / "demos.jsonl", "--out", work / "out-sft",
            "--num-steps", "1", "--batch-size", "2", *extra]


def test_missing_file(work, capsys):
    err = fails(capsys, "sft", "--model", work / "llama", "--data", work / "nope.jsonl", "--out", work / "o")
    assert f"--data {work / 'nope.jsonl'}: no such file or directory" in err
    err = fails(capsys, "sft", "--model", work / "no-model", "--data", work / "demos.jsonl", "--out", work / "o")
    assert "--model" in err and "no such file or directory" in err


def test_missing_required_flag(work, capsys):
    assert "--data is required" in fails(capsys, "sft", "--model", work / "llama", "--out", work / "o")


def test_bad_jsonl_line(work, capsys):
    bad = work / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n')
    assert f"{bad}:2: not valid JSON" in fails(capsys, *sft(work)[:3], "--data", bad, "--out", work / "o")
    missing = work / "missing.jsonl"
    missing.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": 3}\n')
    err = fails(capsys, *sft(work)[:3], "--data", missing, "--out", work / "o")
    assert f"{missing}:3: field 'response': must be a string, got int" in err
    ranking = work / "ranking.jsonl"
    ranking.write_text('{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]}\n')
    err = fails(capsys, "rm", "--model", work / "llama", "--data", ranking, "--out", work / "o")
    assert f"{ranking}:1: field 'ranking': must list each index" in err
    prompts = work / "bad-prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    err = fails(capsys, "ppo", "--policy", work / "llama", "--reward-model", "grpc://127.0.0.1:1", "--prompts",
                prompts, "--out", work / "o")
    assert f"{prompts}:2: field 'messages[0].role': must be one of" in err


def test_prompt_longer_than_the_context(work, capsys):
    long = work / "long.jsonl"
    rows = tc.demonstrations(3)
    rows[1]["prompt"] = "What colour is the car? " * 40
    tc.write_jsonl(long, rows)
    err = fails(capsys, *sft(work)[:3], "--data", long, "--out", work / "o", "--max-length", "64")
    assert f"{long}:2: field 'prompt':" in err and "tokens with the chat template" in err and "--max-length 64" in err
    prompts = work / "long-prompts.jsonl"
    tc.write_jsonl(prompts, [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "car " * 200}]}])
    err = fails(capsys, "ppo", "--policy", work / "llama", "--reward-model", "grpc://127.0.0.1:1", "--prompts",
                prompts, "--out", work / "o")
    assert f"{prompts}:2: field 'messages':" in err and "response_length 32" in err


def test_tokenizer_without_pad_token_says_which_token_pads(work, capsys):
    assert main([str(a) for a in sft(work, "--threads", "1", "--no-progress")]) == 0
    err = capsys.readouterr().err
    assert "the tokenizer has no pad token; padding with its eos token '<|im_end|>' (id 3)" in err


def test_tokenizer_without_pad_or_eos_token(work, capsys):
    from transformers import AutoTokenizer

    folder = work / "no-eos"
    tc.llama_chatml(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    err = fails(capsys, "sft", "--model", folder, "--data", work / "demos.jsonl", "--out", work / "o")
    assert "the tokenizer has neither a pad token nor an eos token; add one" in err


def test_not_a_causal_lm(work, capsys):
    encoder = work / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    err = fails(capsys, "sft", "--model", encoder, "--data", work / "demos.jsonl", "--out", work / "o")
    assert f"--model {encoder}: not a causal LM (config.json: architectures ['BertModel'])" in err
    classifier = work / "classifier"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                               pad_token_id=0)).save_pretrained(classifier)
    err = fails(capsys, "ppo", "--policy", classifier, "--reward-model", "grpc://127.0.0.1:1", "--prompts",
                work / "prompts.jsonl", "--out", work / "o")
    assert "not a causal LM (config.json: architectures ['LlamaForSequenceClassification'])" in err


def test_reward_model_with_more_than_one_label(work, capsys):
    three = work / "three-labels"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=3,
                                               pad_token_id=0)).save_pretrained(three)
    err = fails(capsys, "ppo", "--policy", work / "llama", "--reward-model", three, "--prompts",
                work / "prompts.jsonl", "--out", work / "o")
    assert f"--reward-model {three}: a classifier with 3 labels" in err
    err = fails(capsys, "rm", "--model", three, "--data", work / "pairs.jsonl", "--out", work / "o")
    assert "a classifier with 3 labels" in err


def test_bad_option_values_and_yaml(work, capsys):
    assert "--batch-size: expected an integer, got 'many'" in fails(capsys, *sft(work, "--batch-size", "many"))
    assert "--dtype: must be one of" in fails(capsys, *sft(work, "--dtype", "float8"))
    config = work / "opts.yaml"
    config.write_text("learning_rate: 1e-4\nlr: 3\n")
    assert f"{config}: unknown option(s) ['lr']" in fails(capsys, *sft(work, "--config", config))
    config.write_text("warmup_steps: [1, 2]\n")
    assert f"{config}: warmup_steps: expected an integer" in fails(capsys, *sft(work, "--config", config))
    err = fails(capsys, "ppo", "--policy", work / "llama", "--reward-model", "grpc://127.0.0.1:1", "--prompts",
                work / "prompts.jsonl", "--out", work / "o", "--batch-size", "10", "--num-mini-batches", "4")
    assert "batch_size (10) must be a multiple of num_mini_batches (4)" in err


def test_resume_needs_a_checkpoint_and_a_fresh_run_does_not_clobber_one(work, capsys):
    out = work / "resume-out"
    err = fails(capsys, *sft(work)[:5], "--out", out, "--resume", "--num-steps", "1", "--batch-size", "2")
    assert "--resume: no checkpoint in" in err
    assert main([str(a) for a in [*sft(work)[:5], "--out", out, "--num-steps", "1", "--batch-size", "2",
                                  "--threads", "1", "--no-progress"]]) == 0
    capsys.readouterr()
    err = fails(capsys, *sft(work)[:5], "--out", out, "--num-steps", "1", "--batch-size", "2")
    assert "already holds a checkpoint" in err and "pass --resume" in err


def test_unreachable_reward_service(work, capsys):
    err = fails(capsys, "ppo", "--policy", work / "llama", "--reward-model", "grpc://127.0.0.1:1", "--prompts",
                work / "prompts.jsonl", "--out", work / "o-ppo", "--batch-size", "2", "--num-mini-batches", "1",
                "--response-length", "4", "--reward-attempts", "2", "--reward-timeout-s", "2")
    assert "reward service at 127.0.0.1:1: UNAVAILABLE" in err and "(after 2 tries)" in err
