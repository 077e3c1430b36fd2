"""Fixtures for real infrastructure: Kafka, Redis and Prometheus on loopback.

Each session fixture takes its service from the environment when set (``RLHF_KAFKA_BOOTSTRAP``, ``RLHF_REDIS_URL``,
``RLHF_PROMETHEUS_URL`` + ``RLHF_PROMETHEUS_TARGETS_DIR``; ``eval "$(python deploy/local/infra.py env)"`` after
``infra.py up`` sets them all), else starts it with deploy/local/infra.py and stops it at the end of the session,
unless another test session still uses it (a lease file per session in the infra state dir) or
``RLHF_INFRA_KEEP=1`` asks to keep it for the next run. Only what a test asks for is started, so the unit tests
need none of it.

Tests that use any of these fixtures are marked ``integration`` automatically (``-m "not integration"`` skips them).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.private_redis import PrivateRedis

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "deploy" / "local" / "infra.py"
INFRA_FIXTURES = {"kafka_bootstrap", "redis_url", "prometheus", "kafka_broker", "private_redis"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INFRA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------------------------- infra.py


class Infra:
    """deploy/local/infra.py for this test session: starts services on demand, stops what it started."""

    def __init__(self) -> None:
        self.state_dir = Path(os.environ.get("RLHF_INFRA_STATE") or "/tmp/rlhf-infra")
        self.started: list[str] = []
        self.lease = self.state_dir / "leases" / str(os.getpid())

    def run(self, *args: str, timeout_s: float = 600) -> str:
        proc = subprocess.run(
            [sys.executable, str(INFRA), *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"infra.py {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def up(self, name: str) -> None:
        self.lease.parent.mkdir(parents=True, exist_ok=True)
        self.lease.touch()
        out = self.run("up", name)
        sys.stderr.write(out)
        if re.search(rf"^{name}\s+started ", out, re.MULTILINE):
            self.started.append(name)

    def env(self) -> dict[str, str]:
        pairs = re.findall(r"^export (\w+)=(.*)$", self.run("env"), re.MULTILINE)
        return dict(pairs)

    def other_sessions_alive(self) -> bool:
        for lease in self.lease.parent.glob("*"):
            if lease == self.lease or not lease.name.isdigit():
                continue
            if Path(f"/proc/{lease.name}").exists():
                return True
            lease.unlink(missing_ok=True)  # a session that died without cleaning up
        return False

    def finish(self) -> None:
        self.lease.unlink(missing_ok=True)
        if not self.started or os.environ.get("RLHF_INFRA_KEEP") == "1":
            return
        if self.other_sessions_alive():
            sys.stderr.write(f"\nleaving {', '.join(self.started)} running: another test session uses them\n")
            return
        self.run("stop", *reversed(self.started))


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    session = Infra()
    yield session
    session.finish()


def _from_env_or_infra(infra: Infra, env_name: str, service: str) -> str:
    value = os.environ.get(env_name)
    if value:
        return value
    infra.up(service)
    return infra.env()[env_name]


@pytest.fixture(scope="session")
def kafka_bootstrap(infra: Infra) -> str:
    """``host:port`` of a real Kafka broker."""
    return _from_env_or_infra(infra, "RLHF_KAFKA_BOOTSTRAP", "kafka")


@pytest.fixture(scope="session")
def redis_url(infra: Infra) -> str:
    """``redis://host:port/db`` of a real Redis."""
    return _from_env_or_infra(infra, "RLHF_REDIS_URL", "redis")


# --------------------------------------------------------------------------------------------- Kafka outages


class KafkaBroker:
    """Stops and restarts the broker that infra.py runs, keeping its data (a broker outage)."""

    def __init__(self, infra: Infra, bootstrap: str) -> None:
        self.infra = infra
        self.bootstrap = bootstrap
        self.stopped = False

    def stop(self) -> None:
        self.infra.run("stop", "kafka")
        self.stopped = True

    def start(self) -> None:
        self.infra.run("start", "kafka")
        self.stopped = False


@pytest.fixture
def kafka_broker(infra: Infra, kafka_bootstrap: str) -> Iterator[KafkaBroker]:
    """The broker behind ``kafka_bootstrap`` with ``stop()`` / ``start()``; restarted after the test if left down."""
    managed = infra.env()["RLHF_KAFKA_BOOTSTRAP"]
    if managed != kafka_bootstrap:
        pytest.skip(f"the broker at {kafka_bootstrap} is not run by deploy/local/infra.py ({managed}); cannot stop it")
    broker = KafkaBroker(infra, kafka_bootstrap)
    yield broker
    if broker.stopped:
        broker.start()


# --------------------------------------------------------------------------------------------- Redis outages


@pytest.fixture
def private_redis(infra: Infra, redis_url: str, tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis of this test's own with ``stop()`` / ``start()`` (``redis_url`` ensures redis-server is installed)."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A real Prometheus: register scrape targets (file_sd) and query its HTTP API."""

    def __init__(self, url: str, targets_dir: Path) -> None:
        self.url = url.rstrip("/")
        self.targets_dir = targets_dir

    @contextlib.contextmanager
    def target(self, job: str, address: str, **labels: str) -> Iterator[Path]:
        """Scrape ``address`` (``host:port`` serving /metrics) as ``job`` while the block runs."""
        path = self.register_target(job, address, **labels)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def register_target(self, job: str, address: str, **labels: str) -> Path:
        """Write a file_sd file for ``address``; remove the returned path to stop scraping it."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job}-{address}")
        path = self.targets_dir / f"{name}-{uuid.uuid4().hex[:6]}.json"
        tmp = path.with_suffix(".tmp")  # Prometheus watches *.json: write elsewhere, then rename atomically
        tmp.write_text(json.dumps([{"targets": [address], "labels": {"job": job, **labels}}]))
        os.replace(tmp, path)
        return path

    def query(self, expr: str) -> list[dict]:
        """The result list of an instant query (``/api/v1/query``); raises on a bad query."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error', e)}") from None
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30.0,
                 predicate: Callable[[list[dict]], bool] | None = None) -> list[dict]:
        """Poll ``expr`` until it returns data (and ``predicate(result)`` holds); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(expr)
            if result and (predicate is None or predicate(result)):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"no data for {expr!r} within {timeout}s (last result: {result})")
            time.sleep(0.25)


@pytest.fixture(scope="session")
def prometheus(infra: Infra) -> Prometheus:
    """A real Prometheus scraping every 1 s whatever is registered with ``prometheus.target(job, address)``."""
    url = os.environ.get("RLHF_PROMETHEUS_URL")
    targets = os.environ.get("RLHF_PROMETHEUS_TARGETS_DIR")
    if not (url and targets):
        infra.up("prometheus")
        env = infra.env()
        url, targets = env["RLHF_PROMETHEUS_URL"], env["RLHF_PROMETHEUS_TARGETS_DIR"]
    return Prometheus(url, Path(targets))


# --------------------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a module's tiny models (faster on a shared 2-core machine, see INFRA-NOTES);
    a module enables it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def keep_torch_threads() -> Iterator[None]:
    """Restores torch's thread count after a module whose commands set it in this process (``--threads``)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- names


def _unique(request: pytest.FixtureRequest, prefix: str) -> str:
    """``<prefix>-<test name>-<random>``, within Kafka's topic-name rules ([A-Za-z0-9._-], at most 249 chars)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80].strip("-")
    return f"{prefix}-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses."""
    return _unique(request, "test")


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    """A consumer group id no other test uses."""
    return _unique(request, "group")
