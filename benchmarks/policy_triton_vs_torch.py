#!/usr/bin/env python3
"""The policy service on the Triton backend against the torch backend: same model, same load, same run.

    python benchmarks/policy_triton_vs_torch.py --size medium --clients 16 --requests 4 --rounds 3

A real tritonserver (deploy/local/triton.py: PyPI nvidia-pytriton's binary; CPU here) serves the model from the
repository's decoupled policy model (continuous batching in the Python backend); one `rlhf policy --backend triton`
process fronts it. A second `rlhf policy --backend torch` process serves the same weights in process. The model gets
one torch thread on each side. Two loads run against each in alternation: 1 client (latency) and ``--clients``
concurrent clients (throughput), each client sending ``--requests`` sampled Generate calls one after another.
Both backends generate the same tokens for the same seeds (checked). Reported: medians and the triton/torch ratios.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from policy_common import PROMPTS, REPO, build_model, closed_loop, machine, median, policy_process, write_result
from rlhf.v1 import common_pb2, policy_pb2

TRITON = REPO / "deploy" / "local" / "triton.py"
TEMPLATES = REPO / "deploy" / "triton" / "model_repository"


def triton_cli(state: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(TRITON), "--state", str(state), *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"deploy/local/triton.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="out/bench/policy_triton_vs_torch.json")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="policy-bench-"))
    path = build_model(root, args.size, args.arch)
    repository = root / "model_repository"
    shutil.rmtree(repository, ignore_errors=True)
    shutil.copytree(TEMPLATES, repository)
    state = root / "triton-state"
    out = triton_cli(state, "up", "--model-repository", str(repository), "--model-root", str(root),
                     "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    triton_url = dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))["RLHF_TRITON_GRPC"]

    def make_request(client: int, i: int) -> policy_pb2.GenerateRequest:
        return policy_pb2.GenerateRequest(
            prompt=PROMPTS[(client + i) % len(PROMPTS)],
            sampling=common_pb2.SamplingParams(max_new_tokens=args.new_tokens, seed=client * 1000 + i),
        )

    common = ["--max-batch-size", str(args.clients), "--max-wait-s", "0.002", "--artifact-root", str(root)]
    loads = {"latency_1_client": 1, f"throughput_{args.clients}_clients": args.clients}
    runs: dict[str, dict[str, list[dict]]] = {b: {load: [] for load in loads} for b in ("torch", "triton")}
    try:
        with policy_process(Path(path), threads=args.threads, extra=["--backend", "torch", *common]) as torch_addr, \
                policy_process(Path(path), threads=args.threads, ready_timeout_s=600, extra=[
                    "--backend", "triton", "--triton-url", triton_url, "--triton-model-repository", str(repository),
                    "--model-path", path.name, *common]) as triton_addr:
            addresses = {"torch": torch_addr, "triton": triton_addr}
            for address in addresses.values():
                closed_loop(address, 2, 1, make_request)  # warm-up
            for round_ in range(args.rounds):
                for load, clients in loads.items():
                    requests = args.requests * (4 if clients == 1 else 1)
                    for backend, address in addresses.items():
                        result = closed_loop(address, clients, requests, make_request)
                        runs[backend][load].append(result)
                        print(f"round {round_ + 1} {load:22s} {backend:6s}: {result['tokens_per_s']:7.0f} tok/s, "
                              f"p50 {result['p50_s'] * 1000:6.0f} ms, p95 {result['p95_s'] * 1000:6.0f} ms")
    finally:
        triton_cli(state, "down")

    summary = {
        backend: {load: {key: median([r[key] for r in rs]) for key in ("tokens_per_s", "p50_s", "p95_s")}
                  for load, rs in by_load.items()}
        for backend, by_load in runs.items()
    }
    ratios = {load: {"tokens_per_s": summary["triton"][load]["tokens_per_s"] / summary["torch"][load]["tokens_per_s"],
                     "p50_s": summary["triton"][load]["p50_s"] / summary["torch"][load]["p50_s"]} for load in loads}
    same_tokens = all({r["tokens"] for r in runs["torch"][load]} == {r["tokens"] for r in runs["triton"][load]}
                      for load in loads)
    for load, ratio in ratios.items():
        print(f"{load}: triton/torch throughput {ratio['tokens_per_s']:.2f}x, p50 latency {ratio['p50_s']:.2f}x")
    print(f"same tokens generated by both backends: {same_tokens}")
    write_result(Path(args.out), {
        "benchmark": "policy_triton_vs_torch", "model": f"{args.arch}-{args.size}", "new_tokens": args.new_tokens,
        "threads": args.threads, "machine": machine(), "summary": summary, "ratios": ratios,
        "same_tokens": same_tokens, "runs": runs,
    })


if __name__ == "__main__":
    main()
