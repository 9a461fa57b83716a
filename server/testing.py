"""Real servers for tests and benchmarks.

`ServerThread` runs an Application in this process, on its own event loop in a background
thread. `ServerProcess` runs one in a subprocess, for tests that need a process of its own
(`kill -9`, SIGTERM, resident memory, a client that must not share the server's GIL); it binds
port 0 and reports the port it got through `--port-file`, so there is no race for a free port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from embedwarden.client import Client

from ._app import Application
from ._settings import Settings
from .models import Registry


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

    def start(self, wait: float = 300.0, service: str = "") -> ServerProcess:
        """Spawns the server and returns once its health service reports SERVING for
        `service` ("" overall; "live" once the startup loads were attempted, whatever their
        outcome)."""
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
                    if client.health(service) == "SERVING":
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


class ServerThread:
    """Runs an Application on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.app = Application(settings, registry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )

    def start(self, wait_loaded: float | None = 300.0) -> int:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.app.start(), self._loop).result()
        if wait_loaded is not None and not self.app.startup_done.wait(wait_loaded):
            raise TimeoutError("startup models did not load in time")
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stop(self, grace: float = 5.0) -> None:
        asyncio.run_coroutine_threadsafe(self.app.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
