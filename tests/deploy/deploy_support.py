"""What the deployment tests share: the tools (Helm 3, Helm 4, promtool, from deploy/local/tools.py) and chart renders.

The tools are not skipped when missing: CI installs them (`python deploy/local/tools.py install`); a test that needs
one fails saying how to install it. Renders are cached per arguments for the session.
"""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "rlhf"
EXAMPLES = ("values-cpu.yaml", "values-gpu-triton.yaml", "values-external-tls.yaml")
KUBE_VERSIONS = ("1.31.0", "1.37.0")
RELEASE = "rlhf"
NAMESPACE = "rlhf"


def _load_tools():
    # tools.py imports its sibling localtools; deploy/local is on sys.path only meanwhile: it also holds triton.py,
    # which would shadow the `triton` package that torch imports.
    local = str(REPO / "deploy" / "local")
    sys.path.insert(0, local)
    try:
        spec = importlib.util.spec_from_file_location("rlhf_deploy_tools", REPO / "deploy" / "local" / "tools.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(local)
    return module


tools = _load_tools()


def require_tool(name: str) -> Path:
    try:
        return tools.require(name)
    except tools.ToolError as e:
        pytest.fail(str(e), pytrace=False)


def run(cmd: list[str | Path], timeout_s: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout_s, cwd=REPO, **kwargs)


def helm_template(helm: Path, *args: str, kube_version: str = KUBE_VERSIONS[0]) -> subprocess.CompletedProcess:
    return run([helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", kube_version, *args])


@functools.cache
def _render(helm: str, args: tuple[str, ...], kube_version: str) -> tuple[dict, ...]:
    proc = helm_template(Path(helm), *args, kube_version=kube_version)
    if proc.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(helm: Path, *args: str, kube_version: str = KUBE_VERSIONS[0]) -> list[dict]:
    """The objects of ``helm template`` with these arguments (e.g. ``-f`` files, ``--set``), as dicts."""
    return list(_render(str(helm), tuple(args), kube_version))


def values_args(example: str | None) -> tuple[str, ...]:
    return () if example is None else ("-f", str(CHART / example))


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod spec) of every workload, the test Job and the TrainingRuntime's job template included."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "TrainingRuntime":
            for job in d["spec"]["template"]["spec"]["replicatedJobs"]:
                out.append((f"TrainingRuntime/{d['metadata']['name']}/{job['name']}",
                            job["template"]["spec"]["template"]["spec"]))
    return out
