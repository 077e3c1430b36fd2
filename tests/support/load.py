"""Steady traffic from client threads, for the tests that swap policy or reward-model versions under load."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from rlhf.v1 import policy_pb2


def call_in_a_loop(
    call: Callable[[int, int], str],
    stop: threading.Event,
    *,
    workers: int = 4,
    pause_s: float = 0.0,
) -> tuple[list[tuple[float, float, str]], list[threading.Thread]]:
    """``workers`` threads each run ``call(worker, i)`` (a gRPC call returning the answering version) for i = 0, 1, ...
    until ``stop``, pausing ``pause_s`` between calls. Returns the results list (filled as calls finish: (started,
    finished, the version or "error: CODE details")) and the started threads, to join after setting ``stop``."""
    results: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome = call(worker, i)
            except grpc.RpcError as e:
                outcome = f"error: {e.code().name} {e.details()}"
            with lock:
                results.append((started, time.monotonic(), outcome))
            i += 1
            if pause_s:
                time.sleep(pause_s)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    return results, threads


def generate_in_a_loop(
    stub,
    stop: threading.Event,
    make_request: Callable[[int, int], policy_pb2.GenerateRequest],
    *,
    workers: int = 4,
    timeout_s: float = 30.0,
    pause_s: float = 0.0,
) -> tuple[list[tuple[float, float, str]], list[threading.Thread]]:
    """:func:`call_in_a_loop` of ``Generate(make_request(worker, i))``; the outcome is the answering policy version."""
    return call_in_a_loop(lambda w, i: stub.Generate(make_request(w, i), timeout=timeout_s).policy_version, stop,
                          workers=workers, pause_s=pause_s)
