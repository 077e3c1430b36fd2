"""Shared pieces of the policy and reward benchmarks: a model built here, the service in its own process (`rlhf policy`,
`rlhf reward`, as in production), clients that fire concurrent Generate calls, and the report file.

Nothing is downloaded: the model is a random-init causal LM of a named size (rlhf.core.models.SIZES) with a word-level
tokenizer trained on the built-in task's texts. Random weights decode at the same speed as trained ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["how do I cook rice", "tell me about my garden", "what should I pack for a trip", "my bike tire is flat",
           "how can I save money", "my puppy will not sleep", "fix a leaking tap", "plan a picnic for my family"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(root: Path, size: str, arch: str = "llama") -> Path:
    """A save_pretrained folder of a random-init model of ``size`` (built once per root)."""
    from rlhf.core.models import Manifest, ModelSize, build_causal_lm, resolve_size, save_artifact
    from rlhf.sim import world_texts
    from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer

    path = root / f"{arch}-{size}"
    if (path / "manifest.json").exists():
        return path
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    base = resolve_size(size)
    shape = ModelSize(arch=arch, n_layer=base.n_layer, n_embd=base.n_embd, n_head=base.n_head,
                      max_positions=max(base.max_positions, 512))
    save_artifact(str(path), build_causal_lm(tokenizer, shape, seed=0), tokenizer,
                  Manifest(kind="base", version=f"bench-{arch}-{size}"))
    return path


@contextlib.contextmanager
def policy_process(model_path: Path, *, threads: int, extra: Sequence[str] = (), env: dict | None = None,
                   ready_timeout_s: float = 300) -> Iterator[str]:
    """`rlhf policy` serving ``model_path`` over the in-process bus and cache; yields its address once SERVING."""
    with service_process("policy", model_path, threads=threads, extra=extra, env=env,
                         ready_timeout_s=ready_timeout_s) as address:
        yield address


@contextlib.contextmanager
def service_process(command: str, model_path: Path, *, threads: int, extra: Sequence[str] = (),
                    env: dict | None = None, ready_timeout_s: float = 300) -> Iterator[str]:
    """`rlhf <command>` (policy, reward) serving ``model_path`` in its own process, over the in-process bus and
    cache unless ``extra`` says otherwise; yields its address once SERVING."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf", command, "--port", str(port), "--metrics-port", "-1",
           "--model-path", str(model_path), "--bus-url", "memory://", "--cache-url", "memory://",
           "--torch-num-threads", str(threads), "--follow-model-events", "false", "--health-interval-s", "0.2",
           *extra]
    log = open(model_path.parent / f"{command}-{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=model_path.parent)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rlhf {command} exited with {proc.returncode}; see {log.name}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rlhf {command} not SERVING after {ready_timeout_s}s; see {log.name}")
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def greedy_request(prompt: str, max_new_tokens: int, **kwargs) -> policy_pb2.GenerateRequest:
    """Greedy decoding (temperature 0 needs another sampling value set: top_k=1 changes nothing under argmax)."""
    return policy_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, top_k=1), **kwargs)


def fire_together(stub, requests: Sequence[policy_pb2.GenerateRequest],
                  timeout_s: float = 600) -> tuple[float, list[policy_pb2.GenerateResponse]]:
    """Send every request at once (one thread each, released together); (seconds until the last answer, replies)."""
    barrier = threading.Barrier(len(requests) + 1)
    replies: list = [None] * len(requests)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = stub.Generate(requests[i], timeout=timeout_s)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    elapsed = _run_released_together(call, len(requests), barrier)
    if errors:
        raise errors[0]
    return elapsed, replies


def _run_released_together(target, n: int, barrier: threading.Barrier) -> float:
    """Start ``target(0..n-1)`` on threads that wait on ``barrier`` (n + 1 parties); release them together and
    return the seconds until the last one finished."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def closed_loop(address: str, clients: int, requests_per_client: int, make_request) -> dict:
    """``clients`` threads, each sending ``requests_per_client`` requests one after another:
    {"seconds", "requests", "tokens", "requests_per_s", "tokens_per_s", "p50_s", "p95_s"}."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        nonlocal tokens
        with grpc.insecure_channel(address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            barrier.wait()
            for i in range(requests_per_client):
                started = time.perf_counter()
                try:
                    reply = stub.Generate(make_request(c, i), timeout=600)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens += sum(s.completion_tokens for s in reply.samples)

    seconds = _run_released_together(client, clients, barrier)
    if errors:
        raise errors[0]
    latencies.sort()
    return {
        "seconds": seconds, "requests": len(latencies), "tokens": tokens,
        "requests_per_s": len(latencies) / seconds, "tokens_per_s": tokens / seconds,
        "p50_s": latencies[len(latencies) // 2], "p95_s": latencies[int(len(latencies) * 0.95) - 1],
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
