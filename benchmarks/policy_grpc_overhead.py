#!/usr/bin/env python3
"""What serving costs: B concurrent gRPC Generate calls to `rlhf policy` (torch backend, its own process) against the
model's own `generate` called in-process on the same batch of B prompts, in the same run.

    python benchmarks/policy_grpc_overhead.py --size medium --batches 1,8,16 --new-tokens 64 --rounds 5

Both sides decode greedily with one torch thread each, from the same formatted prompts, so they produce the same
tokens (checked: the texts are compared and differences counted) and the ratio compares equal work:
* ``hf``: transformers' ``model.generate(do_sample=False)`` on the left-padded batch (the model's own generate);
* ``core``: ``rlhf.core.generation.generate`` on the same batch (the decoding loop the service's engine shares);
* ``service``: B client threads released together, each one Generate call; time until the last answer.
Rounds alternate (service, hf, core, ...) so that drift on a shared machine hits all alike; medians are reported.
Goal: service >= 0.95x of in-process at batch >= 8.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import torch

from policy_common import (
    PROMPTS,
    build_model,
    fire_together,
    greedy_request,
    machine,
    median,
    policy_process,
    write_result,
)
from rlhf.core.generation import SamplingParams, decode_responses, generate, left_pad
from rlhf.core.models import load_causal_lm
from rlhf.core.tokenizer import format_prompt
from rlhf.v1 import policy_pb2_grpc


def encode(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=True)["input_ids"] for p in prompts]
    return left_pad(ids, tokenizer.pad_token_id)


def hf_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[float, list[str]]:
    input_ids, mask = encode(tokenizer, prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    return elapsed, texts


def core_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[float, list[str]]:
    input_ids, mask = encode(tokenizer, prompts)
    start = time.perf_counter()
    out = generate(model, input_ids, mask, SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    return elapsed, decode_responses(tokenizer, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", help="rlhf.core.models size: tiny, small, medium")
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, on each side")
    parser.add_argument("--max-wait-s", type=float, default=0.002,
                        help="the service's batching window (max_wait_s): what an idle engine waits for company")
    parser.add_argument("--workdir", default=None, help="where the model is built (default: a temporary folder)")
    parser.add_argument("--out", default="out/bench/policy_grpc_overhead.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="policy-bench-"))
    path = build_model(root, args.size, args.arch)
    model, tokenizer = load_causal_lm(str(path))
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.arch}-{args.size}: {params / 1e6:.1f}M parameters; {args.new_tokens} new tokens; "
          f"{args.threads} torch thread(s) per side")

    results: dict = {"benchmark": "policy_grpc_overhead", "model": f"{args.arch}-{args.size}", "parameters": params,
                     "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds,
                     "machine": machine(), "batches": {}}
    extra = ["--max-batch-size", str(max(batches)), "--max-wait-s", str(args.max_wait_s),
             "--max-new-tokens-limit", str(max(args.new_tokens, 512))]
    with policy_process(path, threads=args.threads, extra=extra) as address, grpc.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for batch in batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            requests = [greedy_request(p, args.new_tokens) for p in prompts]
            times: dict[str, list[float]] = {"service": [], "hf": [], "core": []}
            mismatches = 0
            for round_ in range(args.rounds + 1):  # round 0 warms up
                service_s, replies = fire_together(stub, requests)
                hf_s, hf_texts = hf_generate(model, tokenizer, prompts, args.new_tokens)
                core_s, core_texts = core_generate(model, tokenizer, prompts, args.new_tokens)
                service_texts = [r.samples[0].text for r in replies]
                # Logits can differ in their last bits between batch shapes; a near-tie may then flip a greedy token.
                mismatches += sum(a != b or a != c for a, b, c in zip(service_texts, hf_texts, core_texts, strict=True))
                if round_:
                    times["service"].append(service_s)
                    times["hf"].append(hf_s)
                    times["core"].append(core_s)
            tokens = sum(r.samples[0].completion_tokens for r in replies)
            row = {name: {"median_s": median(ts), "tokens_per_s": tokens / median(ts), "runs_s": ts}
                   for name, ts in times.items()}
            row["tokens"] = tokens
            row["rows_with_different_text"] = mismatches
            row["service_vs_hf"] = median(times["hf"]) / median(times["service"])
            row["service_vs_core"] = median(times["core"]) / median(times["service"])
            results["batches"][str(batch)] = row
            print(f"batch {batch:3d}: service {row['service']['tokens_per_s']:8.0f} tok/s | "
                  f"hf generate {row['hf']['tokens_per_s']:8.0f} tok/s | core generate "
                  f"{row['core']['tokens_per_s']:8.0f} tok/s | service/hf {row['service_vs_hf']:.2f}x, "
                  f"service/core {row['service_vs_core']:.2f}x")
    write_result(Path(args.out), results)


if __name__ == "__main__":
    main()
