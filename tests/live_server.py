"""A real `hogwild serve` (uvicorn) subprocess on 127.0.0.1 with a free port, for end-to-end tests.

    with LiveServer({"HOGWILD_MODEL": str(model_dir), "HOGWILD_DEVICE": "cpu"}, []) as base_url:
        httpx.get(f"{base_url}/health")

Entering waits until /health answers 200 (or, with wait_ready=False, until the server answers at all); if the
server does not get there in time, or dies, its log is dumped into the error. Exiting terminates it (SIGTERM, then
SIGKILL) and checks that it left no engine process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """Context manager around one server process; `url`, `log()` and `process` are available while it runs."""

    def __init__(
        self,
        env: dict[str, str],
        args: list[str] | None = None,
        wait_ready: bool = True,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = env
        self._args = list(args or [])
        self._wait_ready = wait_ready
        self._timeout = timeout
        self._log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the server's output, open until __exit__
            prefix="hogwild-server-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **self._env}
        command = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command + self._args, cwd=REPO_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self.url

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self._log_file.close()  # the server holds its own descriptor; log() reads the file by name

    def log(self) -> str:
        return Path(self._log_file.name).read_text(errors="replace")

    def engine_pid(self) -> int | None:
        """The engine process's pid as /health reports it (None while it is down or the server is gone)."""
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).json().get("engine_pid")
        except httpx.TransportError:
            return None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed. Raises if the server had to be killed or its engine outlived it."""
        if self.process is None or self.process.poll() is not None:
            return
        engine_pid = self.engine_pid()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"server did not stop within {STOP_TIMEOUT_S}s; log:\n{self.log()}") from None
        if engine_pid is not None and not exits_within(engine_pid, STOP_TIMEOUT_S):
            os.kill(engine_pid, signal.SIGKILL)
            raise RuntimeError(f"engine process {engine_pid} outlived the server; log:\n{self.log()}")

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; log:\n{self.log()}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=2.0)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if response.status_code == 200 or not self._wait_ready:
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready within {self._timeout}s; log:\n{self.log()}")


def exits_within(pid: int, timeout: float) -> bool:
    """True once process `pid` has exited (gone, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):  # exited; only waiting to be reaped
            return True
        time.sleep(0.05)
    return False


def sse_data(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a streamed SSE response, in order; comments (keep-alives) are skipped."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def wait_for_sessions(base_url: str, running: int, waiting: int = 0, timeout: float = 10.0) -> float:
    """Polls /metrics until the engine reports `running` running and `waiting` waiting sessions; returns the
    seconds it took. Raises AssertionError with the last values on timeout."""
    started = time.monotonic()
    values: dict[str, float] = {}
    while time.monotonic() - started < timeout:
        values = metric_values(httpx.get(f"{base_url}/metrics", timeout=5.0).text)
        if values["hogwild_sessions_running"] == running and values["hogwild_sessions_waiting"] == waiting:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"expected {running} running / {waiting} waiting sessions within {timeout}s, got {values}")


def metric_values(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from Prometheus exposition text."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
