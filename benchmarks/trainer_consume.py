#!/usr/bin/env python3
"""What the trainer's durable consumption costs: records stored per second into its dataset (parse, deduplicate,
join, convert, offsets in the same SQLite transaction) against a raw kafka-python consumer reading the same records
of the same topics, in the same run; and reward-model retraining time per 1,000 comparisons.

    python deploy/local/infra.py up && eval "$(python deploy/local/infra.py env)"
    python benchmarks/trainer_consume.py --records 30000 --repeats 3
    python benchmarks/trainer_consume.py --skip-consume --rm-comparisons 500,1000    # the training part only

The records are written once (a third served responses, a sixth rankings of two of them, half demonstrations) to
rlhf.responses.v1 and rlhf.feedback.v1; each repeat then reads exactly that range:
* ``raw``: ``kafka.KafkaConsumer`` assigned to the partitions, seeking to the range's start, polling until it has
  every record (it parses nothing and stores nothing: the floor of reading), with kafka-python's defaults;
* ``raw, same fetch size``: the same with the trainer's ``max_partition_fetch_bytes`` (KafkaConfig's
  ``fetch_partition_bytes``, 8 MiB against kafka-python's 1 MiB), so that the trainer's own fetch setting is not
  what makes the difference;
* ``trainer``: the trainer's ``FeedbackConsumer`` (a group member with its rebalance listener; storing in its store
  process, or with ``--store-thread`` on its consumer thread) over a new dataset whose start offsets are the range's
  start, until the dataset holds every record.
All read at most 2,000 records a poll, and every clock starts before the consumer connects (a raw one's first polls
wait ~0.2 s for metadata, the trainer's for its group to assign it). Repeats alternate (raw, raw with the trainer's
fetch size, trainer, ...); medians are reported. Goal: trainer >= 0.8x of raw.
Also printed: CPU per record of each side (the raw consumer's process; the trainer's process and its store process,
whose start is included), and the steady rates, from the first records received (or stored) to the last, which
leave out the connection, the group join and the store process's start.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def produce(bus, n: int) -> dict:
    """n records (``consumption_mix``) written to their topics; returns the start offsets and the count."""
    from rlhf.bus import topics
    from support.trainer_records import consumption_mix, feedback_record

    consumer = bus.consumer([topics.RESPONSES, topics.FEEDBACK], f"bench-probe-{uuid.uuid4().hex[:6]}")
    parts = {topic: range(len_partitions(bus, topic)) for topic in (topics.RESPONSES, topics.FEEDBACK)}
    starts = consumer.end_offsets([(t, p) for t, ps in parts.items() for p in ps])
    consumer.close()
    responses, events = consumption_mix(n, prefix=f"b{uuid.uuid4().hex[:6]}-")
    for topic, records in ((topics.RESPONSES, [(r.SerializeToString(), r.response_id.encode()) for r in responses]),
                           (topics.FEEDBACK, [(feedback_record(e).SerializeToString(), e.event_id.encode())
                                              for e in events])):
        for i in range(0, len(records), 5000):
            outcomes = bus.send_batch(topic, records[i:i + 5000]).result(120)
            assert not [o for o in outcomes if isinstance(o, Exception)]
    return {"starts": starts, "records": len(responses) + len(events)}


def len_partitions(bus, topic: str) -> int:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bus.config.bootstrap_servers)
    try:
        return len(c.partitions_for_topic(topic) or ())
    finally:
        c.close()


class Run(NamedTuple):
    """One repeat of one side: wall-clock seconds, and CPU seconds of this process and of its store process."""

    seconds: float
    cpu_s: float
    store_cpu_s: float = 0.0
    steady_records_per_s: float = 0.0  # after the first records arrived (the connection's and start-up's cost apart)
    held_s: float = 0.0  # (raw) time in polls the broker held for fetch_max_wait_ms (see raw())


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raw(bootstrap: str, starts: dict, n: int, fetch_bytes: int | None = None) -> Run:
    from kafka import KafkaConsumer, TopicPartition

    cpu = time.process_time()
    started = time.perf_counter()  # like the trainer's: from before the consumer connects
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      **({"max_partition_fetch_bytes": fetch_bytes} if fetch_bytes else {}))
    tps = {TopicPartition(t, p): o for (t, p), o in starts.items()}
    c.assign(list(tps))
    for tp, o in tps.items():
        c.seek(tp, o)
    got, first, held = 0, None, 0.0
    while got < n:
        polled = time.perf_counter()
        for records in c.poll(timeout_ms=500, max_records=2000).values():
            got += len(records)
        if first is None and got:
            first = (time.perf_counter(), got)
        elif first is not None and time.perf_counter() - polled > HELD_S:
            # kafka-python 3.0 sends its next fetch (one a broker at a time) when the last buffered partition is
            # being drained: for the partitions read to the range's end, which the broker holds up to
            # fetch_max_wait_ms (500) for records that never come; a partition that needs another fetch waits
            # for that one. Whether it happens depends on how the partitions' fetches fall: the reason a raw
            # consumer with 1 MiB fetches runs at two speeds from one repeat to the next.
            held += time.perf_counter() - polled
    ended = time.perf_counter()
    elapsed = ended - started
    cpu = time.process_time() - cpu
    c.close()
    return Run(elapsed, cpu, 0.0, steady_rate(first, ended, n), held)


HELD_S = 0.3  # a poll this long after the first records: a fetch the broker held (see raw())


def steady_rate(first: tuple[float, int] | None, ended: float, n: int) -> float:
    """Records per second from the first records (their time and count) to the last."""
    if first is None or first[1] >= n or ended <= first[0]:
        return float("nan")
    return (n - first[1]) / (ended - first[0])


def trainer(bus, starts: dict, n: int, workdir: str, store_process: bool = True) -> Run:
    from rlhf.trainer.consume import FeedbackConsumer
    from rlhf.trainer.dataset import Dataset

    dataset = Dataset(os.path.join(workdir, f"bench-{uuid.uuid4().hex[:6]}.sqlite"))
    dataset.mark_start(dict(starts))
    consumer = FeedbackConsumer(bus, dataset, group=f"bench-trainer-{uuid.uuid4().hex[:6]}", max_records=2000,
                                housekeeping_s=60, store_process=store_process)
    cpu, children = time.process_time(), children_cpu()
    started = time.perf_counter()
    consumer.start()
    first = None
    while (got := sum(consumer.consumed.values())) < n:
        if first is None and got:
            first = (time.perf_counter(), got)
        time.sleep(0.005)
    ended = time.perf_counter()
    elapsed = ended - started
    cpu = time.process_time() - cpu
    consumer.stop()  # ends the store process: its CPU is counted once it is waited for
    store_cpu = children_cpu() - children
    sizes = dataset.sizes()
    assert sizes["responses"] >= n // 3 and sizes.get("feedback_used", 0) >= n - n // 3 - 1, sizes
    dataset.close()
    return Run(elapsed, cpu, store_cpu, steady_rate(first, ended, n))


def retraining(per: list[int], workdir: str) -> list[dict]:
    """Seconds to train a reward model (from a small causal LM, the trainer's settings) on N comparisons."""
    import torch

    from rlhf.core.models import build_causal_lm, build_reward_model
    from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig
    from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
    from rlhf.sim import world_texts
    from support.trainer_records import simulated_rankings

    torch.set_num_threads(1)
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    out = []
    for n in per:
        from rlhf.trainer.convert import Prompt, Comparison
        from rlhf.trainer.dataset import StoredComparison
        from rlhf.trainer.reward import as_ranking

        responses, events = simulated_rankings(n, k=2, seed=n)
        texts = {r.response_id: (r.input_prompt, r.text) for r in responses}
        rankings = [as_ranking(StoredComparison(i, Comparison(Prompt(texts[e.ranking.response_ids[0]][0]),
                                                              tuple(texts[r][1] for r in e.ranking.response_ids),
                                                              (e.event_id,)), False)) for i, e in enumerate(events)]
        model = build_reward_model(build_causal_lm(tokenizer, "small", seed=0), tokenizer, seed=0)
        started = time.perf_counter()
        RewardTrainer(model, RewardTrainingConfig(num_epochs=2.0, batch_size=16)).train(rankings, progress=False)
        seconds = time.perf_counter() - started
        out.append({"comparisons": n, "seconds": seconds, "seconds_per_1000": seconds * 1000 / n})
        print(f"reward model, 'small' size, 2 epochs, {n} pairs: {seconds:.1f} s ({seconds * 1000 / n:.1f} s / 1000)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rm-comparisons", default="1000",
                        help="comma-separated sizes for the retraining timing ('' or 0: skip it)")
    parser.add_argument("--skip-consume", action="store_true")
    parser.add_argument("--store-thread", action="store_true",
                        help="the trainer stores on its consumer thread (store_process=False), not in its process")
    parser.add_argument("--out", default="out/bench/trainer_consume.json")
    args = parser.parse_args()
    from rlhf.bus import topics
    from rlhf.bus.kafka import KafkaBus, KafkaConfig

    bootstrap = os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    workdir = tempfile.mkdtemp(prefix="bench-trainer-")
    result: dict = {"records": args.records, "load_before": os.getloadavg(),
                    "store": "thread" if args.store_thread else "process"}
    if not args.skip_consume:
        bus = KafkaBus(KafkaConfig(bootstrap_servers=bootstrap))
        bus.ensure_topics(topics.platform_topics(partitions=3))
        written = produce(bus, args.records)
        n = written["records"]
        raws, tuned, trainers, cpu = [], [], [], {"raw": [], "trainer": [], "store_process": []}
        steady: dict[str, list[float]] = {"raw": [], "trainer": []}
        held: list[float] = []
        for _ in range(args.repeats):
            r = raw(bootstrap, written["starts"], n)
            tuned.append(n / raw(bootstrap, written["starts"], n, bus.config.fetch_partition_bytes).seconds)
            t = trainer(bus, written["starts"], n, workdir, store_process=not args.store_thread)
            raws.append(n / r.seconds)
            trainers.append(n / t.seconds)
            steady["raw"].append(r.steady_records_per_s)
            held.append(r.held_s)
            steady["trainer"].append(t.steady_records_per_s)
            for key, seconds in (("raw", r.cpu_s), ("trainer", t.cpu_s), ("store_process", t.store_cpu_s)):
                cpu[key].append(seconds * 1e6 / n)
            print(f"raw {raws[-1]:9.0f} records/s   raw, same fetch size {tuned[-1]:9.0f}   trainer "
                  f"{trainers[-1]:9.0f} records/s ({trainers[-1] / raws[-1]:.2f}x, {trainers[-1] / tuned[-1]:.2f}x)"
                  f"   CPU per record: raw "
                  f"{cpu['raw'][-1]:.1f} us, trainer {cpu['trainer'][-1]:.1f} us + store process "
                  f"{cpu['store_process'][-1]:.1f} us; steady: raw {steady['raw'][-1]:.0f}, trainer "
                  f"{steady['trainer'][-1]:.0f} records/s; raw held by the broker {r.held_s:.2f} s")
        bus.close(10)
        result.update({"raw_records_per_s": statistics.median(raws), "trainer_records_per_s": statistics.median(trainers),
                       "ratio": statistics.median(trainers) / statistics.median(raws), "runs": {"raw": raws,
                                                                                                "trainer": trainers},
                       "cpu_us_per_record": {k: statistics.median(v) for k, v in cpu.items()}, "cpu_runs": cpu,
                       "steady_records_per_s": {k: statistics.median(v) for k, v in steady.items()},
                       "steady_runs": steady, "raw_held_s": held})
        result["steady_ratio"] = result["steady_records_per_s"]["trainer"] / result["steady_records_per_s"]["raw"]
        # Each repeat's two runs are back to back, so their ratio shares the machine's state of the moment: its
        # median is steadier than the ratio of the medians when other work comes and goes.
        pair_ratios = sorted(t / r for t, r in zip(trainers, raws))
        result["pair_ratios"] = pair_ratios
        result["median_pair_ratio"] = statistics.median(pair_ratios)
        tuned_ratios = sorted(t / r for t, r in zip(trainers, tuned))
        result.update({"raw_same_fetch_records_per_s": statistics.median(tuned), "runs_raw_same_fetch": tuned,
                       "same_fetch_pair_ratios": tuned_ratios,
                       "median_same_fetch_pair_ratio": statistics.median(tuned_ratios)})
        print(f"median: raw {result['raw_records_per_s']:.0f}, trainer {result['trainer_records_per_s']:.0f} "
              f"records/s, ratio {result['ratio']:.2f}; CPU per record: raw {result['cpu_us_per_record']['raw']:.1f} "
              f"us, trainer {result['cpu_us_per_record']['trainer']:.1f} us + store process "
              f"{result['cpu_us_per_record']['store_process']:.1f} us (its start included)")
        print(f"steady (from the first records on): raw {result['steady_records_per_s']['raw']:.0f}, trainer "
              f"{result['steady_records_per_s']['trainer']:.0f} records/s, ratio {result['steady_ratio']:.2f}")
        print(f"ratio per repeat (trainer / raw, back to back): median {result['median_pair_ratio']:.2f}, "
              f"range {pair_ratios[0]:.2f}-{pair_ratios[-1]:.2f}")
        print(f"against raw with the trainer's fetch size: {result['raw_same_fetch_records_per_s']:.0f} records/s, "
              f"ratio per repeat median {result['median_same_fetch_pair_ratio']:.2f}, range "
              f"{tuned_ratios[0]:.2f}-{tuned_ratios[-1]:.2f}")
    sizes = [int(x) for x in args.rm_comparisons.split(",") if x.strip() and int(x) > 0]
    result["retraining"] = retraining(sizes, workdir) if sizes else []
    result["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
