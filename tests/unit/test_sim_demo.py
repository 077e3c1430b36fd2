"""A smoke run of ``rlhf demo --tiny``: every stage end to end in seconds, with results.json, the PNG and the
artifacts written (the figures of a tiny run mean nothing)."""
from __future__ import annotations

import argparse
import json
import struct
import time

import pytest

from rlhf.sim import demo
from rlhf.core.models import load_artifact, read_manifest
from rlhf.core.plot import Panel, Series, render_panels


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(out), "--no-progress", "--seed", "3"])
    start = time.perf_counter()
    assert demo.run(args) == 0
    return out, time.perf_counter() - start


def test_tiny_demo_writes_results_with_the_required_keys(tiny_run):
    out, seconds = tiny_run
    assert seconds < 45
    results = json.loads((out / "results.json").read_text())
    assert set(demo.RESULT_KEYS) <= results.keys()
    assert set(results["gold_utility"]) == {"base", "sft", "ppo"}
    for key in ("rm_accuracy", "rm_ceiling", "kl", "win_rate_ppo_vs_sft"):
        assert isinstance(results[key], float)
    assert 0.0 <= results["win_rate_ppo_vs_sft"] <= 1.0 and 0.5 < results["rm_ceiling"] <= 1.0
    assert results["seed"] == 3


def test_tiny_demo_writes_artifacts_with_lineage(tiny_run):
    out, _ = tiny_run
    lineage = {name: read_manifest(str(out / name)) for name in ("base", "sft", "reward-1", "reward-2", "policy")}
    assert lineage["base"].parent is None
    assert lineage["sft"].parent == lineage["base"].version
    assert lineage["reward-1"].parent == lineage["sft"].version
    assert lineage["reward-2"].parent == lineage["reward-1"].version  # the tiny run has two rounds
    assert lineage["policy"].parent == lineage["sft"].version
    assert lineage["policy"].data["reward_model"] == lineage["reward-2"].version
    model, tokenizer, manifest = load_artifact(str(out / "policy"))
    assert manifest.kind == "policy" and len(tokenizer) == model.config.vocab_size
    for name in ("demonstrations.jsonl", "rankings-round1.jsonl", "rankings-round2.jsonl", "ppo_metrics.jsonl"):
        assert (out / "data" / name).stat().st_size > 0


def test_tiny_demo_writes_a_png(tiny_run):
    out, _ = tiny_run
    data = (out / "ppo_curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_png_renderer_is_valid_png():
    zlib = pytest.importorskip("zlib")
    png = render_panels([Panel("a", [Series("x", [0, 1, 2], [0.0, 1.0, float("nan")])], hline=0.5)], x_label="s")
    # Walk the chunks: each CRC must match and the image data must inflate to height * (1 + 3 * width) bytes.
    pos, chunks = 8, {}
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)


def test_table_mentions_every_figure(tiny_run):
    out, _ = tiny_run
    table = demo.format_table(json.loads((out / "results.json").read_text()))
    for words in ("base / SFT / PPO", "win rate", "KL", "ceiling", "wall time"):
        assert words in table


def test_the_demo_and_its_stages_import_no_infrastructure():
    """rlhf.core stays torch + transformers + tokenizers: nothing of gRPC, Kafka or Redis."""
    import json as _json
    import subprocess
    import sys

    modules = ["rlhf.core.tokenizer", "rlhf.core.models", "rlhf.core.data", "rlhf.sim", "rlhf.core.sft",
               "rlhf.core.reward_training", "rlhf.core.plot", "rlhf.sim.demo"]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True)
    loaded = _json.loads(result.stdout.strip().splitlines()[-1])
    forbidden = ("grpc", "kafka", "redis", "google.protobuf", "rlhf.v1", "rlhf.serving", "rlhf.bus", "rlhf.cache")
    offenders = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not offenders, f"importing the demo loaded {offenders}"
