#!/usr/bin/env python3
"""Feedback ingestion throughput: events per second from a gRPC stream to a Kafka topic, against a raw
kafka-python producer sending the same serialized events to the same broker, in the same run.

    python deploy/local/infra.py up && eval "$(python deploy/local/infra.py env)"
    python benchmarks/feedback_ingest.py --events 20000 --repeats 5

The service runs in its own process (as in production: `rlhf feedback`, real Kafka and Redis); this process is
the product streaming events over one SubmitStream, in messages of --per-message events. Also reported: CPU
microseconds per event of the raw producer's process and of the service's process (all threads of each).
With --unary N the product makes unary Submit calls instead, N in flight at once. Both sides count an event only once it is durable (acks=all):
the service when its acknowledgement arrives, the raw producer when `flush()` returns. Runs alternate
(raw, service, raw, service, ...); the medians and their ratio are printed and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time
import uuid

import grpc

from rlhf.bus import topics
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_events(n: int, run: str) -> list[feedback_pb2.FeedbackEvent]:
    out = []
    for i in range(n):
        ev = feedback_pb2.FeedbackEvent(event_id=f"bench-{run}-{i}", product="bench", annotator_id=f"a{i % 97}")
        ev.created_at.GetCurrentTime()
        if i % 3 == 0:
            ev.rating.response_id = f"resp-{i}"
            ev.rating.thumb = feedback_pb2.THUMB_UP
        elif i % 3 == 1:
            ev.pairwise.chosen_response_id = f"resp-{i}"
            ev.pairwise.rejected_response_id = f"resp-{i}-b"
        else:
            ev.ranking.response_ids.extend([f"resp-{i}-{k}" for k in range(4)])
        out.append(ev)
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_raw(bootstrap: str, events: list[feedback_pb2.FeedbackEvent], topic: str) -> float:
    from kafka import KafkaProducer

    values = [events_pb2.FeedbackRecord(event=e).SerializeToString() for e in events]
    keys = [e.event_id.encode() for e in events]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    producer.send(topic, b"warm-up").get(30)
    start = time.perf_counter()
    for key, value in zip(keys, values):
        producer.send(topic, value, key=key)
    producer.flush()
    elapsed = time.perf_counter() - start
    producer.close()
    return len(events) / elapsed


def run_unary(address: str, events: list[feedback_pb2.FeedbackEvent], concurrency: int) -> float:
    """Unary ``Submit`` calls, ``concurrency`` of them in flight at once (asyncio client, one channel)."""
    import asyncio

    async def go() -> tuple[int, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            queue = iter(events)
            accepted = 0

            async def worker() -> None:
                nonlocal accepted
                for event in queue:
                    reply = await stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=60)
                    accepted += reply.status == feedback_pb2.SUBMIT_STATUS_ACCEPTED

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return accepted, time.perf_counter() - start

    accepted, elapsed = asyncio.run(go())
    if accepted != len(events):
        raise SystemExit(f"only {accepted} of {len(events)} events were accepted")
    return len(events) / elapsed


def run_service(address: str, events: list[feedback_pb2.FeedbackEvent], per_message: int) -> float:
    requests = [feedback_pb2.SubmitStreamRequest(events=events[i:i + per_message])
                for i in range(0, len(events), per_message)]
    with grpc.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        start = time.perf_counter()
        accepted = sum(
            ack.status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
            for reply in stub.SubmitStream(iter(requests), timeout=600) for ack in reply.acks
        )
        elapsed = time.perf_counter() - start
    if accepted != len(events):
        raise SystemExit(f"only {accepted} of {len(events)} events were accepted")
    return len(events) / elapsed


def start_service(bootstrap: str, redis_url: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf", "feedback", "--port", str(port), "--metrics-port", "-1",
           "--bus-url", f"kafka://{bootstrap}", "--cache-url", redis_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the service exited: {proc.stderr.read()[-2000:]}")
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the feedback service did not become SERVING within 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="events per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side (interleaved)")
    parser.add_argument("--per-message", type=int, default=250, help="events per SubmitStream message")
    parser.add_argument("--unary", type=int, default=0, metavar="N",
                        help="instead of a stream: unary Submit calls, N in flight at once")
    parser.add_argument("--kafka", default=os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    parser.add_argument("--redis", default=os.environ.get("RLHF_REDIS_URL", "redis://127.0.0.1:16379/0"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench/feedback_ingest.json"))
    args = parser.parse_args()

    port = free_port()
    proc = start_service(args.kafka, args.redis, port)
    raw_topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    try:
        def submit(events: list[feedback_pb2.FeedbackEvent]) -> float:
            if args.unary:
                return run_unary(f"127.0.0.1:{port}", events, args.unary)
            return run_service(f"127.0.0.1:{port}", events, args.per_message)

        submit(make_events(2000, "warmup-" + uuid.uuid4().hex))  # warm the service
        raw, ours, raw_cpu, our_cpu = [], [], [], []
        for i in range(args.repeats):
            run_id = uuid.uuid4().hex
            events = make_events(args.events, run_id)
            cpu = time.process_time()
            raw.append(run_raw(args.kafka, events, raw_topic))
            raw_cpu.append((time.process_time() - cpu) / args.events * 1e6)
            service_events = make_events(args.events, run_id + "s")
            cpu = process_cpu_s(proc.pid)
            ours.append(submit(service_events))
            our_cpu.append((process_cpu_s(proc.pid) - cpu) / args.events * 1e6)
            print(f"run {i + 1}/{args.repeats}: raw producer {raw[-1]:,.0f} ev/s ({raw_cpu[-1]:.0f} us CPU/event), "
                  f"service {ours[-1]:,.0f} ev/s ({our_cpu[-1]:.0f} us CPU/event)", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "events_per_run": args.events,
        "events_per_message": None if args.unary else args.per_message,
        "unary_calls_in_flight": args.unary or None,
        "repeats": args.repeats,
        "raw_producer_events_per_s": statistics.median(raw),
        "service_events_per_s": statistics.median(ours),
        "ratio_service_over_raw": statistics.median(ours) / statistics.median(raw),
        "raw_runs": raw,
        "service_runs": ours,
        # CPU per event: the raw producer process (all its threads) and the service process (all its threads)
        "raw_cpu_us_per_event": statistics.median(raw_cpu),
        "service_cpu_us_per_event": statistics.median(our_cpu),
        "load_average_1m_at_end": os.getloadavg()[0],
        "feedback_topic": topics.FEEDBACK,
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"median: raw {result['raw_producer_events_per_s']:,.0f} ev/s, service "
          f"{result['service_events_per_s']:,.0f} ev/s, ratio {result['ratio_service_over_raw']:.2f} "
          f"(goal >= 0.90); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
