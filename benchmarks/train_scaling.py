"""SFT tokens per second with 2 processes (torchrun, DDP on gloo) against 1, on this machine; and the memory LoRA
saves against full fine-tuning.

Both measurements run the real command, `rlhf sft`, in fresh processes on one random-init Llama-style checkpoint
built here (ChatML byte-level BPE tokenizer from tests/support/tiny_checkpoints.py), with the same global batch:

1. scaling: ``python -m rlhf sft`` vs ``torchrun --nproc-per-node 2 -m rlhf sft``, one torch thread per process,
   ``--repeats`` interleaved runs each; tokens/s = (tokens of steps k+1..n) / (elapsed of those steps) from
   metrics.jsonl (the first ``--skip`` steps are warm-up). The model and data are the same, and so are the weights
   at the end (tests/integration/test_train_torchrun.py), so the ratio is throughput alone.
2. LoRA memory: the same SFT run with and without ``--lora-rank``: trainable parameters, the bytes of gradients and
   AdamW state they need (exact: 4 + 8 bytes per trainable float32 parameter), and the peak resident memory of
   the process (``ru_maxrss``; it includes the ~0.5 GB of torch and transformers themselves).

    python benchmarks/train_scaling.py                 # results in out/bench/train_scaling.json
    python benchmarks/train_scaling.py --tiny          # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build(root: Path, hidden: int, layers: int, demos: int) -> tuple[Path, Path]:
    from support import tiny_checkpoints as tc

    model = tc.llama_chatml(root / "model", hidden=hidden, layers=layers)
    data = tc.write_jsonl(root / "demos.jsonl", tc.demonstrations(demos))
    return model, data


def run_sft(nproc: int, model: Path, data: Path, out: Path, steps: int, batch: int, extra: list[str]) -> dict:
    """One `rlhf sft` run; returns its metrics rows and the process's peak RSS (MiB, the largest rank's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--_peak-rss-of"]
    cmd = [*(runner if nproc > 1 else [sys.executable]), *(["-m", "rlhf"] if nproc > 1 else ["-m", "rlhf"]),
           "sft", "--model", str(model), "--data", str(data), "--out", str(out), "--num-steps", str(steps),
           "--batch-size", str(batch), "--warmup-steps", "1", "--learning-rate", "1e-3", "--threads", "1",
           "--no-progress", "--save-every", "0", *extra]
    if nproc == 1:
        cmd = [*wrapper, *cmd[1:]]  # measure the single process's peak memory
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = next((float(line.split()[-1]) for line in proc.stderr.splitlines() if line.startswith("peak_rss_mib")),
                None)
    return {"rows": rows, "wall_s": time.perf_counter() - started, "peak_rss_mib": peak}


def tokens_per_s(rows: list[dict], skip: int) -> float:
    kept = rows[skip:]
    elapsed = kept[-1]["elapsed_s"] - rows[skip - 1]["elapsed_s"] if skip else kept[-1]["elapsed_s"]
    return sum(r["tokens"] for r in kept) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (examples per step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--memory-hidden", type=int, default=768, help="width of the LoRA-memory model")
    parser.add_argument("--memory-layers", type=int, default=8, help="blocks of the LoRA-memory model")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny model, few steps, one repeat")
    parser.add_argument("--out", default=str(REPO / "out" / "bench" / "train_scaling.json"))
    parser.add_argument("--_peak-rss-of", dest="peak_rss_of", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_of is not None:  # internal: run `python -m rlhf ...` here and report the peak RSS
        import resource
        import runpy

        sys.argv = ["rlhf", *args.peak_rss_of[2:]]  # drop "-m rlhf"
        try:
            runpy.run_module("rlhf", run_name="__main__")
        except SystemExit as e:
            print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", file=sys.stderr)
            raise SystemExit(e.code) from None
        return
    if args.tiny:
        args.hidden, args.layers, args.steps, args.skip, args.repeats, args.batch_size = 32, 1, 4, 1, 1, 8
        args.memory_hidden, args.memory_layers, args.memory_steps = 64, 1, 2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = build(root, args.hidden, args.layers, max(256, args.batch_size * 4))
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for nproc in (1, 2):  # interleaved: machine load hits both alike
                res = run_sft(nproc, model, data, root / f"s{nproc}-{r}", args.steps, args.batch_size, [])
                rates[nproc].append(tokens_per_s(res["rows"], args.skip))
        memory = {}
        from support import tiny_checkpoints as tc

        big = tc.llama_chatml(root / "memory-model", hidden=args.memory_hidden, layers=args.memory_layers)
        for name, extra in (("full", []), ("lora", ["--lora-rank", str(args.lora_rank)])):
            res = run_sft(1, big, data, root / f"m-{name}", args.memory_steps, args.batch_size, extra)
            memory[name] = {"peak_rss_mib": res["peak_rss_mib"],
                            "tokens_per_s": tokens_per_s(res["rows"], 1)}
        # Exact bytes of what training adds per trainable float32 parameter: its gradient (4) and AdamW's two
        # moments (8).
        import peft  # noqa: F401 - the lora extra

        from rlhf.train.lora import add_adapters

        full_model = AutoModelForCausalLM.from_pretrained(big)
        trainable_full = sum(p.numel() for p in full_model.parameters())
        lora_model = add_adapters(AutoModelForCausalLM.from_pretrained(big), args.lora_rank, 16.0, (), "causal")
        trainable_lora = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
        for name, trainable in (("full", trainable_full), ("lora", trainable_lora)):
            memory[name].update(trainable=trainable, grad_and_adam_mib=trainable * 12 / 2**20)

    result = {
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "parameters": n_params},
        "global_batch": args.batch_size, "steps": args.steps, "skipped_warmup_steps": args.skip,
        "repeats": args.repeats, "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
        "tokens_per_s": {str(k): v for k, v in rates.items()},
        "median_tokens_per_s": {str(k): statistics.median(v) for k, v in rates.items()},
        "ratio_2_vs_1": statistics.median(rates[2]) / statistics.median(rates[1]),
        "lora": {"rank": args.lora_rank, "model": {"hidden": args.memory_hidden, "layers": args.memory_layers,
                                                   "parameters": trainable_full}, **memory},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    m = result["median_tokens_per_s"]
    print(f"SFT tokens/s  1 process {m['1']:.0f}  2 processes {m['2']:.0f}  ratio {result['ratio_2_vs_1']:.2f}x  "
          f"({n_params / 1e6:.2f}M params, load {result['load_average_1m']:.1f} on {os.cpu_count()} cpus)")
    f_, l_ = memory["full"], memory["lora"]
    print(f"LoRA r={args.lora_rank}: trainable {l_['trainable']:,} vs {f_['trainable']:,}; grads+Adam "
          f"{l_['grad_and_adam_mib']:.2f} vs {f_['grad_and_adam_mib']:.2f} MiB; peak RSS {l_['peak_rss_mib']} vs "
          f"{f_['peak_rss_mib']} MiB")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
