"""A Redis server of one test's own, which the test may stop, restart or freeze."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


class PrivateRedis:
    """A Redis server of one test's own (so that stopping it disturbs no other test), on a free loopback port.

    ``durable``: an append-only file fsynced on every write, so that a restart keeps what was acknowledged (as a
    production Redis would); else nothing is kept. ``pause()`` / ``resume()`` freeze the process (SIGSTOP): a hung
    server, which accepts connections and never answers."""

    def __init__(self, workdir: Path, durable: bool = False) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.durable = durable
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import shutil

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", *persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def pause(self) -> None:
        import signal

        assert self.proc is not None, "start() it first"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        assert self.proc is not None, "start() it first"
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            import signal

            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
