"""The PPO math and generation import torch and transformers only: nothing of gRPC, Kafka or Redis."""
from __future__ import annotations

import json
import subprocess
import sys

MODULES = [
    "rlhf.core.masking",
    "rlhf.core.advantages",
    "rlhf.core.kl",
    "rlhf.core.losses",
    "rlhf.core.generation",
    "rlhf.core.ppo",
]
FORBIDDEN = ("grpc", "kafka", "redis", "google.protobuf", "rlhf.v1", "rlhf.serving", "rlhf.bus", "rlhf.cache")


def test_importing_the_ppo_modules_pulls_in_no_infrastructure():
    code = (
        "import importlib, json, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    offenders = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not offenders, f"importing the PPO modules loaded {offenders}"
    assert "torch" in loaded
