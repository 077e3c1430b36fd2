"""PPO throughput, ours against TRL's: samples (prompt + response) per second, same models, same PPO shape.

TRL 1.12.0 is the last TRL release with PPO (``trl.experimental.ppo``).  It is never a dependency of ours; run this
with an interpreter that has it, e.g. a virtualenv that sees our editable install through the system site-packages:

    python -m venv --system-site-packages /tmp/trl-venv && /tmp/trl-venv/bin/pip install trl==1.12.0
    /tmp/trl-venv/bin/python benchmarks/ppo_vs_trl.py

Both sides get a fresh random-init GPT-2 of the same config as policy, reference, value model and reward model, the
same prompts, batch size, response length, PPO epochs and mini-batches, float32, dropout off, sampling at
temperature 1, EOS as the stop token.  Ours gets its reward from the same kind of reward model through the text
interface (decode, re-tokenise, score), as in the product; TRL scores token ids.  The repeats interleave ours and
TRL's (so machine noise hits both alike), each repeat times ``--steps`` PPO steps, and the result is the median.
Ours runs twice: with its default value head on the policy, and with a separate critic the size of TRL's value
model (the like-for-like comparison of the PPO loop itself).  TRL runs twice too: as shipped, and with the two
``gc.collect()`` calls of each of its steps switched off (they cost in proportion to the process's heap, not to the
work, so they say more about the process than about the algorithm).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<unk>"]
PAD_ID, EOS_ID = 0, 1


def build_tokenizer(vocab_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"  # TRL's collator pads the queries it generates from; generation wants them on the left
    return tok


def build_prompts(n: int, vocab_words: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (n,), generator=gen).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, vocab_words, (k,), generator=gen)) for k in lengths]


def gpt2_config(args: argparse.Namespace, vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_labels=1,
    )


def build_models(args: argparse.Namespace, vocab_size: int, seed: int) -> dict[str, torch.nn.Module]:
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    config = gpt2_config(args, vocab_size)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(config).eval()
    torch.manual_seed(seed)
    ref = GPT2LMHeadModel(config).eval()
    torch.manual_seed(seed + 1)
    value = GPT2ForSequenceClassification(config).eval()
    torch.manual_seed(seed + 2)
    reward = GPT2ForSequenceClassification(config).eval()
    return {"policy": policy, "ref": ref, "value": value, "reward": reward}


# --- ours ------------------------------------------------------------------------------------------------------------


def text_reward_fn(reward_model: torch.nn.Module, tokenizer):
    """reward_fn(prompts, responses): the reward model's score of prompt + response + EOS, from text."""

    @torch.inference_mode()
    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [f"{p} {r}".strip() for p, r in zip(prompts, responses)]
        ids = [tokenizer(t)["input_ids"] + [EOS_ID] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        hidden = reward_model.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return reward_model.score(hidden[torch.arange(len(ids)), last]).squeeze(-1).float().clone()

    return reward_fn


def make_ours(args: argparse.Namespace, tokenizer, prompts: list[str], separate_critic: bool):
    from rlhf.core.ppo import CriticModel, PPOConfig, PPOTrainer

    models = build_models(args, len(tokenizer), args.seed)
    config = PPOConfig(
        batch_size=args.batch_size, num_mini_batches=args.mini_batches, ppo_epochs=args.ppo_epochs,
        response_length=args.response_length, temperature=1.0, learning_rate=args.lr, kl_coef=0.05,
        kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, seed=args.seed,
    )
    critic = None
    if separate_critic:
        critic = CriticModel(models["value"].transformer, args.n_embd)
    trainer = PPOTrainer(
        config, models["policy"], models["ref"], tokenizer, text_reward_fn(models["reward"], tokenizer), prompts,
        value_model=critic,
    )
    return lambda steps: trainer.train(steps)


# --- TRL -------------------------------------------------------------------------------------------------------------


def make_trl(args: argparse.Namespace, tokenizer, prompts: list[str], workdir: str, skip_gc_collect: bool = False):
    """TRL's PPO.  Its loop calls ``gc.collect()`` twice per step, which costs in proportion to the live Python objects
    of the whole process; ``skip_gc_collect`` turns those calls off (for this trainer's runs only) to show what the
    rest of its loop costs."""
    import types

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    models = build_models(args, len(tokenizer), args.seed)
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})

    def run(steps: int) -> None:
        config = PPOConfig(
            output_dir=workdir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=args.mini_batches, num_ppo_epochs=args.ppo_epochs, response_length=args.response_length,
            total_episodes=steps * args.batch_size, local_rollout_forward_batch_size=args.batch_size,
            num_sample_generations=0, temperature=1.0, learning_rate=args.lr, kl_coef=0.05, kl_estimator="k1",
            cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, stop_token="eos", seed=args.seed,
            bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=config, processing_class=tokenizer, model=models["policy"], ref_model=models["ref"],
            reward_model=models["reward"], train_dataset=dataset, value_model=models["value"],
        )
        trainer.remove_callback(PrinterCallback)  # its per-step metric dicts would flood the output
        real_gc = trl_ppo_module.gc
        if skip_gc_collect:
            trl_ppo_module.gc = types.SimpleNamespace(collect=lambda *a: 0)
        try:
            start = time.perf_counter()
            trainer.train()
            run.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]
        finally:
            trl_ppo_module.gc = real_gc

    return run


# --- the measurement -------------------------------------------------------------------------------------------------


def timed(run, steps: int) -> float:
    """Seconds for ``steps`` PPO steps (TRL's trainer is built per call, outside the timing)."""
    start = time.perf_counter()
    run(steps)
    return getattr(run, "elapsed", time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--mini-batches", type=int, default=1)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-words", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=5, help="PPO steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each side, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench/ppo_vs_trl.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    import trl

    tokenizer = build_tokenizer(args.vocab_words)
    prompts = build_prompts(max(64, args.batch_size * 4), args.vocab_words, args.seed)
    workdir = tempfile.mkdtemp(prefix="ppo-vs-trl-")
    sides = {
        "ours": make_ours(args, tokenizer, prompts, separate_critic=False),
        "ours_separate_critic": make_ours(args, tokenizer, prompts, separate_critic=True),
        "trl": make_trl(args, tokenizer, prompts, workdir),
        "trl_without_gc_collect": make_trl(args, tokenizer, prompts, workdir, skip_gc_collect=True),
    }
    for name, run in sides.items():  # warm-up: first-call costs (allocator, lazy imports) out of the timing
        timed(run, 1)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, run in sides.items():
            seconds[name].append(timed(run, args.steps))
        print(f"repeat {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{n} {args.steps * args.batch_size / s[-1]:.1f} samples/s" for n, s in seconds.items()),
              flush=True)

    samples = args.steps * args.batch_size
    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    result = {
        "benchmark": "ppo_vs_trl",
        "unit": "samples/s (prompt + response through one full PPO step), median of repeats",
        "samples_per_s": rate,
        "s_per_step_median": {name: statistics.median(s) / args.steps for name, s in seconds.items()},
        "ratio_ours_over_trl": rate["ours"] / rate["trl"],
        "ratio_ours_separate_critic_over_trl": rate["ours_separate_critic"] / rate["trl"],
        "ratio_ours_over_trl_without_gc_collect": rate["ours"] / rate["trl_without_gc_collect"],
        "ratio_ours_separate_critic_over_trl_without_gc_collect": (
            rate["ours_separate_critic"] / rate["trl_without_gc_collect"]
        ),
        # Each repeat runs all sides back to back, so a repeat's ratio sees one machine load: the median of the
        # per-repeat ratios is the steadier number on a shared machine.
        "median_of_repeat_ratios": {
            f"{name}_over_{base}": statistics.median(b / a for a, b in zip(seconds[name], seconds[base]))
            for name in ("ours", "ours_separate_critic")
            for base in ("trl", "trl_without_gc_collect")
        },
        "raw_seconds_per_repeat": seconds,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform()},
    }
    print(json.dumps({k: v for k, v in result.items() if k in ("samples_per_s", "median_of_repeat_ratios")
                      or k.startswith("ratio")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
