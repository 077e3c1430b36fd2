#!/usr/bin/env python3
"""Local infrastructure on loopback for development and tests: Kafka (single-node KRaft), Redis, Prometheus.

    python deploy/local/infra.py up [NAME ...]     provision (first time), start and wait until each answers
    python deploy/local/infra.py down              stop everything this state dir started
    python deploy/local/infra.py status            what runs, where it listens, whether it answers (exit 3 if not)
    python deploy/local/infra.py env               shell `export` lines: eval "$(python deploy/local/infra.py env)"
    python deploy/local/infra.py stop NAME ...     stop services, keeping their data (e.g. a broker outage)
    python deploy/local/infra.py start NAME ...    start them again on the same data

NAME is one of kafka, redis, prometheus. Standard library only, so it runs before the project is installed.
Idempotent: ``up`` leaves running services alone (and uses one that already answers on its port), ``stop`` of a
stopped service does nothing. Every ``up``/``start`` prints how long each service took to answer.

Where things come from (see /work/shared/INFRA-NOTES.md):
* Kafka: there is no Debian package; the broker's jars come from Maven Central through a small POM and
  ``mvn dependency:copy-dependencies``, cached outside the checkout (``~/.cache/rlhf/kafka-<version>``, with
  Maven's own repository in ``~/.cache/rlhf/m2``). Java 17 and Maven are installed from Debian when missing.
* Redis and Prometheus: Debian packages (``--no-install-recommends``), installed with apt-get when missing.

Settings (flag > environment > what the last ``up`` of this state dir used > default):
  --state          RLHF_INFRA_STATE            data dirs, logs, pid files, generated configs (/tmp/rlhf-infra)
                   RLHF_INFRA_CACHE            downloaded jars (~/.cache/rlhf)
  --kafka-version  RLHF_KAFKA_VERSION          Kafka release from Maven Central (4.4.0)
                   RLHF_KAFKA_HEAP             broker -Xmx (512m)
  --timeout        RLHF_INFRA_TIMEOUT          seconds to wait for a service to answer (90)
  --kafka-port     RLHF_KAFKA_PORT             19092        --kafka-controller-port  RLHF_KAFKA_CONTROLLER_PORT  19093
  --redis-port     RLHF_REDIS_PORT             16379        --prometheus-port        RLHF_PROMETHEUS_PORT        19090

Prometheus scrapes every 1 s whatever is described by file_sd JSON files in ``<state>/prometheus/targets``
(``RLHF_PROMETHEUS_TARGETS_DIR``) and loads the rules in ``deploy/prometheus/rules/*.yml`` (none is fine).
Note that Prometheus applies target changes at most every 5 s.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from localtools import file_lock, log_end

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

DEFAULT_KAFKA_VERSION = "4.4.0"
"""Newest Kafka 4.x on Maven Central when this was written; override with RLHF_KAFKA_VERSION / --kafka-version."""
DEFAULT_PORTS = {"kafka": 19092, "kafka_controller": 19093, "redis": 16379, "prometheus": 19090}
PORT_ENV = {
    "kafka": "RLHF_KAFKA_PORT",
    "kafka_controller": "RLHF_KAFKA_CONTROLLER_PORT",
    "redis": "RLHF_REDIS_PORT",
    "prometheus": "RLHF_PROMETHEUS_PORT",
}
SERVICE_NAMES = ("kafka", "redis", "prometheus")
MAVEN_DEPENDENCY_PLUGIN = "3.8.1"
LOG4J_VERSION = "2.25.5"
"""Version of the SLF4J-to-Log4j-2 binding added to the broker's jars: the Log4j 2 that Kafka 4.4.0 depends on."""


class InfraError(Exception):
    """Something could not be provisioned or did not come up; the message says what to do."""


# --------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    state_dir: Path
    """Data dirs, logs, pid files and generated configs."""
    cache_dir: Path
    """Downloaded Kafka jars (and Maven's local repository for them); survives ``down`` and new state dirs."""
    kafka_version: str
    """Apache Kafka release whose jars are fetched from Maven Central (Scala 2.13 build)."""
    ports: dict[str, int]
    """kafka, kafka_controller, redis, prometheus."""
    kafka_heap: str
    """Maximum JVM heap of the broker (-Xmx); small because development machines are small."""
    timeout_s: float
    """How long ``up``/``start`` wait for a service to answer before failing with its log tail."""

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.ports['kafka']}"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.ports['redis']}/0"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.ports['prometheus']}"

    @property
    def prometheus_targets_dir(self) -> Path:
        return self.state_dir / "prometheus" / "targets"


def load_settings(args: argparse.Namespace) -> Settings:
    state_dir = Path(args.state or os.environ.get("RLHF_INFRA_STATE") or "/tmp/rlhf-infra").resolve()
    cache_dir = Path(
        os.environ.get("RLHF_INFRA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf"
    ).resolve()
    remembered: dict[str, int] = {}
    ports_file = state_dir / "ports.json"
    if ports_file.exists():
        with contextlib.suppress(ValueError, OSError):
            remembered = {k: int(v) for k, v in json.loads(ports_file.read_text()).items()}
    ports: dict[str, int] = {}
    for name, default in DEFAULT_PORTS.items():
        flag = getattr(args, f"{name}_port", None)
        raw = flag if flag is not None else os.environ.get(PORT_ENV[name]) or remembered.get(name) or default
        try:
            port = int(raw)
        except ValueError:
            raise InfraError(f"{PORT_ENV[name]}={raw!r} is not a port number") from None
        if not 0 < port < 65536:
            raise InfraError(f"port {port} for {name} is out of range 1..65535")
        ports[name] = port
    if len(set(ports.values())) != len(ports):
        raise InfraError(f"ports must differ, got {ports}")
    timeout_raw = os.environ.get("RLHF_INFRA_TIMEOUT", "90")
    try:
        timeout_s = float(args.timeout if args.timeout is not None else timeout_raw)
    except ValueError:
        raise InfraError(f"RLHF_INFRA_TIMEOUT={timeout_raw!r} is not a number of seconds") from None
    return Settings(
        state_dir=state_dir,
        cache_dir=cache_dir,
        kafka_version=args.kafka_version or os.environ.get("RLHF_KAFKA_VERSION") or DEFAULT_KAFKA_VERSION,
        ports=ports,
        kafka_heap=os.environ.get("RLHF_KAFKA_HEAP", "512m"),
        timeout_s=timeout_s,
    )


# --------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, flush=True)


START_BANNER = "===== {time} starting {name} ====="


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, from the last start of the service only."""
    text = log_end(path)
    if text is None:
        return f"(no log at {path})"
    text = text.rsplit("\n=====", 1)[-1].split("\n", 1)[-1] if "\n=====" in text else text
    return "\n".join(text.splitlines()[-lines:]) or "(the log has nothing since the start)"


def port_open(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def process_alive(pid: int, home: Path) -> bool:
    """True when ``pid`` runs (not a zombie) with its working directory inside ``home``.

    Every service is started with its cwd in its state dir, so a reused pid or a process of another state dir is not
    taken for ours (the command line is no good for this: redis-server rewrites its process title).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and (cwd == home or home in cwd.parents)


def run_quiet(cmd: list[str], what: str, timeout_s: float, **kwargs: object) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise InfraError(f"{what} did not finish within {timeout_s:.0f}s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        raise InfraError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(out))
    return proc.stdout


def ensure_debian_package(binary: str, package: str) -> str:
    """Path of ``binary``; installs Debian ``package`` (without recommends) when it is missing."""
    found = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if found:
        return found
    if not shutil.which("apt-get"):
        raise InfraError(f"{binary} is missing and there is no apt-get to install {package}; install it yourself")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise InfraError(f"{binary} is missing; run as root: apt-get install -y --no-install-recommends {package}")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", package]
    log(f"  installing {package} (Debian) ...")
    try:
        run_quiet(install, f"apt-get install {package}", 900, env=env)
    except InfraError:
        # A fresh machine has no package lists yet.
        run_quiet([*prefix, "apt-get", "update"], "apt-get update", 900, env=env)
        run_quiet(install, f"apt-get install {package}", 900, env=env)
    found = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if not found:
        raise InfraError(f"installed {package} but found no {binary} on PATH")
    return found


# --------------------------------------------------------------------------------------------- probes


def kafka_metadata_probe(port: int, timeout_s: float = 2.0) -> str | None:
    """None when the broker answers a Metadata request listing at least one broker, else the reason.

    Speaks the Kafka protocol directly (stdlib only): ApiVersions v0 to learn the Metadata versions the broker
    supports (Kafka 4 dropped the oldest ones, KIP-896), then a non-flexible Metadata request (v4..v8) for no topics.
    A broker is listed in the Metadata response only once it is registered and unfenced, i.e. ready for clients.
    """
    def request(sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes) -> bytes:
        client_id = b"rlhf-infra"
        header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
        payload = header + body
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", recv_exact(sock, 4))[0]
        data = recv_exact(sock, size)
        if struct.unpack(">i", data[:4])[0] != correlation_id:
            raise ValueError("correlation id mismatch")
        return data[4:]

    def recv_exact(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by the broker")
            buf += chunk
        return buf

    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            resp = request(sock, 18, 0, 1, b"")  # ApiVersions v0
            error_code, count = struct.unpack(">hi", resp[:6])
            if error_code != 0:
                return f"ApiVersions error code {error_code}"
            versions = {}
            for i in range(count):
                key, lo, hi = struct.unpack(">hhh", resp[6 + 6 * i: 12 + 6 * i])
                versions[key] = (lo, hi)
            if 3 not in versions:
                return "broker does not offer the Metadata API yet"
            lo, hi = versions[3]
            version = min(hi, 8)
            if version < max(lo, 4):
                return f"broker supports Metadata v{lo}..v{hi}, this probe speaks v4..v8"
            body = struct.pack(">i", 0)  # an empty topic list: brokers only
            body += b"\x00"  # allow_auto_topic_creation = false
            if version >= 8:
                body += b"\x00\x00"  # include cluster / topic authorized operations = false
            resp = request(sock, 3, version, 2, body)
            (n_brokers,) = struct.unpack(">i", resp[4:8])  # after throttle_time_ms
            if n_brokers < 1:
                return "broker answers but lists no broker yet (still registering)"
            return None
    except (OSError, ValueError, struct.error) as e:
        return f"{type(e).__name__}: {e}"


def redis_probe(port: int, timeout_s: float = 2.0) -> str | None:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None if reply.startswith(b"+PONG") else f"unexpected reply to PING: {reply!r}"


def http_probe(url: str, timeout_s: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------- services


class Service:
    """One process started from this state dir, with a pid file, a log file and a readiness probe."""

    name: str

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.dir = settings.state_dir / self.name
        self.pid_file = self.dir / f"{self.name}.pid"
        self.log_file = self.dir / f"{self.name}.log"

    # -- to implement
    @property
    def port(self) -> int:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    def probe(self) -> str | None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Install / download / write configs / format storage; idempotent."""

    def command(self) -> list[str]:
        raise NotImplementedError

    stop_timeout_s = 15.0

    # -- shared
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid, self.dir) else None

    def start(self) -> str:
        """Start the service unless it already runs; wait until it answers. Returns what happened."""
        pid = self.pid()
        if pid is not None:
            self.wait_ready(pid)
            return f"already running (pid {pid})"
        if port_open(self.port):
            if self.probe() is None:
                return "already answering, started elsewhere (not managed from this state dir)"
            raise InfraError(
                f"{self.name}: port {self.port} is taken by another program; pick another port with "
                f"--{self.name}-port or {PORT_ENV[self.name]}"
            )
        self.prepare()
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as logf:
            banner = START_BANNER.format(time=time.strftime("%Y-%m-%d %H:%M:%S"), name=self.name)
            logf.write(f"\n{banner}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                self.command(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,  # outlives this script; not hit by the terminal's Ctrl-C
                env=self.env(),
            )
        self.pid_file.write_text(str(proc.pid))
        self.wait_ready(proc.pid, proc)
        return f"started (pid {proc.pid})"

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def wait_ready(self, pid: int, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + self.s.timeout_s
        reason = "not probed yet"
        while time.monotonic() < deadline:
            reason = self.probe() or ""
            if not reason:
                return
            exited = proc.poll() is not None if proc is not None else not process_alive(pid, self.dir)
            if exited:
                raise InfraError(
                    f"{self.name} exited before answering ({reason}). "
                    f"Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            time.sleep(0.2)
        raise InfraError(
            f"{self.name} did not answer within {self.s.timeout_s:.0f}s ({reason}); it is still running as pid {pid}, "
            f"stop it with `infra.py stop {self.name}`. Last lines of {self.log_file}:\n{tail(self.log_file)}"
        )

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return "not running"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline and process_alive(pid, self.dir):
            time.sleep(0.1)
        how = "stopped"
        if process_alive(pid, self.dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while process_alive(pid, self.dir):
                time.sleep(0.05)
            how = f"killed (did not stop within {self.stop_timeout_s:.0f}s of SIGTERM)"
        self.pid_file.unlink(missing_ok=True)
        return f"{how} (pid {pid})"

    def status(self) -> str:
        pid = self.pid()
        reason = self.probe()
        answering = "answering" if reason is None else f"not answering ({reason})"
        running = f"running (pid {pid})" if pid else "not running from this state dir"
        return f"{running}, {answering}"


class Kafka(Service):
    name = "kafka"
    stop_timeout_s = 20.0

    @property
    def port(self) -> int:
        return self.s.ports["kafka"]

    @property
    def home(self) -> Path:
        return self.s.cache_dir / f"kafka-{self.s.kafka_version}"

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    def where(self) -> str:
        controller = f"{HOST}:{self.s.ports['kafka_controller']}"
        return f"{self.s.kafka_bootstrap} (controller {controller}, Kafka {self.s.kafka_version})"

    def probe(self) -> str | None:
        return kafka_metadata_probe(self.port)

    def prepare(self) -> None:
        java = ensure_debian_package("java", "openjdk-17-jre-headless")
        self.ensure_jars()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_configs()
        data = self.dir / "data"
        if not (data / "meta.properties").exists():
            # Kafka's own random ids never start with "-" (one in 64 base64 ids would, and the tool's argument
            # parser takes it for an option); "--cluster-id=" keeps it an argument in any case.
            cluster_id = "-"
            while cluster_id.startswith("-"):
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            run_quiet(
                [java, "-Xmx256m", "-cp", f"{self.libs}/*", "kafka.tools.StorageTool", "format",
                 f"--cluster-id={cluster_id}", "--config", str(self.dir / "server.properties"), "--ignore-formatted"],
                "formatting Kafka storage", 120,
            )

    def ensure_jars(self) -> None:
        """Fetch the broker's jars from Maven Central once per version (a POM + dependency:copy-dependencies)."""
        done = self.home / ".complete"
        if done.exists():
            return
        mvn = ensure_debian_package("mvn", "maven")
        with file_lock(self.home / ".lock"):
            if done.exists():
                return
            log(f"  fetching Kafka {self.s.kafka_version} jars from Maven Central into {self.libs} ...")
            shutil.rmtree(self.libs, ignore_errors=True)
            pom = self.home / "pom.xml"
            pom.write_text(
                POM_TEMPLATE.format(version=self.s.kafka_version, plugin=MAVEN_DEPENDENCY_PLUGIN, log4j=LOG4J_VERSION)
            )
            run_quiet(
                [mvn, "-B", "-q", "-U", "-f", str(pom), f"-Dmaven.repo.local={self.s.cache_dir / 'm2'}",
                 "dependency:copy-dependencies", f"-DoutputDirectory={self.libs}", "-DincludeScope=runtime"],
                f"downloading Kafka {self.s.kafka_version} with Maven (is it released? see "
                "https://repo1.maven.org/maven2/org/apache/kafka/kafka_2.13/)",
                1800,
            )
            if not list(self.libs.glob("kafka_2.13-*.jar")):
                raise InfraError(f"Maven finished but {self.libs} has no kafka_2.13 jar")
            done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def write_configs(self) -> None:
        ctrl = self.s.ports["kafka_controller"]
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{ctrl}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{ctrl}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            # One broker: internal topics must not ask for more replicas than exist, or idempotent producers
            # (transaction state) and consumer groups (offsets) stall.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            # Tests create and join many groups; the default 3 s wait for more members only slows them down.
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        text = "# Generated by deploy/local/infra.py; edits are overwritten on the next start.\n"
        text += "".join(f"{k}={v}\n" for k, v in props.items())
        (self.dir / "server.properties").write_text(text)
        (self.dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)

    def command(self) -> list[str]:
        return [
            shutil.which("java") or "java",
            f"-Xmx{self.s.kafka_heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            # C1 only: starts in about 2/3 of the time on a busy 2-core machine (tests restart the broker to
            # simulate outages); a Python client, not this broker, limits throughput here.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp", f"{self.libs}/*",
            "kafka.Kafka", str(self.dir / "server.properties"),
        ]


class Redis(Service):
    name = "redis"

    @property
    def port(self) -> int:
        return self.s.ports["redis"]

    def where(self) -> str:
        return self.s.redis_url

    def probe(self) -> str | None:
        return redis_probe(self.port)

    def prepare(self) -> None:
        ensure_debian_package("redis-server", "redis-server")
        (self.dir / "data").mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port", str(self.port), "--bind", HOST, "--daemonize", "no",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir / "data"), "--logfile", "",
        ]


class Prometheus(Service):
    name = "prometheus"

    @property
    def port(self) -> int:
        return self.s.ports["prometheus"]

    def where(self) -> str:
        return f"{self.s.prometheus_url} (file_sd targets in {self.s.prometheus_targets_dir})"

    def probe(self) -> str | None:
        return http_probe(f"{self.s.prometheus_url}/-/ready")

    def prepare(self) -> None:
        ensure_debian_package("prometheus", "prometheus")
        self.s.prometheus_targets_dir.mkdir(parents=True, exist_ok=True)
        rules = REPO_ROOT / "deploy" / "prometheus" / "rules" / "*.yml"  # a glob matching nothing is fine
        targets = self.s.prometheus_targets_dir
        (self.dir / "prometheus.yml").write_text(
            PROMETHEUS_CONFIG.format(rules=json.dumps(str(rules)), targets=json.dumps(f"{targets}/*.json"),
                                     self_target=json.dumps(f"{HOST}:{self.port}"))
        )

    def command(self) -> list[str]:
        return [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={HOST}:{self.port}",
            "--web.enable-lifecycle",  # POST /-/reload after editing rules
            "--log.level=warn",
        ]


POM_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/infra.py: only used to fetch the Kafka broker's jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rlhf.local</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- The broker logs through SLF4J 1.x; Kafka's own distribution adds this binding to Log4j 2 (without it
         the broker logs nothing). Declared after kafka_2.13 so that Kafka's log4j-api/core versions win. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{plugin}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""

LOG4J2_PROPERTIES = """# Generated by deploy/local/infra.py: the broker logs to stdout, which goes to kafka.log.
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""

PROMETHEUS_CONFIG = """# Generated by deploy/local/infra.py.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: [{self_target}]
  # Tests and local services register themselves by dropping a file_sd JSON file into the targets dir.
  - job_name: rlhf
    file_sd_configs:
      - files: [{targets}]
        refresh_interval: 1s
"""

SERVICES: dict[str, type[Service]] = {"kafka": Kafka, "redis": Redis, "prometheus": Prometheus}


# --------------------------------------------------------------------------------------------- commands


def remember_ports(s: Settings) -> None:
    s.state_dir.mkdir(parents=True, exist_ok=True)
    (s.state_dir / "ports.json").write_text(json.dumps(s.ports, indent=1) + "\n")


def cmd_up(s: Settings, names: list[str]) -> int:
    t0 = time.monotonic()
    with file_lock(s.state_dir / ".lock"):
        remember_ports(s)
        for name in names:
            svc = SERVICES[name](s)
            t = time.monotonic()
            what = svc.start()
            log(f"{name:<10} {what} in {time.monotonic() - t:.1f}s: {svc.where()}")
    log(f"up: ready in {time.monotonic() - t0:.1f}s (state in {s.state_dir}); `infra.py env` prints the exports")
    return 0


def cmd_start(s: Settings, names: list[str]) -> int:
    return cmd_up(s, names)


def cmd_stop(s: Settings, names: list[str]) -> int:
    with file_lock(s.state_dir / ".lock"):
        for name in names:
            t = time.monotonic()
            what = SERVICES[name](s).stop()
            log(f"{name:<10} {what} in {time.monotonic() - t:.1f}s")
    return 0


def cmd_status(s: Settings) -> int:
    all_ok = True
    for name in SERVICE_NAMES:
        svc = SERVICES[name](s)
        st = svc.status()
        all_ok &= "not answering" not in st
        log(f"{name:<10} {st}: {svc.where()}")
    return 0 if all_ok else 3


def cmd_env(s: Settings) -> int:
    log(f"export RLHF_KAFKA_BOOTSTRAP={s.kafka_bootstrap}")
    log(f"export RLHF_REDIS_URL={s.redis_url}")
    log(f"export RLHF_PROMETHEUS_URL={s.prometheus_url}")
    log(f"export RLHF_PROMETHEUS_TARGETS_DIR={s.prometheus_targets_dir}")
    # What every service reads (ServiceConfig.bus_url / cache_url), so `rlhf feedback` etc. connect with no flag.
    log(f"export RLHF_BUS_URL=kafka://{s.kafka_bootstrap}")
    log(f"export RLHF_CACHE_URL={s.redis_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", help="state dir (env RLHF_INFRA_STATE, default /tmp/rlhf-infra)")
    p.add_argument("--kafka-version", help=f"env RLHF_KAFKA_VERSION, default {DEFAULT_KAFKA_VERSION}")
    p.add_argument("--timeout", type=float,
                   help="seconds to wait for each service to answer (env RLHF_INFRA_TIMEOUT, default 90)")
    for name, default in DEFAULT_PORTS.items():
        p.add_argument(f"--{name.replace('_', '-')}-port", dest=f"{name}_port", type=int,
                       help=f"env {PORT_ENV[name]}, default {default}")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start services (all by default) and wait until they answer")
    up.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(SERVICE_NAMES)}")
    sub.add_parser("down", help="stop every service")
    sub.add_parser("status", help="what runs and answers")
    sub.add_parser("env", help="print shell export lines")
    for verb in ("stop", "start"):
        sp = sub.add_parser(verb, help=f"{verb} one or more services, keeping their data")
        sp.add_argument("names", nargs="+", choices=SERVICE_NAMES, metavar="NAME")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        unknown = [n for n in getattr(args, "names", []) if n not in SERVICES]
        if unknown:
            raise InfraError(f"unknown service {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}")
        s = load_settings(args)
        if args.command == "up":
            return cmd_up(s, list(args.names) or list(SERVICE_NAMES))
        if args.command == "down":
            return cmd_stop(s, list(reversed(SERVICE_NAMES)))
        if args.command == "status":
            return cmd_status(s)
        if args.command == "env":
            return cmd_env(s)
        if args.command == "stop":
            return cmd_stop(s, args.names)
        if args.command == "start":
            return cmd_start(s, args.names)
    except InfraError as e:
        print(f"infra.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
