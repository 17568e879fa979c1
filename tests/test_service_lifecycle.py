"""The server's life around its engine process: loading, torch isolation, crash recovery, load failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import REPO_ROOT, LiveServer, exits_within, free_port, metric_values, sse_data, wait_for_sessions

LONG_SESSION = {"prompt": "Count to a thousand.", "max_tokens": 1200, "temperature": 0.0}
QUICK_SESSION = {"prompt": "Hi", "max_tokens": 3, "final_answer": False}


@pytest.fixture()
def env(tiny_model_dir: Path) -> dict[str, str]:
    return {"HOGWILD_MODEL": str(tiny_model_dir), "HOGWILD_DEVICE": "cpu", "HOGWILD_DTYPE": "float32"}


def wait_for_health(url: str, status: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/health", timeout=5.0)
        if response.status_code == status:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"/health did not answer {status} within {timeout}s")


def maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch's shared library mapped (importing torch maps it)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_health_is_503_while_loading_then_200(env: dict[str, str]) -> None:
    with LiveServer(env, [], wait_ready=False) as url:
        first = httpx.get(f"{url}/health")
        assert first.status_code == 503  # the engine process is still importing torch and loading
        assert first.json()["status"] == "loading" and first.json()["model"] is None
        refused = httpx.post(f"{url}/v1/hogwild/completions", json={"prompt": "Hi"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert "Retry-After" in refused.headers
        ready = wait_for_health(url, 200)
        assert ready["status"] == "ok" and ready["model"]


def test_api_process_never_imports_torch(env: dict[str, str]) -> None:
    server = LiveServer(env, [])
    with server as url:
        assert httpx.post(f"{url}/v1/hogwild/completions", json=QUICK_SESSION).status_code == 200
        assert server.process is not None
        assert not maps_torch(server.process.pid)
        engine_pid = server.engine_pid()
        assert engine_pid is not None and maps_torch(engine_pid)  # the check does see torch where it is


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_the_engine_process_ignores_a_stop_signal_meant_for_the_server(
    env: dict[str, str], signal_number: signal.Signals
) -> None:
    """Ctrl+C, and a service manager's SIGTERM, signal the whole process group; the server stops the engine
    itself, so the engine must not die first (its requests would fail as "engine lost", not end with "abort")."""
    server = LiveServer(env, [])
    with server as url:
        engine_pid = server.engine_pid()
        assert engine_pid is not None
        os.kill(engine_pid, signal_number)
        assert not exits_within(engine_pid, 2)
        assert httpx.post(f"{url}/v1/hogwild/completions", json=QUICK_SESSION).status_code == 200
        assert server.engine_pid() == engine_pid


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "decoding"])
def test_an_engine_whose_server_was_killed_exits_instead_of_holding_the_model(env: dict[str, str], busy: bool) -> None:
    """A server killed outright (SIGKILL, the out-of-memory killer) cannot stop its engine: the engine notices that
    the server is gone, while idle or in the middle of a session, and exits, freeing the model's memory."""
    server = LiveServer(env, [])
    with server as url:
        engine_pid = server.engine_pid()
        assert engine_pid is not None and server.process is not None
        with httpx.Client(timeout=10.0) as client:
            if busy:
                stream = client.stream("POST", f"{url}/v1/hogwild/completions", json={**LONG_SESSION, "stream": True})
                data = sse_data(stream.__enter__())  # kept: a closed generator would close the stream
                assert "hogwild" in json.loads(next(data))
                wait_for_sessions(url, running=1)
            server.process.kill()
            server.process.wait(5)
            assert exits_within(engine_pid, 10)


def test_engine_crash_fails_inflight_requests_then_the_server_recovers(env: dict[str, str]) -> None:
    server = LiveServer(env, [])
    with server as url, ThreadPoolExecutor(1) as pool:
        old_pid = server.engine_pid()
        assert old_pid is not None
        pending = pool.submit(httpx.post, f"{url}/v1/hogwild/completions", json=LONG_SESSION, timeout=60.0)
        with httpx.stream("POST", f"{url}/v1/hogwild/completions", json={**LONG_SESSION, "stream": True}) as stream:
            data = sse_data(stream)
            assert "hogwild" in json.loads(next(data))
            wait_for_sessions(url, running=2)
            os.kill(old_pid, signal.SIGKILL)
            rest = list(data)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "engine_unavailable"
        non_stream = pending.result()
        assert non_stream.status_code == 503 and non_stream.json()["error"]["code"] == "engine_unavailable"
        assert "Retry-After" in non_stream.headers

        assert httpx.get(f"{url}/health").status_code == 503
        wait_for_health(url, 200)
        new_pid = server.engine_pid()
        assert new_pid is not None and new_pid != old_pid
        again = httpx.post(f"{url}/v1/hogwild/completions", json=QUICK_SESSION)
        assert again.status_code == 200
        assert metric_values(httpx.get(f"{url}/metrics").text)["hogwild_engine_restarts_total"] == 1
    assert f"engine process {old_pid} was killed by SIGKILL" in server.log()
    # The resource tracker reports what it must clean up just after the server exits: give it time to write.
    deadline = time.monotonic() + 2.0
    while "leaked semaphore" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "leaked semaphore" not in server.log(), "the killed engine left nothing for the server to clean up"


def test_a_hung_engine_is_killed_its_requests_fail_and_a_new_one_serves(env: dict[str, str]) -> None:
    """An engine that stops answering (here: stopped by SIGSTOP) while requests are in flight is taken for hung
    after HOGWILD_ENGINE_STALL_SECONDS: its requests fail with engine_unavailable instead of waiting forever,
    /health stops answering 200, and a new engine serves."""
    server = LiveServer({**env, "HOGWILD_ENGINE_STALL_SECONDS": "2"}, [])
    with server as url:
        old_pid = server.engine_pid()
        assert old_pid is not None
        with httpx.stream("POST", f"{url}/v1/hogwild/completions", json={**LONG_SESSION, "stream": True}) as stream:
            data = sse_data(stream)
            assert "hogwild" in json.loads(next(data))
            os.kill(old_pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                rest = list(data)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old_pid, signal.SIGCONT)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "engine_unavailable" and "stopped answering" in error["message"]
        assert 2.0 <= time.monotonic() - stopped_at < 15.0
        wait_for_health(url, 200)
        assert server.engine_pid() not in (None, old_pid)
        assert httpx.post(f"{url}/v1/hogwild/completions", json=QUICK_SESSION).status_code == 200
        idle = time.monotonic()
        while time.monotonic() - idle < 3.0:  # an idle engine owes no answer: it is left alone
            assert httpx.get(f"{url}/health").status_code == 200
            time.sleep(0.2)
    assert f"engine process {old_pid} has not answered for" in server.log()


def test_serve_exits_with_a_clear_message_when_the_model_cannot_load(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    command = [sys.executable, "-m", "service", "serve", "--model", str(missing), "--port", str(free_port())]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"cannot load model {str(missing)!r}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_names_a_cache_budget_too_small_for_any_session(tiny_model_dir: Path) -> None:
    """A budget below what the shortest session reserves is the settings' fault, not the model's: the server
    exits 1 naming the variable and what a session needs."""
    command = [sys.executable, "-m", "service", "serve", "--model", str(tiny_model_dir), "--port", str(free_port())]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HOGWILD_CACHE_BUDGET_TOKENS": "100"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "KV-cache budget of 100 tokens (HOGWILD_CACHE_BUDGET_TOKENS)" in result.stderr
    assert "cannot load model" not in result.stderr and "Traceback" not in result.stderr


def wait_for_first_tokens(url: str, sessions: int, timeout: float = 30.0) -> None:
    """Waits until `sessions` requests have had their first token (the time-to-first-token histogram's count)."""
    deadline = time.monotonic() + timeout
    while metric_values(httpx.get(f"{url}/metrics").text)["hogwild_time_to_first_token_seconds_count"] < sessions:
        assert time.monotonic() < deadline, f"{sessions} sessions did not get a first token in {timeout} s"
        time.sleep(0.05)


def test_stopping_the_server_ends_sessions_with_finish_reason_abort(env: dict[str, str]) -> None:
    server = LiveServer(env, [])
    with server as url, ThreadPoolExecutor(1) as pool:
        assert server.process is not None
        engine_pid = server.engine_pid()
        pending = pool.submit(httpx.post, f"{url}/v1/hogwild/completions", json=LONG_SESSION, timeout=60.0)
        body = {**LONG_SESSION, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/hogwild/completions", json=body) as stream:
            data = sse_data(stream)
            assert "hogwild" in json.loads(next(data))
            wait_for_sessions(url, running=2)
            wait_for_first_tokens(url, sessions=2)  # the non-streamed one too has something to report
            server.process.send_signal(signal.SIGTERM)
            rest = [item if item == "[DONE]" else json.loads(item) for item in data]
        assert rest[-1] == "[DONE]"
        finishes = [chunk for chunk in rest[:-2] if chunk["hogwild"]["kind"] == "finish"]
        assert [chunk["choices"][0]["finish_reason"] for chunk in finishes] == ["abort", "abort"]
        assert rest[-2]["usage"]["completion_tokens"] > 0
        answered = pending.result()
        assert answered.status_code == 200
        assert [choice["finish_reason"] for choice in answered.json()["choices"]] == ["abort", "abort"]
        assert answered.json()["usage"]["completion_tokens"] > 0
        assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        assert engine_pid is not None and exits_within(engine_pid, 30)
        log = server.log()
        assert "Traceback" not in log and "leaked semaphore" not in log, log[-2000:]
