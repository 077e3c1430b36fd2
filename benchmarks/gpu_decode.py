#!/usr/bin/env python3
"""Decode speed of the policy engine on a GPU, against the memory-bandwidth limit.

    python benchmarks/gpu_decode.py                          # CUDA: ~125M and ~1.1B random-init Llama models, bf16
    python benchmarks/gpu_decode.py --bandwidth-tbps 3.35    # another GPU (H100 SXM: 3.35 TB/s; H200: 4.8, default)
    python benchmarks/gpu_decode.py --device cpu --tiny      # the same logic on tiny models, for a test on the CPU

Why the limit: at small batches a decode step is memory-bound. Every step reads every weight once (plus the KV cache)
to produce one token per row, so a GPU with bandwidth W bytes/s cannot run more than W / (weight bytes) steps per
second. At batch 1 that is the tokens/s ceiling; ``fraction_of_limit`` = measured steps/s x bytes read per step / W
says how much of the memory system the decode uses (the rest is kernel-launch and Python overhead, or compute).

Measured, per model and batch size, decode only (the prompt's prefill is excluded):
* ``engine``: rlhf.policy.engine.BatchEngine, the loop the policy service runs (continuous batching, eager PyTorch);
* ``hf_generate``: transformers' model.generate (greedy, dynamic cache, eager), the model's own loop.
Every row decodes exactly ``--new-tokens`` tokens (no EOS). Random weights decode at the speed of trained ones.
Runs in about 2-4 minutes on an H100/H200 (model init on the GPU, no download); writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.core.generation import SamplingParams
from rlhf.policy.engine import BatchEngine, Row


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-architecture model shape."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=4096, tie_word_embeddings=self.tie_embeddings,
            bos_token_id=1, eos_token_id=None, pad_token_id=0,
        )


# ~125M: GPT-2-small-like width and depth in Llama form. ~1.1B: TinyLlama-1.1B's shape (grouped-query attention).
SHAPES = {
    "125m": Shape("llama-125m", hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=32000,
                  tie_embeddings=True),
    "1b": Shape("llama-1.1b", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                tie_embeddings=False),
}
TINY = {
    "tiny-a": Shape("llama-tiny-a", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512,
                    tie_embeddings=True),
    "tiny-b": Shape("llama-tiny-b", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512,
                    tie_embeddings=False),
}


def build(shape: Shape, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with device:  # initialise on the device: seconds for 1B parameters, no host copy
        model = LlamaForCausalLM(shape.config())
    return model.to(dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters (tied embeddings counted once): what one decode step reads."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(shape: Shape, batch: int, prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> float:
    """Average KV-cache bytes read per decode step (the cache grows from the prompt to prompt + new tokens)."""
    head_dim = shape.hidden // shape.heads
    mean_length = prompt_tokens + new_tokens / 2
    return 2 * shape.layers * shape.kv_heads * head_dim * mean_length * batch * dtype_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Direct:
    """The engine delivers its events to a loop; here they are handled at once on the engine thread."""

    @staticmethod
    def call_soon_threadsafe(fn, *args) -> None:
        fn(*args)


def run_engine(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Decode seconds (first token of the last row to start -> last token) for a batch through BatchEngine."""
    batch = prompts.shape[0]
    done = threading.Event()
    firsts: list[float] = []
    lasts: list[float] = []
    lock = threading.Lock()

    def on_event(event) -> None:
        with lock:
            if event.first_token_at is not None:
                firsts.append(event.first_token_at)
            if event.finish is not None:
                lasts.append(time.monotonic())
                if len(lasts) == batch:
                    done.set()

    engine = BatchEngine(model, eos_token_id=None, pad_token_id=0, loop=_Direct(), max_batch_size=batch,
                         max_wait_s=0.05, name="bench").start()
    try:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        engine.submit([Row(prompts[i].tolist(), params, i, on_event) for i in range(batch)])
        if not done.wait(600):
            raise TimeoutError("the engine did not finish")
    finally:
        engine.stop()
    # Rows admitted together start together; the decode window is from the first token to the last.
    return max(lasts) - min(firsts)


def run_hf(model, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Decode seconds of model.generate: (prefill + new_tokens steps) - (prefill + 1 step), both measured."""

    def timed(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, eos_token_id=None)
        sync(device)
        return time.perf_counter() - start

    return max(timed(new_tokens) - timed(1), 1e-9)


def measure(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    started = time.perf_counter()
    model = build(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    wbytes = weight_bytes(model)
    bandwidth = args.bandwidth_tbps * 1e12
    out = {"shape": dataclasses.asdict(shape), "parameters": params, "weight_bytes": wbytes,
           "limit_steps_per_s": bandwidth / wbytes, "build_s": time.perf_counter() - started, "batches": {}}
    print(f"{shape.name}: {params / 1e6:.2f}M parameters, {wbytes / 1e9:.2f} GB of weights -> at most "
          f"{bandwidth / wbytes:.0f} decode steps/s at {args.bandwidth_tbps} TB/s", flush=True)
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        prompts = torch.randint(2, shape.vocab, (batch, args.prompt_tokens), generator=generator).to(device)
        kv = kv_bytes_per_step(shape, batch, args.prompt_tokens, args.new_tokens, torch.finfo(dtype).bits // 8)
        row = {"kv_bytes_per_step": kv}
        loops = (("engine", functools.partial(run_engine, model, prompts, args.new_tokens)),
                 ("hf_generate", functools.partial(run_hf, model, prompts, args.new_tokens, device)))
        for name, run in loops:
            run()  # warm-up (allocator, kernels)
            seconds = sorted(run() for _ in range(args.repeats))[args.repeats // 2]
            steps = args.new_tokens - 1
            steps_per_s = steps / seconds
            row[name] = {
                "decode_s": seconds,
                "ms_per_step": 1000 / steps_per_s,
                "tokens_per_s": steps_per_s * batch,
                "steps_per_s": steps_per_s,
                "fraction_of_limit": steps_per_s * wbytes / bandwidth,
                "fraction_of_limit_with_kv": steps_per_s * (wbytes + kv) / bandwidth,
            }
            print(f"  batch {batch:3d} {name:11s}: {row[name]['tokens_per_s']:9.0f} tok/s, "
                  f"{row[name]['ms_per_step']:7.2f} ms/step, {100 * row[name]['fraction_of_limit']:5.1f}% of the "
                  f"bandwidth limit (weights), {100 * row[name]['fraction_of_limit_with_kv']:5.1f}% (weights + KV)",
                  flush=True)
        out["batches"][str(batch)] = row
    model = loops = None  # free the weights before the next model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of ~125M and ~1.1B (CPU testing)")
    parser.add_argument("--models", default="125m,1b", help="which shapes: 125m, 1b (ignored with --tiny)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="GPU memory bandwidth, TB/s (H200: 4.8)")
    parser.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --tiny, else torch's default)")
    parser.add_argument("--out", default="out/bench/gpu_decode.json")
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.tiny else 0)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --device cpu --tiny to check the script's logic")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = list(TINY.values()) if args.tiny else [SHAPES[m] for m in args.models.split(",")]

    started = time.perf_counter()
    result = {
        "benchmark": "gpu_decode", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": str(dtype).removeprefix("torch."), "bandwidth_tbps": args.bandwidth_tbps,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "torch": torch.__version__,
        "models": [measure(shape, args, device, dtype) for shape in shapes],
    }
    result["total_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
