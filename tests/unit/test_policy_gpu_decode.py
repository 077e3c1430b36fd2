"""benchmarks/gpu_decode.py's logic on the CPU with tiny models (the real run needs a CUDA GPU): it measures both
decode loops, and its bandwidth arithmetic is what the docstring says."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_decode.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run_writes_the_report(tmp_path):
    gpu_decode = load_script()
    before = torch.get_num_threads()
    try:
        out = tmp_path / "gpu_decode.json"
        result = gpu_decode.main(["--device", "cpu", "--tiny", "--new-tokens", "8", "--batch-sizes", "1,2",
                                  "--repeats", "1", "--bandwidth-tbps", "0.000001", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for model in result["models"]:
        assert model["weight_bytes"] > 0 and set(model["batches"]) == {"1", "2"}
        for batch in model["batches"].values():
            for loop in ("engine", "hf_generate"):
                m = batch[loop]
                assert m["tokens_per_s"] > 0
                # fraction = steps/s x weight bytes / bandwidth (1 MB/s here, so the tiny models reach a real share)
                assert abs(m["fraction_of_limit"] - m["steps_per_s"] * model["weight_bytes"] / 1e6) < 1e-6
                assert m["fraction_of_limit_with_kv"] > m["fraction_of_limit"]


def test_weight_bytes_count_tied_embeddings_once():
    gpu_decode = load_script()
    tied = gpu_decode.build(gpu_decode.TINY["tiny-a"], torch.device("cpu"), torch.float32)
    untied = gpu_decode.build(gpu_decode.TINY["tiny-b"], torch.device("cpu"), torch.float32)
    assert gpu_decode.weight_bytes(tied) == 4 * sum(p.numel() for p in tied.parameters())
    assert gpu_decode.weight_bytes(untied) == 4 * sum(p.numel() for p in untied.parameters())
    assert tied.get_input_embeddings().weight.data_ptr() == tied.get_output_embeddings().weight.data_ptr()


def test_real_shapes_have_the_advertised_sizes():
    gpu_decode = load_script()
    with torch.device("meta"):
        small = gpu_decode.LlamaForCausalLM(gpu_decode.SHAPES["125m"].config())
        large = gpu_decode.LlamaForCausalLM(gpu_decode.SHAPES["1b"].config())
    assert 100e6 < sum(p.numel() for p in small.parameters()) < 150e6
    assert 1.0e9 < sum(p.numel() for p in large.parameters()) < 1.2e9
