#!/usr/bin/env python3
"""What reward scoring costs through the service: `rlhf reward` in its own process against the same reward model's
forward pass called in-process on the same batches, in the same run; and a cache hit against a cache miss.

    python benchmarks/reward_score.py --size small --batches 16,64 --rounds 5
    python benchmarks/reward_score.py --cache-url "$RLHF_REDIS_URL"      # the cache part on a real Redis

Throughput: both sides get the same texts in the same batches of B (prompt, response) pairs and return B scores:
* ``in_process``: ``RewardModel.score(prompts, responses, batch_size=B)`` (tokenize, pad, forward), one torch thread;
* ``service``: one ``Score`` call of B items at a time, and ``--in-flight`` calls at once (default 2: while one batch
  runs its forward pass, the next is parsed and tokenized), the score cache off (``--score-cache-ttl-s 0``) so that
  every item reaches the model, one torch thread.
Rounds alternate (service, in-process, ...) and medians are reported. Goal: service >= 0.9x of in-process at B = 16
and 64. Scores are compared too (they must agree within 1e-5).
Cache: calls of ``--cache-batch`` items, all new (misses: tokenize, forward, store) against the same calls again (hits:
one cache lookup), latency median over ``--cache-calls`` calls each.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import grpc
import torch

from policy_common import PROMPTS, machine, median, service_process, write_result
from rlhf.core.models import Manifest, build_reward_model, load_causal_lm, load_reward_model, save_artifact
from rlhf.core.tokenizer import format_prompt
from rlhf.v1 import reward_pb2, reward_pb2_grpc

RESPONSES = ["rinse it , then simmer it in water .", "water the plants in the morning before it gets hot .",
             "pack light clothes , a charger and your papers .", "patch the tube and pump it up again .",
             "cook at home and keep a list .", "walk the puppy before bed and keep the room dark and quiet .",
             "turn off the water and replace the washer .", "bring food , a blanket and water to the park ."]


def build_reward(root: Path, size: str) -> Path:
    """A save_pretrained reward model (scalar head on a random-init causal LM of ``size``; weights do not change speed)."""
    from policy_common import build_model

    path = root / f"reward-{size}"
    if (path / "manifest.json").exists():
        return path
    backbone, tokenizer = load_causal_lm(str(build_model(root, size)))
    reward_model = build_reward_model(backbone, tokenizer, seed=0)
    torch.nn.init.normal_(reward_model.model.score.weight, std=0.5)
    save_artifact(str(path), reward_model, tokenizer, Manifest(kind="reward", version=f"bench-reward-{size}"))
    return path


def items(n: int, salt: str) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, response) pairs of mixed lengths (distinct: the cache never answers by accident)."""
    return [(f"{PROMPTS[i % len(PROMPTS)]} {salt} {i}", RESPONSES[(i * 3) % len(RESPONSES)]) for i in range(n)]


def score_request(pairs) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in pairs])


def in_process(model, batches) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores: list[float] = []
    for batch in batches:
        prompts = [format_prompt(model.tokenizer, p) for p, _ in batch]
        scores += model.score(prompts, [r for _, r in batch], batch_size=len(batch)).tolist()
    return time.perf_counter() - start, scores


def through_service(stub, batches, in_flight: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        replies = list(pool.map(lambda b: stub.Score(score_request(b), timeout=600), batches))
    elapsed = time.perf_counter() - start
    return elapsed, [s for r in replies for s in r.scores]


def cache_latency(stub, batch: int, calls: int, salt: str) -> dict:
    miss, hit = [], []
    for c in range(calls):
        request = score_request(items(batch, f"{salt}{c}"))
        t = time.perf_counter()
        first = stub.Score(request, timeout=60)
        miss.append(time.perf_counter() - t)
        t = time.perf_counter()
        second = stub.Score(request, timeout=60)
        hit.append(time.perf_counter() - t)
        assert first.cache_hits == 0 and second.cache_hits == batch, (first.cache_hits, second.cache_hits)
    return {"batch": batch, "calls": calls, "miss_p50_s": median(miss), "hit_p50_s": median(hit),
            "hit_over_miss": median(hit) / median(miss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="model size (rlhf.core.models.SIZES)")
    parser.add_argument("--batches", default="16,64", help="items per Score call / per in-process batch")
    parser.add_argument("--items", type=int, default=512, help="items per round and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=2, help="concurrent Score calls of the service side")
    parser.add_argument("--max-wait-s", type=float, default=0.0,
                        help="the service's max_wait_s (0: a pass starts with what is queued; calls in flight still "
                             "share passes)")
    parser.add_argument("--cache-url", default="memory://", help="score cache of the cache part (redis://... or memory://)")
    parser.add_argument("--cache-batch", type=int, default=16)
    parser.add_argument("--cache-calls", type=int, default=30)
    parser.add_argument("--out", default="out/bench/reward_score.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    path = build_reward(root, args.size)
    model = load_reward_model(str(path), max_length=512)
    model.eval()
    result: dict = {"machine": machine(), "size": args.size, "items": args.items, "in_flight": args.in_flight,
                    "max_wait_s": args.max_wait_s,
                    "throughput": [], "cache": None}
    common = ["--max-batch-size", str(max(int(b) for b in args.batches.split(","))), "--max-wait-s", str(args.max_wait_s)]
    with service_process("reward", path, threads=1, extra=[*common, "--score-cache-ttl-s", "0"]) as address:
        with grpc.insecure_channel(address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            for b in (int(x) for x in args.batches.split(",")):
                batches = [items(args.items, f"r{b}")[i:i + b] for i in range(0, args.items, b)]
                through_service(stub, batches[:2], args.in_flight)  # warm-up
                in_process(model, batches[:2])
                svc, ref, worst = [], [], 0.0
                for _ in range(args.rounds):
                    s_time, s_scores = through_service(stub, batches, args.in_flight)
                    r_time, r_scores = in_process(model, batches)
                    svc.append(args.items / s_time)
                    ref.append(args.items / r_time)
                    worst = max(worst, max(abs(a - c) for a, c in zip(s_scores, r_scores)))
                row = {"batch": b, "service_items_per_s": median(svc), "in_process_items_per_s": median(ref),
                       "ratio": median(svc) / median(ref), "max_abs_score_diff": worst,
                       "rounds": {"service": svc, "in_process": ref}}
                result["throughput"].append(row)
                print(f"batch {b:>3}: service {row['service_items_per_s']:8.1f} items/s, in-process "
                      f"{row['in_process_items_per_s']:8.1f} items/s, ratio {row['ratio']:.2f}, "
                      f"max |score diff| {worst:.2e}")
    with service_process("reward", path, threads=1, extra=[*common, "--cache-url", args.cache_url]) as address:
        with grpc.insecure_channel(address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            cache_latency(stub, args.cache_batch, 3, f"warm{time.time_ns()}-")  # warm-up
            result["cache"] = {"cache_url": args.cache_url.split("?")[0],
                               **cache_latency(stub, args.cache_batch, args.cache_calls, f"run{time.time_ns()}-")}
            c = result["cache"]
            print(f"cache ({c['cache_url']}), {c['batch']} items per call: miss p50 {c['miss_p50_s'] * 1e3:.2f} ms, "
                  f"hit p50 {c['hit_p50_s'] * 1e3:.2f} ms, hit/miss {c['hit_over_miss']:.2f}")
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
