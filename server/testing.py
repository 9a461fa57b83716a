"""A real server in a subprocess, for tests and benchmarks that need a process of its own
(`kill -9`, SIGTERM, resident memory, a client that must not share the server's GIL).

The server binds port 0 and reports the port it got through `--port-file`, so there is no race
for a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from embedwarden.client import Client


def free_port() -> int:
    """A port that was free a moment ago (for other programs that cannot report their own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m embedwarden.server --data-dir DATA_DIR ARGS...`; metrics off unless ARGS say."""

    def __init__(self, data_dir: Path, *args: str, name: str = "") -> None:
        """`name` tells apart the port and log files of servers sharing one data directory."""
        self.data_dir = data_dir
        self.args = args
        self.port_file = data_dir.parent / f"{name or data_dir.name}.port"
        self.log = data_dir.parent / f"{name or data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.serving_after = 0.0  # seconds from spawn to health SERVING

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: float = 300.0) -> ServerProcess:
        """Spawns the server and returns once its health service reports SERVING."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "embedwarden.server",
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--metrics-port",
            "-1",
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        started = time.perf_counter()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
        deadline = time.monotonic() + wait
        while not self.port_file.exists():
            self._check_alive(deadline)
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        with Client(self.address, timeout=5) as client:
            while True:
                try:
                    if client.health() == "SERVING":
                        break
                except Exception:
                    pass
                self._check_alive(deadline)
                time.sleep(0.02)
        self.serving_after = time.perf_counter() - started
        return self

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (graceful shutdown)."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Graceful if possible, forced if it takes more than a minute."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def _status(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc status")

    def rss_bytes(self) -> int:
        return self._status("VmRSS")

    def peak_rss_bytes(self) -> int:
        return self._status("VmHWM")
