"""The images (deploy/docker): Dockerfiles parsed and checked against the repository, the chart and the local
Triton setup (no Docker engine runs here), .dockerignore, and the health-check script the images carry, run against
a real gRPC health server."""
from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy_support import CHART, REPO

pytestmark = pytest.mark.deploy

DOCKER = REPO / "deploy" / "docker"
HEALTH_CHECK = DOCKER / "health_check.py"
SERVICE_COMMANDS = {"policy", "reward", "feedback", "trainer", "rollout-worker"}
PLANNED_COMMANDS = {"reward", "trainer", "rollout-worker"}
"""Commands the chart and compose run that are being built in their own issues (the image runs `rlhf <command>`)."""


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling continuation"
    return out


def stages(parsed: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for word, rest in parsed:
        if word == "FROM":
            match = re.match(r"^(\S+)(?:\s+AS\s+(\S+))?$", rest, re.IGNORECASE)
            assert match, rest
            name = match.group(2) or f"stage{len(out)}"
            out[name] = [(word, rest)]
        elif name is not None:
            out[name].append((word, rest))
    return out


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.lstrip("!")))
    return patterns


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (repo-relative) out of the build context (its .dockerignore rules: a pattern
    excludes a path or any folder above it; `**` matches any number of folders; the last match wins)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, pattern in dockerignore_patterns():
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            result = not negated
    return result


def copy_sources(stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source, destination) of every COPY that takes files from the build context."""
    out = []
    for word, rest in stage:
        if word != "COPY" or "--from=" in rest:
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        out += [(src, args[-1]) for src in args[:-1]]
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


# --------------------------------------------------------------------------------------------- the platform image


def test_dockerfile_is_multi_stage_non_root_and_picks_the_variant() -> None:
    parsed = instructions(DOCKER / "Dockerfile")
    assert parsed[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")
    assert ("ARG", "VARIANT=cpu") in parsed[:3], "VARIANT is declared before the first FROM, so FROM can use it"
    by_stage = stages(parsed)
    assert list(by_stage) == ["build", "runtime-base", "runtime-cpu", "runtime-cuda", "runtime"]
    assert by_stage["runtime"][0] == ("FROM", "runtime-${VARIANT} AS runtime")
    build_steps = " ".join(rest for word, rest in by_stage["build"] if word == "RUN")
    assert "cpu)" in build_steps and "cuda)" in build_steps and "download.pytorch.org/whl/cpu" in build_steps
    base = by_stage["runtime-base"]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in base, "the runtime gets the venv, not the compilers"
    assert ("USER", "10001:10001") in base
    assert ("ENTRYPOINT", '["rlhf"]') in base
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001 and values["podSecurityContext"]["runAsGroup"] == 10001
    env = env_of(base)
    assert env["RLHF_HOST"] == "0.0.0.0"
    assert env["RLHF_ARTIFACT_ROOT"] == values["artifacts"]["mountPath"]
    assert env["HOME"].startswith("/home/") and env["XDG_CACHE_HOME"].startswith("/tmp/"), \
        "caches go to /tmp (an emptyDir): the root filesystem is read-only"
    assert "/opt/rlhf/bin" in env["PATH"], "the probes and `helm test` run grpc-health from PATH"
    assert env_of(by_stage["runtime-cuda"])["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_dockerfile_copies_exist_and_survive_dockerignore() -> None:
    for name in ("Dockerfile", "triton.Dockerfile"):
        for stage in stages(instructions(DOCKER / name)).values():
            for source, _ in copy_sources(stage):
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such path"
                assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
                # The files of the checkout under it (git's view: build outputs such as *.egg-info are not files
                # of the project, and .dockerignore may drop them).
                listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", source],
                                        capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
                assert listed, f"{name}: COPY {source} has no file"
                for rel in listed:
                    assert not ignored(rel), f"{name}: {rel} is excluded by .dockerignore"


def test_dockerignore_keeps_weights_and_state_out() -> None:
    for path in ("out/demo/policy/model.safetensors", ".git/HEAD", "tests/conftest.py", "helm/rlhf/Chart.yaml",
                 "services/rlhf/__pycache__/cli.cpython-311.pyc", "runs/x", "deploy/local/infra.py"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "services/rlhf/cli.py", "deploy/docker/health_check.py",
                 "deploy/triton/model_repository/policy/config.pbtxt"):
        assert not ignored(path), path


def test_exposed_ports_are_the_chart_ports() -> None:
    parsed = instructions(DOCKER / "Dockerfile")
    exposed = {int(p) for word, rest in parsed if word == "EXPOSE" for p in rest.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("policy", "reward", "feedback", "trainer", "rolloutWorker"):
        assert set(values[key]["ports"].values()) <= exposed, key


def test_the_image_runs_the_services_the_chart_names() -> None:
    from rlhf.cli import SUBCOMMANDS

    templates = (CHART / "templates" / "_helpers.tpl").read_text()
    named = set(re.findall(r"command: ([a-z-]+),", templates))
    assert named == SERVICE_COMMANDS
    missing = named - set(SUBCOMMANDS)
    assert missing <= PLANNED_COMMANDS, f"the chart runs `rlhf {sorted(missing)}`, which does not exist"


def test_the_triton_template_repository_is_where_the_policy_looks() -> None:
    base = stages(instructions(DOCKER / "Dockerfile"))["runtime-base"]
    env = env_of(base)
    copies = dict(copy_sources(base))
    assert copies["deploy/triton/model_repository"] == env["RLHF_TRITON_MODEL_REPOSITORY"]
    assert copies["deploy/docker/health_check.py"] == "/opt/rlhf/bin/grpc-health"


# --------------------------------------------------------------------------------------------- the Triton image


def test_triton_image_is_nvidias_server_with_our_models() -> None:
    parsed = instructions(DOCKER / "triton.Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in parsed if word == "ARG" and "=" in rest)
    assert args["TRITON_IMAGE"].startswith("nvcr.io/nvidia/tritonserver:")
    local = (REPO / "deploy" / "local" / "triton.py").read_text()
    pytriton = re.search(r'^PYTRITON_VERSION = "([^"]+)"', local, re.MULTILINE).group(1)
    assert args["PYTRITON_VERSION"] == pytriton, "the same Triton (2.51) as the local server the tests run"
    assert args["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3", "24.10 is Triton 2.51"
    server = stages(parsed)["triton"]
    assert server[0] == ("FROM", "${TRITON_IMAGE} AS triton")
    copies = dict(copy_sources(server))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert copies["deploy/triton/model_repository"] == values["triton"]["modelRepository"]
    assert ("USER", "10001:10001") in server
    assert env_of(server)["RLHF_MODEL_ROOT"] == values["artifacts"]["mountPath"]
    (cmd,) = [rest for word, rest in server if word == "CMD"]
    assert "--model-control-mode=explicit" in cmd and "--strict-readiness=false" in cmd
    exposed = {int(p) for word, rest in server if word == "EXPOSE" for p in rest.split()}
    assert exposed == set(values["triton"]["ports"].values())
    steps = " ".join(rest for word, rest in server if word == "RUN")
    assert "python3.11" in steps and '"numpy<2"' in steps and "python_backend_stubs/3.11" in steps


# --------------------------------------------------------------------------------------------- grpc-health


class HealthServer:
    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, status: int) -> None:
        self.servicer.set("", status)

    def stop(self) -> None:
        self.server.stop(0).wait()


def health_check(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTH_CHECK), *args], capture_output=True, text=True, timeout=timeout_s)


def test_health_check_script_against_a_real_health_server() -> None:
    a, b = HealthServer(), HealthServer()
    try:
        a.set(health_pb2.HealthCheckResponse.SERVING)
        b.set(health_pb2.HealthCheckResponse.SERVING)
        both = (f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}")
        proc = health_check(*both)
        assert proc.returncode == 0 and proc.stdout.count(": SERVING") == 2, proc.stdout + proc.stderr

        b.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = health_check(*both)
        assert proc.returncode == 1 and f"127.0.0.1:{b.port}: NOT_SERVING" in proc.stdout, proc.stdout

        # --wait: keeps asking until every server serves.
        timer = threading.Timer(1.5, b.set, args=(health_pb2.HealthCheckResponse.SERVING,))
        timer.start()
        started = time.monotonic()
        proc = health_check("--wait", "20", *both)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert time.monotonic() - started < 15
        timer.join()
    finally:
        a.stop()
        b.stop()
    proc = health_check("--timeout", "1", f"127.0.0.1:{a.port}")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stdout, proc.stdout


def test_health_check_script_refuses_half_a_client_certificate() -> None:
    proc = health_check("--tls", "--cert", "c.pem", "127.0.0.1:1")
    assert proc.returncode == 2 and "--cert and --key go together" in proc.stderr
