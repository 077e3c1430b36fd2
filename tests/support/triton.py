"""A tritonserver for the tests, started and stopped through deploy/local/triton.py (which installs it on first use)."""
from __future__ import annotations

import contextlib
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_SCRIPT = REPO_ROOT / "deploy" / "local" / "triton.py"
TEMPLATES = REPO_ROOT / "deploy" / "triton" / "model_repository"

# Marks of a test module that needs the server.
TRITON_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="the tritonserver binary of nvidia-pytriton is for x86_64 Linux",
    ),
]


def triton_cli(state: Path, *args: str, timeout: float) -> str:
    """Run deploy/local/triton.py with a state dir; its stdout, or the test fails with its output."""
    proc = subprocess.run(
        [sys.executable, str(TRITON_SCRIPT), "--state", str(state), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        pytest.fail(f"deploy/local/triton.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def running_triton(tmp: Path, model_root: Path) -> Iterator[dict]:
    """A tritonserver on free ports with no model loaded, serving a copy of the repository templates:
    {"grpc": host:port, "metrics": url, "templates": the copied repository}. Stopped on exit."""
    repository = tmp / "model_repository"
    shutil.copytree(TEMPLATES, repository, symlinks=True)
    state = tmp / "state"
    out = triton_cli(
        state, "up", "--model-repository", str(repository), "--model-root", str(model_root),
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        timeout=900,  # the first run installs the server
    )
    env = dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))
    try:
        yield {"grpc": env["RLHF_TRITON_GRPC"], "metrics": env["RLHF_TRITON_METRICS_URL"], "templates": repository}
    finally:
        triton_cli(state, "down", timeout=60)
