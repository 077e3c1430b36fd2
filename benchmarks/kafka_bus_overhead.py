#!/usr/bin/env python3
"""KafkaBus vs kafka-python's KafkaProducer with the same settings, in the same run, interleaved rounds.

    python deploy/local/infra.py up && eval "$(python deploy/local/infra.py env)"
    python benchmarks/kafka_bus_overhead.py --records 10000 --rounds 5

Three ways of producing 100-byte records, each against the raw producer doing the same:

* ``send`` of every record, then one ``flush`` (fire and forget);
* asyncio code awaiting each record: ``publish`` vs the raw producer's future bridged to the loop with
  ``call_soon_threadsafe`` (what a service would write by hand);
* ``send_batch`` of 500 records at a time (the feedback service's path, rlhf/bus/kafka_batch.py) vs the raw
  producer's ``send`` of the same records and one ``flush``.

Reported per mode: records/s (best round of each side) and the ratio of process CPU seconds (all threads; steadier
than throughput on a shared machine), also written as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import kafka

from rlhf.bus.base import TopicSpec
from rlhf.bus.kafka import KafkaBus, KafkaConfig


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10000, help="records per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each side per mode (interleaved)")
    parser.add_argument("--kafka", default=os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench/kafka_bus_overhead.json"))
    args = parser.parse_args()
    n = args.records

    config = KafkaConfig(bootstrap_servers=args.kafka, client_id="rlhf-bench")
    bus = KafkaBus(config)
    raw = kafka.KafkaProducer(**config.producer_kwargs())
    base = f"bench.bus.{uuid.uuid4().hex[:8]}"
    ours_topic, raw_topic = base + "-bus", base + "-raw"
    bus.ensure_topics([TopicSpec(ours_topic, 3), TopicSpec(raw_topic, 3)])
    value = b"x" * 100
    keyed = [(value, b"key-%d" % i) for i in range(n)]

    def raw_send() -> None:
        for _ in range(n):
            raw.send(raw_topic, value)
        raw.flush()

    def bus_send() -> None:
        for _ in range(n):
            bus.send(ours_topic, value)
        bus.flush()

    async def raw_publish_one(loop: asyncio.AbstractEventLoop) -> Any:
        waiter = loop.create_future()
        k = raw.send(raw_topic, value)
        k.add_callback(lambda md: loop.call_soon_threadsafe(waiter.set_result, md))
        k.add_errback(lambda e: loop.call_soon_threadsafe(waiter.set_exception, e))
        return await waiter

    async def publish_all(one: Callable[[], Any]) -> None:
        for _ in range(0, n, 500):
            await asyncio.gather(*(one() for _ in range(500)))

    def raw_publish() -> None:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            await publish_all(lambda: raw_publish_one(loop))
        asyncio.run(run())

    def bus_publish() -> None:
        asyncio.run(publish_all(lambda: bus.publish(ours_topic, value)))

    def raw_send_keyed() -> None:
        for v, k in keyed:
            raw.send(raw_topic, v, key=k)
        raw.flush()

    def bus_send_batch() -> None:
        futures = [bus.send_batch(ours_topic, keyed[i:i + 500]) for i in range(0, n, 500)]
        for f in futures:
            f.result(60)

    results: dict[str, Any] = {"records_per_round": n, "rounds": args.rounds, "cpu_count": os.cpu_count()}
    try:
        bus.send(ours_topic, value).result(30)
        raw.send(raw_topic, value).get(30)
        print(f"{n} records x {args.rounds} rounds, 100-byte values:")
        for mode, raw_fn, bus_fn in [("send+flush", raw_send, bus_send), ("asyncio publish", raw_publish, bus_publish),
                                     ("send_batch (keyed)", raw_send_keyed, bus_send_batch)]:
            raw_runs, bus_runs = [], []
            for _ in range(args.rounds):
                raw_runs.append(timed(raw_fn))
                bus_runs.append(timed(bus_fn))
            raw_best, bus_best = min(w for w, _ in raw_runs), min(w for w, _ in bus_runs)
            cpu_ratio = statistics.median(c for _, c in raw_runs) / statistics.median(c for _, c in bus_runs)
            results[mode] = {"raw_records_per_s": n / raw_best, "bus_records_per_s": n / bus_best,
                             "throughput_ratio": raw_best / bus_best, "cpu_time_ratio_raw_over_bus": cpu_ratio}
            print(f"  {mode:<19} raw {n / raw_best:>8,.0f}/s  KafkaBus {n / bus_best:>8,.0f}/s  "
                  f"throughput ratio {raw_best / bus_best:.2f}  CPU-time ratio {cpu_ratio:.2f}", flush=True)
    finally:
        bus.close()
        raw.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
