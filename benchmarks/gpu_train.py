"""The training stages on a GPU, prepared to run as one script where a device is lent: for a random-init model of
about 125M parameters (GPT-2 architecture) and of about 1B (Llama architecture), in bfloat16:

1. SFT tokens per second of the core's loop (`rlhf.core.sft.train_causal_lm`, what `rlhf sft` runs) and the model
   FLOPs utilisation: MFU = (6 N + 12 L d T) * tokens/s / peak, N parameters, L blocks, d width, T sequence length
   (PaLM's appendix B), peak = ``--peak-tflops`` (989 for H100/H200 SXM dense bf16);
2. PPO samples per second of `rlhf.core.ppo.PPOTrainer` (policy with a value head, a frozen reference, a reward
   model of the same architecture scoring text), with the time of each phase: generation, scoring, the rollout's
   forward passes (log-probs, values, reference), and the update;
3. TRL's SFTTrainer on the same model and batches, for the SFT ratio, if ``trl`` imports (it is never installed by
   this script; the result says why it was skipped).

Weights are random (no download); the tokenizer is a byte-level BPE trained here on pseudo-words to a 32k
vocabulary so that the embedding is the usual size. Everything is timed after warm-up steps, with
``torch.cuda.synchronize``. Results go to ``--out`` (JSON) and stdout.

    python benchmarks/gpu_train.py                          # on the GPU machine: both sizes
    python benchmarks/gpu_train.py --sizes 125m --steps 20  # one size
    python benchmarks/gpu_train.py --tiny --device cpu      # the smoke test (tests/unit/test_train_gpu_bench.py)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    # ~124M with a 32k vocabulary: GPT-2 small's width, 14 blocks instead of 12 for its 50k embedding's share.
    "125m": dict(arch="gpt2", n_layer=14, n_embd=768, n_head=12),
    # ~0.98B: Llama, 18 blocks of 2048 (SwiGLU 5504), tied embeddings.
    "1b": dict(arch="llama", n_layer=18, n_embd=2048, n_head=16, intermediate=5504),
    # the smoke test's sizes
    "tiny-gpt2": dict(arch="gpt2", n_layer=2, n_embd=64, n_head=4),
    "tiny-llama": dict(arch="llama", n_layer=2, n_embd=64, n_head=4, intermediate=128),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tokenizer(vocab_size: int):
    """A byte-level BPE trained on pseudo-words until ``vocab_size`` tokens (whole words for frequent ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(vocab_size * 2)]
    corpus = [" ".join(rng.choice(words) for _ in range(64)) for _ in range(max(200, vocab_size // 8))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"), words


def make_config(size: dict, vocab: int, positions: int, tokenizer, num_labels: int | None = None):
    from transformers import GPT2Config, LlamaConfig

    special = dict(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if num_labels is not None:
        special["num_labels"] = num_labels
    if size["arch"] == "gpt2":
        return GPT2Config(n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=size["n_head"], n_positions=positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    return LlamaConfig(hidden_size=size["n_embd"], intermediate_size=size["intermediate"],
                       num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
                       num_key_value_heads=size["n_head"], max_position_embeddings=positions, **special)


def flops_per_token(n_params: int, size: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls of forward and backward, plus attention's 12 L d T."""
    return 6 * n_params + 12 * size["n_layer"] * size["n_embd"] * seq_len


# --------------------------------------------------------------------------------------------------------------------
# 1. SFT


def random_batcher(vocab: int, batch: int, seq_len: int, pad_id: int):
    """``indices -> CausalLMBatch`` of random tokens: the first half a prompt (no loss), the rest the response."""
    from rlhf.core.sft import IGNORE_INDEX, CausalLMBatch

    def make_batch(indices: list[int]) -> CausalLMBatch:
        g = torch.Generator().manual_seed(indices[0])
        ids = torch.randint(2, vocab, (len(indices), seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 2] = IGNORE_INDEX
        return CausalLMBatch(ids, torch.ones_like(ids), labels)

    return make_batch


def bench_sft(name: str, size: dict, args, tokenizer, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf.core.sft import SFTConfig, train_causal_lm
    from rlhf.core.train_loop import LoopOptions

    vocab = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(size, vocab, args.seq_len, tokenizer)).to(device, args.dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(metrics: dict) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    steps = args.warmup + args.steps
    config = SFTConfig(learning_rate=1e-4, batch_size=args.batch_size, num_steps=steps, warmup_steps=1,
                       max_length=args.seq_len)
    sync(device)
    last[0] = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_causal_lm(model, random_batcher(vocab, args.batch_size, args.seq_len, tokenizer.pad_token_id),
                    10**6, config, progress=False, options=LoopOptions(on_step=on_step))
    timed = times[args.warmup:]
    tokens_per_s = args.batch_size * args.seq_len * len(timed) / sum(timed)
    result = {"parameters": n_params, "tokens_per_s": tokens_per_s, "step_s": sum(timed) / len(timed),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": str(args.dtype)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["mfu"] = flops_per_token(n_params, size, args.seq_len) * tokens_per_s / (args.peak_tflops * 1e12)
    del model
    return result


def bench_trl_sft(size: dict, args, tokenizer, device: torch.device, ours: dict) -> dict:
    """TRL's SFTTrainer, same model, batch, sequence length and dtype; the ratio ours / TRL."""
    try:
        import trl  # noqa: F401
        from datasets import Dataset
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer
    except Exception as e:  # not installed, or does not import against this torch/transformers
        return {"skipped": f"trl not usable here: {type(e).__name__}: {e}"}
    from transformers import AutoModelForCausalLM, TrainerCallback

    vocab = len(tokenizer)
    make_batch = random_batcher(vocab, args.batch_size, args.seq_len, tokenizer.pad_token_id)
    rows = []
    for i in range((args.warmup + args.steps) * args.batch_size):
        b = make_batch([i])
        half = args.seq_len // 2  # pre-tokenized: TRL skips its own tokenization; loss on the completion only
        rows.append({"input_ids": b.input_ids[0].tolist(),
                     "completion_mask": [0] * half + [1] * (args.seq_len - half)})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(size, vocab, args.seq_len, tokenizer)).to(device, args.dtype)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            sync(device)
            times.append(time.perf_counter() - self.t)

    try:
        config = TRLConfig(output_dir=os.path.join(args.workdir, "trl"), per_device_train_batch_size=args.batch_size,
                           max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=10**6,
                           save_strategy="no", report_to="none", bf16=args.dtype == torch.bfloat16,
                           max_length=args.seq_len, completion_only_loss=True, use_cpu=device.type == "cpu",
                           gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    except Exception as e:
        return {"skipped": f"TRL's SFTTrainer failed here: {type(e).__name__}: {e}"}
    timed = times[args.warmup:]
    tokens_per_s = args.batch_size * args.seq_len * len(timed) / sum(timed)
    return {"tokens_per_s": tokens_per_s, "ratio_ours_vs_trl": ours["tokens_per_s"] / tokens_per_s,
            "trl_version": __import__("trl").__version__}


# --------------------------------------------------------------------------------------------------------------------
# 2. PPO


def bench_ppo(size: dict, args, tokenizer, words: list[str], device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import rlhf.core.ppo as ppo_module
    from rlhf.core.models import RewardModel
    from rlhf.core.ppo import PPOConfig, PPOTrainer

    vocab = len(tokenizer)
    positions = args.prompt_len + args.response_len + 8
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(make_config(size, vocab, positions, tokenizer)).to(device, args.dtype)
    reward_hf = AutoModelForSequenceClassification.from_config(
        make_config(size, vocab, positions * 2, tokenizer, num_labels=1)).to(device, args.dtype)
    reward_model = RewardModel(reward_hf, tokenizer, max_length=positions * 2)
    reward_model.requires_grad_(False)
    phases = {"generation_s": 0.0, "scoring_s": 0.0}

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        sync(device)
        t = time.perf_counter()
        out = reward_model.score(prompts, [r or " " for r in responses], batch_size=args.ppo_batch_size)
        sync(device)
        phases["scoring_s"] += time.perf_counter() - t
        return out

    real_generate = ppo_module.generate

    def timed_generate(*a, **k):  # noqa: ANN002, ANN003, ANN202 - the benchmark's own timer around generation
        sync(device)
        t = time.perf_counter()
        out = real_generate(*a, **k)
        sync(device)
        phases["generation_s"] += time.perf_counter() - t
        return out

    ppo_module.generate = timed_generate
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_len // 2)) for _ in range(256)]
    config = PPOConfig(batch_size=args.ppo_batch_size, num_mini_batches=args.ppo_mini_batches, ppo_epochs=args.ppo_epochs,
                       response_length=args.response_len, learning_rate=1e-6)
    trainer = PPOTrainer(config, policy, None, tokenizer, reward_fn, prompts,
                         encode_prompt=lambda p: tokenizer(p)["input_ids"][: args.prompt_len])
    rows = []
    try:
        for step in range(args.ppo_warmup + args.ppo_steps):
            phases.update(generation_s=0.0, scoring_s=0.0)
            sync(device)
            t = time.perf_counter()
            m = trainer.step()
            sync(device)
            if step >= args.ppo_warmup:
                rollout_forward = m["time_rollout_s"] - phases["generation_s"] - phases["scoring_s"]
                rows.append({"step_s": time.perf_counter() - t, "generation_s": phases["generation_s"],
                             "scoring_s": phases["scoring_s"], "rollout_forward_s": rollout_forward,
                             "update_s": m["time_update_s"], "response_length": m["response_length"]})
    finally:
        ppo_module.generate = real_generate
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    result = {"samples_per_s": args.ppo_batch_size / mean["step_s"], **{f"mean_{k}": v for k, v in mean.items()},
              "batch_size": args.ppo_batch_size, "response_len": args.response_len, "prompt_len": args.prompt_len,
              "ppo_epochs": args.ppo_epochs, "mini_batches": args.ppo_mini_batches}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="125m,1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--ppo-batch-size", type=int, default=64)
    parser.add_argument("--ppo-mini-batches", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--ppo-warmup", type=int, default=1)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes and budgets (seconds on a CPU)")
    parser.add_argument("--out", default=str(REPO / "out" / "bench" / "gpu_train.json"))
    parser.add_argument("--workdir", default="/tmp/gpu_train_bench")
    args = parser.parse_args()
    if args.tiny:
        args.sizes = args.sizes if args.sizes != parser.get_default("sizes") else "tiny-gpt2,tiny-llama"
        args.seq_len, args.batch_size, args.steps, args.warmup = 32, 4, 2, 1
        args.ppo_batch_size, args.ppo_mini_batches, args.ppo_epochs, args.prompt_len, args.response_len = 4, 2, 1, 8, 6
        args.ppo_steps, args.ppo_warmup = 1, 1
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; on a CPU run --tiny --device cpu")
    os.makedirs(args.workdir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer, words = make_tokenizer(512 if args.tiny else 32000)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "vocab": len(tokenizer), "sizes": {}}
    for name in args.sizes.split(","):
        size = SIZES[name]
        entry: dict = {"arch": size["arch"], "shape": size}
        entry["sft"] = bench_sft(name, size, args, tokenizer, device)
        print(f"[{name}] SFT {entry['sft']['tokens_per_s']:.0f} tokens/s"
              + (f", MFU {entry['sft']['mfu']:.1%}" if "mfu" in entry["sft"] else ""), flush=True)
        entry["trl_sft"] = ({"skipped": "--no-trl"} if args.no_trl
                            else bench_trl_sft(size, args, tokenizer, device, entry["sft"]))
        print(f"[{name}] TRL SFT: {entry['trl_sft']}", flush=True)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        entry["ppo"] = bench_ppo(size, args, tokenizer, words, device)
        p = entry["ppo"]
        print(f"[{name}] PPO {p['samples_per_s']:.1f} samples/s: generation {p['mean_generation_s']:.2f} s, "
              f"scoring {p['mean_scoring_s']:.2f} s, rollout forward {p['mean_rollout_forward_s']:.2f} s, "
              f"update {p['mean_update_s']:.2f} s per step", flush=True)
        report["sizes"][name] = entry
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
