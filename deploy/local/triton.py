#!/usr/bin/env python3
"""A real NVIDIA Triton Inference Server on loopback, for local work and the integration tests. No Docker, no GPU.

    python deploy/local/triton.py install                 fetch the server (first time) and build its backend folder
    python deploy/local/triton.py up --model-repository DIR [--http-port P --grpc-port P --metrics-port P]
                                                          start it (explicit model control) and wait until it is ready
    python deploy/local/triton.py down                    stop it
    python deploy/local/triton.py status                  whether it runs and answers
    python deploy/local/triton.py env                     shell `export` lines (RLHF_TRITON_GRPC, ...)

Standard library only, so it runs before the project is installed. Every command is idempotent.

Where the server comes from (see /work/shared/INFRA-NOTES.md, section Triton): PyPI ``nvidia-pytriton`` bundles a real
``tritonserver`` binary with the Python backend. We use the binary only, never PyTriton's Python API:

* the wheel is installed with ``pip install --no-deps --target`` into a cache folder outside the checkout
  (``RLHF_INFRA_CACHE``, default ``~/.cache/rlhf``). ``--no-deps`` on purpose: the wheel requires ``numpy<2`` and a
  plain ``pip install`` would silently downgrade the numpy of the environment it lands in;
* the bundled ``backends/python`` folder has no stub process; we build our own backend folder: a copy of it plus the
  ``triton_python_backend_stub`` for the Python version that will run the models;
* the stub embeds the interpreter of the ``python3`` first on ``PATH`` (it ignores ``PYTHONPATH``) and needs that
  interpreter's ``libpython`` and the wheel's ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``;
* that environment must have ``numpy<2``: with numpy 2 the stub corrupts every BYTES tensor (a request with a string
  input kills the stub: "unpack_from requires a buffer of at least ...") and numeric outputs come back empty. When the
  interpreter's numpy is 2.x, ``install`` builds a small stub environment (a venv with ``--system-site-packages``, so
  torch, transformers and ``rlhf`` come from the interpreter, plus ``numpy<2`` of its own that shadows numpy 2) and
  ``up`` puts it first on ``PATH``. With ``numpy<2`` in the project's environment no extra environment is built.

State (pid, ports, log) lives in ``$RLHF_INFRA_STATE/triton`` (default /tmp/rlhf-infra/triton), beside the state of
deploy/local/infra.py. Do not start Python with /tmp/rlhf-infra as its working directory: the ``triton`` folder there
would shadow the ``triton`` module that torch imports.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from localtools import file_lock, log_end

HOST = "127.0.0.1"
PYTRITON_VERSION = "0.7.0"
"""PyPI nvidia-pytriton release whose bundled tritonserver (2.51) we run. Override with RLHF_PYTRITON_VERSION."""
DEFAULT_PORTS = {"http": 18000, "grpc": 18001, "metrics": 18002}
"""Triton's usual 8000/8001/8002 plus 10000 (as deploy/local/infra.py shifts its ports), clear of other servers."""
PORT_ENV = {"http": "RLHF_TRITON_HTTP_PORT", "grpc": "RLHF_TRITON_GRPC_PORT", "metrics": "RLHF_TRITON_METRICS_PORT"}
SERVER_MARKER = "tritonserver"
"""A word of the server's command line: a pid in the state file counts as ours only while its command line has it."""


class TritonSetupError(Exception):
    """Triton could not be installed or did not come up; the message says what to do."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- paths


@dataclasses.dataclass(frozen=True)
class Paths:
    state_dir: Path
    """pid, ports, log of the running server: ``$RLHF_INFRA_STATE/triton``."""
    home: Path
    """The installed wheel, our backend folder and (when needed) the stub environment; survives ``down``."""
    python: Path
    """The interpreter whose environment the models run in (the stub embeds it)."""

    @property
    def state_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def wheel_dir(self) -> Path:
        return self.home / "pkg"

    @property
    def server_root(self) -> Path:
        """The wheel's ``pytriton/tritonserver`` folder: bin/, backends/, python_backend_stubs/, caches/."""
        return self.wheel_dir / "pytriton" / "tritonserver"

    @property
    def server_binary(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def wheel_libs(self) -> Path:
        """Libraries the wheel ships (libtritonserver, libcudart, ...) that our copy of the stub cannot find alone."""
        return self.wheel_dir / "nvidia_pytriton.libs"

    @property
    def backend_dir(self) -> Path:
        """Passed as ``--backend-directory``; holds ``python/`` with the backend library, utils and our stub."""
        return self.home / "backends"

    @property
    def stub_env(self) -> Path:
        return self.home / "stub-env"

    @property
    def ready_marker(self) -> Path:
        return self.home / "install.json"


def resolve_paths(args: argparse.Namespace) -> Paths:
    state_root = Path(getattr(args, "state", None) or os.environ.get("RLHF_INFRA_STATE") or "/tmp/rlhf-infra")
    cache = Path(
        os.environ.get("RLHF_INFRA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf"
    )
    version = os.environ.get("RLHF_PYTRITON_VERSION", PYTRITON_VERSION)
    python = Path(getattr(args, "python", None) or os.environ.get("RLHF_TRITON_PYTHON") or sys.executable)
    return Paths(
        state_dir=(state_root / "triton").resolve(),
        home=(cache / f"tritonserver-pytriton-{version}").resolve(),
        python=python,
    )


def run_checked(cmd: list[str], what: str, timeout_s: float = 900, **kwargs: object) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise TritonSetupError(f"{what} did not finish within {timeout_s:.0f}s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        raise TritonSetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(out))
    return proc.stdout


# --------------------------------------------------------------------------------------------- install


@dataclasses.dataclass(frozen=True)
class PythonInfo:
    """What the stub needs to know about the interpreter it embeds."""

    executable: str
    version: str  # "3.11"
    libdir: str  # the folder of its libpython (sysconfig LIBDIR)
    shared: bool  # built with --enable-shared (the stub links libpython dynamically)
    numpy: str | None  # numpy version in its environment, None when numpy is missing


_PROBE = (
    "import json, sys, sysconfig\n"
    "try:\n    import numpy; np = numpy.__version__\nexcept ImportError:\n    np = None\n"
    "print(json.dumps({'executable': sys.executable, 'version': '%d.%d' % sys.version_info[:2],"
    " 'libdir': sysconfig.get_config_var('LIBDIR'), 'shared': bool(sysconfig.get_config_var('Py_ENABLE_SHARED')),"
    " 'numpy': np}))"
)


def probe_python(python: Path | str) -> PythonInfo:
    out = run_checked([str(python), "-c", _PROBE], f"probing {python}", timeout_s=120)
    return PythonInfo(**json.loads(out.strip().splitlines()[-1]))


def numpy_major(version: str | None) -> int:
    return int(version.split(".")[0]) if version else 0


def install_wheel(paths: Paths, version: str) -> None:
    if paths.server_binary.exists():
        return
    tmp = paths.home / "pkg.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"  pip install --no-deps --target {paths.wheel_dir} nvidia-pytriton=={version} (55 MB) ...")
    started = time.monotonic()
    run_checked(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-compile", "--target", str(tmp), f"nvidia-pytriton=={version}"],
        "pip install nvidia-pytriton",
    )
    if not (tmp / "pytriton" / "tritonserver" / "bin" / "tritonserver").exists():
        raise TritonSetupError(
            f"nvidia-pytriton=={version} installed but has no pytriton/tritonserver/bin/tritonserver "
            f"(looked in {tmp}); is this an x86_64 Linux machine with glibc >= 2.35?"
        )
    shutil.rmtree(paths.wheel_dir, ignore_errors=True)
    tmp.rename(paths.wheel_dir)
    log(f"  installed in {time.monotonic() - started:.0f}s")


def build_stub_env(paths: Paths, base: PythonInfo) -> Path:
    """A venv over ``base`` (its site-packages visible) with numpy<2 of its own; returns its python."""
    python = paths.stub_env / "bin" / "python3"
    if python.exists() and numpy_major(probe_python(python).numpy) == 1:
        return python
    log(f"  {base.executable} has numpy {base.numpy}; the Python backend stub needs numpy<2.")
    log(f"  building the stub environment {paths.stub_env} (a venv over it with numpy<2) ...")
    shutil.rmtree(paths.stub_env, ignore_errors=True)
    run_checked([base.executable, "-m", "venv", "--system-site-packages", str(paths.stub_env)], "python -m venv")
    run_checked(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "numpy>=1.26,<2"],
        "pip install numpy<2 into the stub environment",
    )
    return python


def stub_python(paths: Paths) -> PythonInfo:
    """The interpreter the stub will embed: ``paths.python`` itself when its numpy is < 2, else the stub environment."""
    base = probe_python(paths.python)
    if not base.shared:
        raise TritonSetupError(
            f"{base.executable} was built without --enable-shared: the Python backend stub needs "
            f"libpython{base.version}.so (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)"
        )
    if numpy_major(base.numpy) >= 2:
        return probe_python(build_stub_env(paths, base))
    return base


def build_backend_dir(paths: Paths, py: PythonInfo) -> None:
    """``backends/python``: the bundled backend library and utils plus the stub for ``py``'s version."""
    stub = paths.server_root / "python_backend_stubs" / py.version / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in (paths.server_root / "python_backend_stubs").iterdir())
        raise TritonSetupError(f"nvidia-pytriton ships stubs for Python {have}, not {py.version} ({py.executable})")
    target = paths.backend_dir / "python"
    tmp = paths.backend_dir / "python.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(paths.server_root / "backends" / "python", tmp)
    shutil.copy2(stub, tmp / "triton_python_backend_stub")
    (tmp / "triton_python_backend_stub").chmod(0o755)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def install(paths: Paths) -> dict[str, str]:
    """Idempotent. Returns the install record (also written to ``install.json``)."""
    version = os.environ.get("RLHF_PYTRITON_VERSION", PYTRITON_VERSION)
    with file_lock(paths.home / ".lock"):
        paths.home.mkdir(parents=True, exist_ok=True)
        install_wheel(paths, version)
        py = stub_python(paths)  # probes the interpreter each time: its numpy may have changed since
        record = {
            "pytriton_version": version,
            "server_binary": str(paths.server_binary),
            "backend_dir": str(paths.backend_dir),
            "base_python": str(paths.python),
            "stub_python": py.executable,
            "stub_python_version": py.version,
            "stub_numpy": py.numpy or "",
            "libdir": py.libdir,
        }
        with contextlib.suppress(ValueError, OSError):
            stub = paths.backend_dir / "python" / "triton_python_backend_stub"
            if json.loads(paths.ready_marker.read_text()) == record and stub.exists():
                return record
        build_backend_dir(paths, py)
        paths.ready_marker.write_text(json.dumps(record, indent=2) + "\n")
        return record


def server_env(paths: Paths, record: dict[str, str]) -> dict[str, str]:
    """The server's environment: the stub's interpreter first on PATH, its libpython and the wheel's libraries found."""
    env = dict(os.environ)
    bin_dir = str(Path(record["stub_python"]).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    # Without the interpreter's own LIBDIR first the stub may load another libpython3.11 (Debian's) and fail on an
    # undefined symbol; the wheel's libs are found by the server through its RPATH but not by our copy of the stub.
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [record["libdir"], str(paths.wheel_libs), env.get("LD_LIBRARY_PATH", "")] if p
    )
    # The models get the stub interpreter's environment, not the caller's extra paths (a PYTHONPATH with numpy 2).
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


# --------------------------------------------------------------------------------------------- server


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def process_alive(pid: int) -> bool:
    """True when ``pid`` runs (not a zombie) and is a tritonserver (so a reused pid is not taken for ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and SERVER_MARKER in cmdline


def http_ready(http_port: int, timeout_s: float = 2.0) -> str | None:
    """None when ``/v2/health/ready`` answers 200, else the reason."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/v2/health/ready", timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def tail(path: Path, lines: int = 40) -> str:
    text = log_end(path)
    if text is None:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def read_state(paths: Paths) -> dict | None:
    try:
        return json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        return None


def running_state(paths: Paths) -> dict | None:
    state = read_state(paths)
    if state and process_alive(int(state["pid"])):
        return state
    return None


def resolve_ports(args: argparse.Namespace, remembered: dict | None) -> dict[str, int]:
    """Precedence: flag > environment > remembered from the last ``up`` > default. 0 picks a free port."""
    ports: dict[str, int] = {}
    for name, default in DEFAULT_PORTS.items():
        flag = getattr(args, f"{name}_port", None)
        raw = flag if flag is not None else os.environ.get(PORT_ENV[name]) or (remembered or {}).get(name) or default
        try:
            port = int(raw)
        except ValueError:
            raise TritonSetupError(f"{PORT_ENV[name]}={raw!r} is not a port number") from None
        if port == 0:
            port = pick_free_port()
        if not 0 < port < 65536:
            raise TritonSetupError(f"{name} port {port} is out of range 1..65535")
        ports[name] = port
    if len(set(ports.values())) != len(ports):
        raise TritonSetupError(f"the http, grpc and metrics ports must differ, got {ports}")
    return ports


def server_command(paths: Paths, repo: Path, ports: dict[str, int], args: argparse.Namespace) -> list[str]:
    cmd = [
        str(paths.server_binary),
        f"--model-repository={repo}",
        f"--backend-directory={paths.backend_dir}",
        "--model-control-mode=explicit",
        f"--http-address={HOST}",
        f"--http-port={ports['http']}",
        f"--grpc-address={HOST}",
        f"--grpc-port={ports['grpc']}",
        # The metrics endpoint binds every interface in 2.51 unless told otherwise.
        f"--metrics-address={HOST}",
        f"--metrics-port={ports['metrics']}",
        "--allow-metrics=true",
        # No GPU here: GPU metrics only log NVML/DCGM warnings every interval.
        "--allow-gpu-metrics=false",
        # `down` should not wait Triton's default 30 s for in-flight requests.
        f"--exit-timeout-secs={args.exit_timeout}",
        f"--log-verbose={args.log_verbose}",
        # Readiness of the server alone: with strict readiness one failed model load (a bad version) would make the
        # whole server report "not ready" to every health check.
        "--strict-readiness=false",
    ]
    cmd += [f"--load-model={name}" for name in args.load_model or []]
    return cmd


def up(paths: Paths, args: argparse.Namespace) -> dict:
    repo = Path(args.model_repository).resolve()
    if not repo.is_dir():
        raise TritonSetupError(f"--model-repository {repo} is not a folder")
    record = install(paths)
    with file_lock(paths.state_dir / ".lock"):
        state = running_state(paths)
        ports = resolve_ports(args, state["ports"] if state else None)
        wanted = {
            "model_repository": str(repo),
            "ports": ports,
            "load_model": sorted(args.load_model or []),
            "model_root": str(Path(args.model_root).resolve()) if args.model_root else None,
        }
        if state:
            if all(state.get(k) == v for k, v in wanted.items()) and not http_ready(ports["http"]):
                log(f"tritonserver already running (pid {state['pid']}) with {repo}")
                return state
            raise TritonSetupError(
                f"a tritonserver from this state dir already runs (pid {state['pid']}, repository "
                f"{state['model_repository']}, ports {state['ports']}); run `down` first or use another --state"
            )
        busy = [f"{n}={p}" for n, p in ports.items() if port_in_use(p)]
        if busy:
            raise TritonSetupError(f"ports in use: {', '.join(busy)}; pass other ports (0 picks a free one)")
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = server_command(paths, repo, ports, args)
        env = server_env(paths, record)
        if wanted["model_root"]:
            env["RLHF_MODEL_ROOT"] = wanted["model_root"]
        log(f"starting tritonserver (log {paths.log_file}) ...")
        with paths.log_file.open("ab") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            # Its own session: the server outlives this command and `down` can signal its process group (the stubs).
            # cwd is the state dir, which holds no folder named `triton` (one would shadow torch's `triton` module).
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=paths.state_dir, start_new_session=True,
            )
        state = {
            "pid": proc.pid,
            **wanted,
            "log": str(paths.log_file),
            "started_at": time.time(),
            "stub_python": record["stub_python"],
        }
        paths.state_file.write_text(json.dumps(state, indent=2) + "\n")
        wait_ready(paths, proc, ports["http"], args.timeout)
        took = time.time() - state["started_at"]
        log(f"tritonserver ready in {took:.1f}s (pid {proc.pid}, grpc {HOST}:{ports['grpc']})")
        return state


def wait_ready(paths: Paths, proc: subprocess.Popen, http_port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    reason = "not started"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            paths.state_file.unlink(missing_ok=True)
            raise TritonSetupError(
                f"tritonserver exited with code {code} before it was ready (a model named in --load-model that fails "
                f"to load makes it exit). Last lines of {paths.log_file}:\n{tail(paths.log_file)}"
            )
        reason = http_ready(http_port) or ""
        if not reason:
            return
        time.sleep(0.2)
    stop_process(proc.pid, grace_s=5)
    paths.state_file.unlink(missing_ok=True)
    raise TritonSetupError(
        f"tritonserver was not ready after {timeout_s:.0f}s ({reason}); stopped it. "
        f"Last lines of {paths.log_file}:\n{tail(paths.log_file)}"
    )


def stop_process(pid: int, grace_s: float) -> None:
    """SIGTERM (Triton unloads its models, the stubs exit), then SIGKILL of its process group after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            break
        time.sleep(0.1)
    # The group is the server's own session (start_new_session): its stubs, nothing of anyone else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def down(paths: Paths, grace_s: float) -> bool:
    with file_lock(paths.state_dir / ".lock"):
        state = running_state(paths)
        if state is None:
            stale = read_state(paths)
            if stale:  # the server died: its stub processes may live on in its process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(stale["pid"]), signal.SIGKILL)
            paths.state_file.unlink(missing_ok=True)
            return False
        stop_process(int(state["pid"]), grace_s)
        paths.state_file.unlink(missing_ok=True)
        return True


def env_lines(state: dict) -> list[str]:
    p = state["ports"]
    return [
        f"export RLHF_TRITON_GRPC={HOST}:{p['grpc']}",
        f"export RLHF_TRITON_HTTP={HOST}:{p['http']}",
        f"export RLHF_TRITON_METRICS_URL=http://{HOST}:{p['metrics']}/metrics",
    ]


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", help="state root (default $RLHF_INFRA_STATE or /tmp/rlhf-infra); Triton uses its triton/")
    p.add_argument(
        "--python",
        help="interpreter whose environment runs the models (default $RLHF_TRITON_PYTHON or this interpreter)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="fetch the server and build the backend folder (idempotent)")
    u = sub.add_parser("up", help="start tritonserver (explicit model control) and wait until it is ready")
    u.add_argument("--model-repository", required=True, help="model repository folder")
    for name in DEFAULT_PORTS:
        u.add_argument(f"--{name}-port", type=int, help=f"default ${PORT_ENV[name]}, the last one, or "
                       f"{DEFAULT_PORTS[name]}; 0 picks a free port")
    u.add_argument("--load-model", action="append",
                   help="model to load at startup (repeatable; one that fails to load stops the server)")
    u.add_argument("--model-root", help="exported to the models as RLHF_MODEL_ROOT: the root of relative model paths")
    u.add_argument("--timeout", type=float, default=float(os.environ.get("RLHF_TRITON_TIMEOUT", "120")),
                   help="seconds to wait for readiness (default 120)")
    u.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    u.add_argument("--exit-timeout", type=int, default=5,
                   help="seconds the server waits for in-flight requests when stopped")
    d = sub.add_parser("down", help="stop the server")
    d.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    sub.add_parser("status", help="whether it runs and answers (exit 1 when not)")
    sub.add_parser("env", help="print shell export lines for the running server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = resolve_paths(args)
    try:
        if args.command == "install":
            started = time.monotonic()
            record = install(paths)
            print(json.dumps(record, indent=2))
            log(f"install ok ({time.monotonic() - started:.1f}s)")
        elif args.command == "up":
            state = up(paths, args)
            print("\n".join(env_lines(state)))
        elif args.command == "down":
            log("stopped tritonserver" if down(paths, args.grace) else "tritonserver was not running")
        elif args.command == "status":
            state = running_state(paths)
            if state is None:
                print("tritonserver: not running")
                return 1
            reason = http_ready(state["ports"]["http"])
            print(f"tritonserver: pid {state['pid']}, ports {state['ports']}, repository {state['model_repository']}, "
                  + ("ready" if reason is None else f"not ready ({reason})"))
            return 0 if reason is None else 1
        elif args.command == "env":
            state = running_state(paths)
            if state is None:
                raise TritonSetupError("tritonserver is not running; start it with `up --model-repository DIR`")
            print("\n".join(env_lines(state)))
    except TritonSetupError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
