#!/usr/bin/env python3
"""Command-line tools that the deployment tests run: Helm 3, Helm 4 and promtool. Installs them for CI and developers.

    python deploy/local/tools.py install [NAME ...]   install what is missing (all by default); idempotent
    python deploy/local/tools.py path NAME            print where NAME is (exit 1, with what to run, when missing)
    python deploy/local/tools.py status               every tool, its path and version
    python deploy/local/tools.py sync-chart [--check] copy the dashboards and alert rules into the chart (helm/rlhf/files)

NAME is one of helm3, helm4, promtool. Standard library only, so it runs before the project is installed.

Where they come from (see /work/shared/INFRA-NOTES.md, section Helm and Kubernetes):
* helm3, helm4: no helm binary is packaged for Debian or PyPI; the Go module proxy serves Helm's source, so
  ``go install helm.sh/helm/v3/cmd/helm@v3.22.0`` (and ``helm.sh/helm/v4/cmd/helm@v4.3.1``) builds it. Each is built
  once into ``<cache>/bin/helm3`` / ``helm4`` (``RLHF_INFRA_CACHE``, default ``~/.cache/rlhf``, outside the checkout),
  stamped with the ``-X`` flags of Helm's Makefile (its version, and for Helm 3 the Kubernetes version of its
  client-go, without which it assumes 1.20). From empty Go caches each took about 3 minutes on a 2-core machine
  (4-4.5 minutes while the machine was busy); ``install`` prints how long. The module cache (about 0.8 GB) stays
  where Go keeps it; the build cache is temporary.
* promtool: Debian's ``prometheus`` package ships it; installed with apt-get when missing, as deploy/local/infra.py
  installs Prometheus (its ``ensure_debian_package`` is reused).

The dashboards (deploy/grafana/dashboards/*.json) and alert rules (deploy/prometheus/rules/*.yml) are the sources;
Helm reads files only from inside a chart, so ``sync-chart`` copies them to helm/rlhf/files/. A test fails when the
copies are stale (``sync-chart --check``).
"""
from __future__ import annotations

import argparse
import dataclasses
import filecmp
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localtools import file_lock

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class GoTool:
    """A binary built from a Go module with ``go install``."""

    name: str
    module: str
    """The module path (go.mod's ``module``)."""
    package: str
    """The package that ``go install`` builds, inside the module (its last element names the binary)."""
    version: str
    """The module version; the built binary must report it (``helm version --short`` starts with it)."""
    ldflags: tuple[str, ...]
    """``-X`` settings of Helm's own Makefile (``{version}``, ``{k8s_major}``, ``{k8s_minor}`` filled in): without
    them Helm 3 reports its version as "v3.22" and assumes Kubernetes 1.20 for ``lint`` and ``template``."""

    @property
    def binary(self) -> str:
        return self.package.rsplit("/", 1)[-1]


GO_TOOLS = {
    "helm3": GoTool(
        "helm3", "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm", "v3.22.0",
        ("helm.sh/helm/v3/internal/version.version={version}",
         "helm.sh/helm/v3/internal/version.gitTreeState=clean",
         "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor={k8s_major}",
         "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={k8s_minor}",
         "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor={k8s_major}",
         "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={k8s_minor}"),
    ),
    # Helm 4 reads the Kubernetes version from its build info (internal/version/clientgo.go).
    "helm4": GoTool(
        "helm4", "helm.sh/helm/v4", "helm.sh/helm/v4/cmd/helm", "v4.3.1",
        ("helm.sh/helm/v4/internal/version.version={version}",
         "helm.sh/helm/v4/internal/version.gitTreeState=clean"),
    ),
}
TOOL_NAMES = ("helm3", "helm4", "promtool")

CHART_FILES = {
    # source folder (repo-relative) -> (chart folder, glob)
    "deploy/grafana/dashboards": ("helm/rlhf/files/dashboards", "*.json"),
    "deploy/prometheus/rules": ("helm/rlhf/files/rules", "*.yml"),
}


class ToolError(Exception):
    """A tool could not be found or installed; the message says what to do."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``RLHF_INFRA_CACHE``, else ``$XDG_CACHE_HOME/rlhf``, else ``~/.cache/rlhf`` (the cache of deploy/local/infra.py)."""
    raw = os.environ.get("RLHF_INFRA_CACHE")
    if raw:
        return Path(raw).resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf").resolve()


def bin_dir() -> Path:
    return cache_dir() / "bin"


# --------------------------------------------------------------------------------------------- helm (go install)


def go_binary() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not found:
        raise ToolError("Go is needed to build Helm (go install) and was not found on PATH or in /usr/local/go/bin")
    return found


def tool_version(path: Path) -> str | None:
    """What ``helm version --short`` says (e.g. ``v3.22.0+g...``), or None when it does not run."""
    try:
        proc = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def go_tool_ok(tool: GoTool, path: Path) -> bool:
    version = tool_version(path) if path.exists() else None
    # `install` stamps the version (-X .../internal/version.version); an unstamped build says "v3.22" and is rebuilt.
    return bool(version) and version.split("+", 1)[0] == tool.version


def kubernetes_version(go: str, tool: GoTool, env: dict[str, str]) -> dict[str, str]:
    """The Kubernetes version of the client-go that ``tool`` is built with (as Helm's Makefile derives it)."""
    cmd = [go, "mod", "download", "-json", f"{tool.module}@{tool.version}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    go_mod = Path(json.loads(proc.stdout)["GoMod"]).read_text()
    match = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.\d+", go_mod, re.MULTILINE)
    if not match:
        raise ToolError(f"no k8s.io/client-go requirement in the go.mod of {tool.module}@{tool.version}")
    return {"k8s_major": "1", "k8s_minor": match.group(1)}


def install_go_tool(tool: GoTool) -> Path:
    target = bin_dir() / tool.name
    if go_tool_ok(tool, target):
        return target
    with file_lock(bin_dir() / f".{tool.name}.lock"):
        if go_tool_ok(tool, target):
            return target
        go = go_binary()
        log(f"  building {tool.name}: go install {tool.package}@{tool.version} (minutes the first time) ...")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=bin_dir(), prefix=f".{tool.name}-", ignore_cleanup_errors=True) as gobin:
            env = {
                **os.environ,
                "GOBIN": gobin,
                # A build cache of its own, removed with the folder: 1.7 GB that no later build reuses (a pinned
                # binary is built once). The module cache (about 0.8 GB) stays where Go keeps it.
                "GOCACHE": str(Path(gobin) / "gocache"),
                # Static and stripped: no C toolchain needed, and a smaller link step.
                "CGO_ENABLED": "0",
                "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -buildvcs=false -trimpath").strip(),
            }
            flags = " ".join(f"-X {x}" for x in tool.ldflags).format(version=tool.version, **kubernetes_version(go, tool, env))
            cmd = [go, "install", f"-ldflags=-s -w {flags}", f"{tool.package}@{tool.version}"]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            finally:
                # Go's own way to empty its cache, before the folder goes.
                subprocess.run([go, "clean", "-cache"], env=env, capture_output=True, timeout=600)
            if proc.returncode != 0:
                out = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
                raise ToolError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(out))
            built = Path(gobin) / tool.binary
            if not built.exists():
                raise ToolError(f"go install finished but left no {tool.binary} in {gobin}")
            os.replace(built, target)  # atomic: a concurrent reader sees the old binary or the new one
        if not go_tool_ok(tool, target):
            raise ToolError(f"built {target} but `{target} version --short` does not report {tool.version}")
        log(f"  built {tool.name} ({tool.version}) in {time.monotonic() - started:.0f}s: {target}")
    return target


# --------------------------------------------------------------------------------------------- promtool (apt-get)


def find_promtool() -> Path | None:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    return Path(found) if found else None


def install_promtool() -> Path:
    found = find_promtool()
    if found:
        return found
    # The same Debian install as the local Prometheus (infra.py, stdlib only), loaded from its file: putting
    # deploy/local on sys.path would let its triton.py shadow the `triton` package for the importing process.
    spec = importlib.util.spec_from_file_location("rlhf_local_infra", Path(__file__).resolve().parent / "infra.py")
    infra = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = infra
    spec.loader.exec_module(infra)

    started = time.monotonic()
    try:
        path = Path(infra.ensure_debian_package("promtool", "prometheus"))
    except infra.InfraError as e:
        raise ToolError(str(e)) from None
    log(f"  installed promtool (Debian prometheus) in {time.monotonic() - started:.0f}s: {path}")
    return path


# --------------------------------------------------------------------------------------------- commands


def find(name: str) -> Path | None:
    """Where tool ``name`` is installed, or None. Never installs anything."""
    if name == "promtool":
        return find_promtool()
    tool = GO_TOOLS[name]
    target = bin_dir() / tool.name
    return target if go_tool_ok(tool, target) else None


def require(name: str) -> Path:
    """Where tool ``name`` is; ToolError saying how to install it when it is missing."""
    found = find(name)
    if found is None:
        raise ToolError(f"{name} is not installed: run `python deploy/local/tools.py install {name}` (CI does)")
    return found


def install(name: str) -> Path:
    if name == "promtool":
        return install_promtool()
    bin_dir().mkdir(parents=True, exist_ok=True)
    return install_go_tool(GO_TOOLS[name])


def sync_chart(check: bool) -> list[str]:
    """Copy the dashboards and rules into the chart; the names of files that were (or, with ``check``, would be)
    changed. Files in the chart folders that have no source are removed."""
    changed: list[str] = []
    for source, (dest, pattern) in CHART_FILES.items():
        src_dir, dst_dir = REPO_ROOT / source, REPO_ROOT / dest
        wanted = {p.name: p for p in sorted(src_dir.glob(pattern))}
        present = {p.name: p for p in sorted(dst_dir.glob(pattern))} if dst_dir.exists() else {}
        for name, src in wanted.items():
            dst = dst_dir / name
            if name not in present or not filecmp.cmp(src, dst, shallow=False):
                changed.append(f"{dest}/{name}")
                if not check:
                    dst_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
        for name, dst in present.items():
            if name not in wanted:
                changed.append(f"{dest}/{name} (no source)")
                if not check:
                    dst.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("install", help="install missing tools (all by default)")
    ins.add_argument("names", nargs="*", metavar="NAME", help=", ".join(TOOL_NAMES))
    pth = sub.add_parser("path", help="print the path of an installed tool")
    pth.add_argument("name", choices=TOOL_NAMES)
    sub.add_parser("status", help="every tool, its path and version")
    sync = sub.add_parser("sync-chart", help="copy dashboards and rules into helm/rlhf/files")
    sync.add_argument("--check", action="store_true", help="change nothing; exit 1 when the copies are stale")
    args = p.parse_args(argv)
    try:
        if args.command == "install":
            unknown = [n for n in args.names if n not in TOOL_NAMES]
            if unknown:
                raise ToolError(f"unknown tool {', '.join(unknown)}; choose from {', '.join(TOOL_NAMES)}")
            started = time.monotonic()
            for name in args.names or TOOL_NAMES:
                t = time.monotonic()
                path = install(name)
                log(f"{name:<9} {path} ({time.monotonic() - t:.1f}s)")
            log(f"tools ready in {time.monotonic() - started:.1f}s")
            return 0
        if args.command == "path":
            print(require(args.name))
            return 0
        if args.command == "status":
            missing = 0
            for name in TOOL_NAMES:
                found = find(name)
                missing += found is None
                print(f"{name:<9} {found or 'missing'}")
            return 1 if missing else 0
        if args.command == "sync-chart":
            changed = sync_chart(args.check)
            for name in changed:
                print(("stale: " if args.check else "copied: ") + name)
            return 1 if (args.check and changed) else 0
    except ToolError as e:
        print(f"tools.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
