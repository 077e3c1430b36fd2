#!/usr/bin/env python3
"""Dynamic (continuous) batching against one request at a time, 16 concurrent clients, same model, same run.

    python benchmarks/policy_batching.py --size medium --clients 16 --requests 6 --new-tokens 32 --rounds 3

Two `rlhf policy` processes (torch backend, one torch thread each) serve the same model: one with
``--max-batch-size 16`` (rows join a running batch between decode steps), one with ``--max-batch-size 1`` (each
request decodes alone, the others wait in the queue). The same closed-loop load runs against each in alternation:
``--clients`` threads, each sending ``--requests`` sampled Generate calls one after another. Reported: tokens/s,
requests/s and latency percentiles per setting (medians over rounds), and the throughput ratio. Goal: >= 3x.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from policy_common import PROMPTS, build_model, closed_loop, machine, median, policy_process, write_result
from rlhf.v1 import common_pb2, policy_pb2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=6, help="requests per client per round")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="out/bench/policy_batching.json")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="policy-bench-"))
    path = build_model(root, args.size, args.arch)

    def make_request(client: int, i: int) -> policy_pb2.GenerateRequest:
        # Sampled at temperature 1 with fixed seeds: both settings generate the same tokens (per-row seeds).
        return policy_pb2.GenerateRequest(
            prompt=PROMPTS[(client + i) % len(PROMPTS)],
            sampling=common_pb2.SamplingParams(max_new_tokens=args.new_tokens, seed=client * 1000 + i),
        )

    settings = {"batched": args.clients, "one_at_a_time": 1}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    common = ["--max-wait-s", "0.005", "--max-queue", "4096"]
    with policy_process(path, threads=args.threads, extra=["--max-batch-size", str(settings["batched"]), *common]) \
            as batched, \
            policy_process(path, threads=args.threads, extra=["--max-batch-size", "1", *common]) as single:
        addresses = {"batched": batched, "one_at_a_time": single}
        for name, address in addresses.items():  # warm-up
            closed_loop(address, 2, 1, make_request)
        for round_ in range(args.rounds):
            for name, address in addresses.items():
                result = closed_loop(address, args.clients, args.requests, make_request)
                runs[name].append(result)
                print(f"round {round_ + 1} {name:14s}: {result['tokens_per_s']:7.0f} tok/s, "
                      f"{result['requests_per_s']:5.1f} req/s, p50 {result['p50_s'] * 1000:6.0f} ms, "
                      f"p95 {result['p95_s'] * 1000:6.0f} ms")

    summary = {
        name: {key: median([r[key] for r in rs]) for key in ("tokens_per_s", "requests_per_s", "p50_s", "p95_s")}
        for name, rs in runs.items()
    }
    tokens = {name: {r["tokens"] for r in rs} for name, rs in runs.items()}
    ratio = summary["batched"]["tokens_per_s"] / summary["one_at_a_time"]["tokens_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x tokens/s "
          f"(same tokens generated: {tokens['batched'] == tokens['one_at_a_time']})")
    write_result(Path(args.out), {
        "benchmark": "policy_batching", "model": f"{args.arch}-{args.size}", "clients": args.clients,
        "requests_per_client": args.requests, "new_tokens": args.new_tokens, "threads": args.threads,
        "machine": machine(), "summary": summary, "ratio_tokens_per_s": ratio, "runs": runs,
        "same_tokens": tokens["batched"] == tokens["one_at_a_time"],
    })


if __name__ == "__main__":
    main()
