"""deploy/local/tools.py: the tools the deployment tests use are the pinned versions, found where CI installs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deploy_support import REPO, run, tools

pytestmark = pytest.mark.deploy

TOOLS = REPO / "deploy" / "local" / "tools.py"


@pytest.mark.parametrize("name", ["helm3", "helm4"])
def test_helm_is_the_pinned_release(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name)
    assert path == tools.bin_dir() / name, "built into the cache folder, outside the checkout"
    assert not str(path).startswith(str(REPO))
    short = run([path, "version", "--short"]).stdout.strip()
    assert short.split("+", 1)[0] == tools.GO_TOOLS[name].version


def test_cli_finds_the_tools(helm3: Path, helm4: Path, promtool: Path) -> None:
    status = run([sys.executable, TOOLS, "status"])
    assert status.returncode == 0, status.stdout + status.stderr
    for name, path in (("helm3", helm3), ("helm4", helm4), ("promtool", promtool)):
        proc = run([sys.executable, TOOLS, "path", name])
        assert proc.returncode == 0 and proc.stdout.strip() == str(path)


def test_install_is_idempotent_and_quick_when_installed(helm3: Path, helm4: Path, promtool: Path) -> None:
    proc = subprocess.run([sys.executable, TOOLS, "install"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "building" not in proc.stderr


def test_sync_chart_check_cli() -> None:
    proc = run([sys.executable, TOOLS, "sync-chart", "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_tool_is_refused() -> None:
    proc = run([sys.executable, TOOLS, "install", "kubectl"])
    assert proc.returncode == 1 and "unknown tool kubectl" in proc.stderr
