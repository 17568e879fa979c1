"""Starting a real `hogwild serve` for benchmarks: a free loopback port, ready when /health answers 200."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 600.0


@contextmanager
def running_server(env: dict[str, str]) -> Iterator[str]:
    """Yields the base URL of a server started with HOGWILD_* settings from `env`; stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HOGWILD_LOG_LEVEL": "warning", **env}
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)], cwd=REPO_ROOT, env=full_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(60)


def wait_ready(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
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
