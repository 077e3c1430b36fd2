"""Fixtures of the deployment tests (tests/deploy): the tools they run, from deploy/local/tools.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from deploy_support import require_tool


@pytest.fixture(scope="session")
def helm3() -> Path:
    return require_tool("helm3")


@pytest.fixture(scope="session")
def helm4() -> Path:
    return require_tool("helm4")


@pytest.fixture(scope="session", params=["helm3", "helm4"])
def helm(request: pytest.FixtureRequest) -> Path:
    """Each test that takes it runs with Helm 3 and with Helm 4."""
    return require_tool(request.param)


@pytest.fixture(scope="session")
def promtool() -> Path:
    return require_tool("promtool")
