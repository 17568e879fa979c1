"""Starting a real `hogwild serve` for benchmarks: a free loopback port, ready when /health answers 200."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 600.0


@contextmanager
def running_server(env: dict[str, str]) -> Iterator[str]:
    """Yields the base URL of a server started with the HOGWILD_* settings of `env` and no others (the caller's
    environment must not change what is measured, or add an API key); stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inherited = {name: value for name, value in os.environ.items() if not name.upper().startswith("HOGWILD_")}
    full_env = {**inherited, "PYTHONPATH": str(REPO_ROOT), "HOGWILD_LOG_LEVEL": "warning", **env}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)], cwd=REPO_ROOT, env=full_env,
            stdout=subprocess.DEVNULL, stderr=log,
        )
        try:
            wait_ready(url, server, log)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()  # the engine process follows: it exits when its parent is gone
                server.wait()


def wait_ready(url: str, server: subprocess.Popen, log: BinaryIO) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with code {server.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready in time")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
