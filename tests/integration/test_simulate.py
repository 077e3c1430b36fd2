"""`rlhf simulate` as a real subprocess against the embedded platform (every service on one port, in this process):
report lines with the served version, simulate.png and simulate.json written, feedback consumed by the trainer,
held-out traffic under its own product and never given feedback; Ctrl-C still writes the outputs; an unreachable
target is a clear message, not a traceback."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.bus import topics
from rlhf.bus.memory import InMemoryBus
from rlhf.embedded import EmbeddedConfig, build_components
from rlhf.serving.server import ServiceHost
from rlhf.sim.simulate import EVAL_PRODUCT, PRODUCT
from rlhf.sim.world import split_prompts
from rlhf.v1 import events_pb2, policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from support import waiting
from support.hosting import HostThread

pytestmark = pytest.mark.slow

REPORT_LINE = re.compile(r"^\d+:\d\d \[[#.]{20}\] +\d+% \| served ")
# Short answers: the simulator's calls, not the tiny model's decoding, are what is tested here.
TOKENS = "12"


@dataclass
class Platform:
    address: str
    channel: grpc.Channel
    bus: InMemoryBus


@pytest.fixture(scope="module")
def platform(tmp_path_factory, one_torch_thread) -> Iterator[Platform]:
    """`rlhf up` in this process on a free port, SERVING (its tiny random-init policy and reward model)."""
    root = tmp_path_factory.mktemp("simulate-platform")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # `rlhf up` serves out/demo's models when the working directory has them: not here
        config = EmbeddedConfig(host="127.0.0.1", port=0, metrics_port=-1, artifact_root=str(root / "artifacts"))
        components, bus, _ = build_components(config)
        with HostThread(lambda: ServiceHost(config, components)) as host, host.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            waiting.wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                             == health_pb2.HealthCheckResponse.SERVING, 60, "rlhf up SERVING", interval=0.2,
                             tolerate_rpc_errors=True)
            yield Platform(host.address, channel, bus)


def simulate_command(target: str, out: Path, minutes: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf", "simulate", "--target", target, "--minutes", minutes, "--out", str(out),
            "--max-new-tokens", TOKENS, *extra]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RLHF_AUTH_TOKEN", None)
    return env


def read_all(bus: InMemoryBus, topic: str, group: str) -> list[bytes]:
    consumer = bus.consumer([topic], group_id=group)
    try:
        values = []
        while batch := consumer.poll(timeout_s=0.2, max_records=5000):
            values += [m.value for m in batch]
        return values
    finally:
        consumer.close()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def test_simulate_plays_a_product_against_the_embedded_platform(platform, tmp_path):
    stable = policy_pb2_grpc.PolicyServiceStub(platform.channel).GetPolicy(
        policy_pb2.GetPolicyRequest(), timeout=10).policies[0].version.version
    trainer = trainer_pb2_grpc.TrainerServiceStub(platform.channel)
    consumed_before = trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).feedback_events_consumed
    out = tmp_path / "out"

    proc = subprocess.run(
        simulate_command(platform.address, out, "0.3", "--report-every", "2", "--window-s", "6", "--seed", "1",
                         "--head-to-head", "1"),
        capture_output=True, text=True, timeout=120, env=environment(), cwd=tmp_path, check=False)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if REPORT_LINE.match(line)]
    assert len(lines) >= 3, proc.stdout
    # The trainer may be canarying versions of its own meanwhile (PPO): the stable version serves every line anyway.
    assert sum(bool(re.search(rf"served (\S+ \d+%, )*{re.escape(stable)} \d+%", line)) for line in lines) >= 3, \
        proc.stdout
    assert all(re.search(r"\| canary \d+%", line) and "gold held-out" in line and "feedback" in line
               for line in lines), proc.stdout
    final = proc.stdout.splitlines()[-1]
    assert final.startswith("rlhf simulate: "), proc.stdout
    # Most-served first: with `rlhf up` canarying PPO versions to half the routing keys, a canary may lead.
    seen = re.search(r"versions seen: (.*?); feedback", final)
    assert seen and stable in seen.group(1).split(", "), final

    # 1. the figure and the records
    assert png_size(out / "simulate.png") == (640, 3 * (200 + 24 + 18) + 20)
    result = json.loads((out / "simulate.json").read_text())
    windows, summary = result["windows"], result["summary"]
    assert len(windows) >= 2 and all(w["responses"] > 0 for w in windows), windows
    assert all(abs(sum(w["versions"].values()) - 1.0) < 1e-9 for w in windows)
    assert windows[0]["start_s"] == 0.0 and windows[-1]["end_s"] >= 17.0
    assert sum(w["n_held_out"] for w in windows) > 0 and sum(w["n_train"] for w in windows) > 0
    assert any(w["reward"] is not None for w in windows)  # the embedded reward service scored them
    versions = summary["versions_seen"]
    assert stable in versions and sum(versions.values()) == summary["responses"]
    assert {v for w in windows for v in w["versions"]} == set(versions)
    assert all(c["serving"] and (c["added"] or c["removed"]) for c in summary["version_changes"])
    assert summary["first_window_gold_held_out"] is not None
    assert summary["feedback_sent"] > 0 and summary["feedback_accepted"] == summary["feedback_sent"]
    assert "token" not in result["config"]
    # 2. the head-to-head: every held-out prompt answered by the stable version of the start and of the end, pinned
    h2h = summary["head_to_head"]
    assert h2h is not None, proc.stdout
    assert h2h["start_version"] == stable and h2h["end_version"], h2h
    assert h2h["pairs"] == len(split_prompts(0.2, seed=0)[1]) and 0.0 <= h2h["win_rate"] <= 1.0, h2h
    assert f"head-to-head baseline: {stable} on {h2h['pairs']} held-out answers" in proc.stdout
    assert f"{h2h['end_version']} wins {h2h['win_rate']:.1%} against {stable}" in proc.stdout

    # 2. the feedback reached the trainer
    waiting.wait_for(lambda: trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).feedback_events_consumed
                     >= consumed_before + summary["feedback_accepted"], 30, "the trainer consumed the feedback")

    # 3. held-out requests went under their own product, and no feedback names what they got
    served = [events_pb2.ServedResponse.FromString(v) for v in read_all(platform.bus, topics.RESPONSES, "t-responses")]
    product_of = {r.response_id: r.product for r in served}
    assert {r.product for r in served} == {PRODUCT, EVAL_PRODUCT}
    assert all(r.routing_key.startswith(("user-", "head-to-head-")) for r in served)  # users; the head-to-head
    records = [r for r in (events_pb2.FeedbackRecord.FromString(v)
                           for v in read_all(platform.bus, topics.FEEDBACK, "t-feedback"))
               if r.event.event_id.startswith(f"sim-{result['run_id']}-")]  # this run's, not another test's
    assert len(records) == summary["feedback_accepted"]
    kinds = {r.event.WhichOneof("kind") for r in records}
    assert {"pairwise", "rating"} <= kinds, kinds
    for r in records:
        ids = {"rating": lambda e: [e.rating.response_id],
               "pairwise": lambda e: [e.pairwise.chosen_response_id, e.pairwise.rejected_response_id],
               "ranking": lambda e: list(e.ranking.response_ids)}[r.event.WhichOneof("kind")](r.event)
        assert {product_of[i] for i in ids} == {PRODUCT}, r
        assert r.event.product == PRODUCT and r.event.annotator_id.startswith("sim-annotator-")
        assert not r.unknown_response_ids
    assert len({r.event.event_id for r in records}) == len(records)


def test_ctrl_c_writes_what_was_collected(platform, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(simulate_command(platform.address, out, "5", "--report-every", "1", "--head-to-head", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if REPORT_LINE.match(line) or not line:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    summary = json.loads((out / "simulate.json").read_text())["summary"]
    assert summary["interrupted"] is True and summary["responses"] > 0
    assert png_size(out / "simulate.png")[0] == 640


def test_an_unreachable_target_says_to_start_the_platform(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run(simulate_command(f"127.0.0.1:{port}", tmp_path / "out", "1"), capture_output=True,
                          text=True, timeout=60, env=environment(), cwd=tmp_path, check=False)
    assert time.monotonic() - started < 15
    assert proc.returncode != 0
    assert f"cannot reach 127.0.0.1:{port}" in proc.stderr and "rlhf up" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
