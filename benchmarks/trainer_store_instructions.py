#!/usr/bin/env python3
"""Instructions per record of ``Dataset.store_partitions`` (the trainer's store stage) on ``trainer_consume.py``'s mix of
records, counted by valgrind's cachegrind: deterministic, unlike timings on a shared 2-core machine, so that a change
to the store can be measured on its own (``trainer_consume.py`` measures the whole consumption against Kafka).

    python benchmarks/trainer_store_instructions.py --records 6000      # needs valgrind (Debian's package)

It runs itself three times under cachegrind: building the batches; building and parsing them
(``parse_partitions``, the consumer thread's share since the fifth round); building, parsing and storing them. The
differences, divided by the number of records, are the parse's and the store process's instructions a record. Batches are 2,000 records, responses and feedback interleaved 500 at a time
(so that some rankings wait for responses of the next batch, as when partitions move at different speeds).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


ORDERS = ("interleaved", "feedback-first")


def batches(n: int, order: str = "interleaved") -> list:
    """The mix in batches of 2,000 as the consumer hands them to the store. ``interleaved``: 500 responses, 500
    feedback records, and so on (some rankings wait a batch for their responses); ``feedback-first``: every feedback
    record before any response, as Kafka's fetcher delivered ``trainer_consume.py``'s backlog (a partition at a
    time, the feedback topic's first), so that every ranking waits (the join index's worst case)."""
    from rlhf.bus import topics
    from rlhf.bus.base import Message
    from rlhf.trainer.dataset import partition_records
    from support.trainer_records import consumption_mix, feedback_record

    responses, events = consumption_mix(n)
    by_topic = [[Message(topics.RESPONSES, 0, i, r.response_id.encode(), r.SerializeToString())
                 for i, r in enumerate(responses)],
                [Message(topics.FEEDBACK, 0, i, e.event_id.encode(), feedback_record(e).SerializeToString())
                 for i, e in enumerate(events)]]
    messages = []
    if order == "feedback-first":
        messages = by_topic[1] + by_topic[0]
    else:
        for start in range(0, max(map(len, by_topic)), 500):
            for records in by_topic:
                messages += records[start:start + 500]
    # (as the consumer hands them over: a poll's records as columns, one PartitionRecords a partition)
    return [partition_records(messages[i:i + 2000]) for i in range(0, len(messages), 2000)]


BUILD, STORE, PARSE = 0, 1, 2  # what a child run does past building the batches (--child)


def child(n: int, stage: int, sizes: bool = False, order: str = "interleaved") -> None:
    import gc

    from rlhf.trainer.dataset import Dataset, parse_partitions

    work = batches(n, order)
    dataset = Dataset(os.path.join(tempfile.mkdtemp(prefix="store-instructions-"), "dataset.sqlite"))
    gc.freeze()  # as the store process does
    if stage in (PARSE, STORE):
        work = [parse_partitions(batch) for batch in work]
    if stage == STORE:
        for batch in work:
            dataset.store_partitions(batch, now=1.0)
    if sizes:  # (for the test; not while counted)
        print(json.dumps(dataset.sizes(), sort_keys=True))
    dataset.close()


def instructions(n: int, stage: int, out_dir: str, order: str) -> int:
    out = os.path.join(out_dir, f"cachegrind.{stage}")
    proc = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
                           sys.executable, __file__, "--child", str(stage), "--records", str(n),
                           "--order", order],
                          capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if not found:
        raise SystemExit(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--child", type=int, choices=(BUILD, STORE, PARSE), help=argparse.SUPPRESS)
    parser.add_argument("--order", choices=ORDERS + ("both",), default="both",
                        help="the records' order (see batches()); both: each in turn")
    parser.add_argument("--print-sizes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.records, args.child, args.print_sizes, args.order)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    for order in ORDERS if args.order == "both" else (args.order,):
        with tempfile.TemporaryDirectory() as out_dir:
            built, parsed, stored = (instructions(args.records, stage, out_dir, order)
                                     for stage in (BUILD, PARSE, STORE))
        print(f"{order}: parse_partitions {(parsed - built) / args.records:,.0f} + Dataset.store_partitions (parsed) "
              f"{(stored - parsed) / args.records:,.0f} = {(stored - built) / args.records:,.0f} instructions per "
              f"record ({args.records} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
