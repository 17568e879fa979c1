"""Service pieces that need no engine: settings, flags, error mapping, SSE framing, collection, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import multiprocessing
import time
import warnings
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from engine.config import EngineConfig, SessionRequest
from engine.events import (
    AnswerEvent,
    DoneEvent,
    ErrorEvent,
    InsertedEvent,
    StepEndEvent,
    TokenEvent,
    Usage,
)
from service import app as app_module
from service import bridge as bridge_module
from service.app import create_app
from service.bridge import EngineBridge, EngineProcess, EngineState, exit_description
from service.cli import build_parser, main
from service.collect import CompletionCollector
from service.errors import APIError
from service.limits import MAX_BODY_BYTES
from service.messages import Cancel, Submit
from service.metrics import Histogram, Metrics
from service.schemas import CompletionRequest
from service.session import SessionHandle
from service.settings import Settings
from service.streaming import DONE_FRAME, ChunkWriter, SessionStream, stream_session

NAMES = ("Alice", "Bob")
USAGE = Usage(prompt_tokens=10, completion_tokens_per_worker=(2, 1), steps_per_worker=(2, 1))
SESSION_EVENTS = [
    InsertedEvent(worker=0, step=1, text="**Alice [1]:** ", token_ids=(1, 2), reason="header"),
    InsertedEvent(worker=1, step=1, text="**Bob [1]:** ", token_ids=(3,), reason="header"),
    TokenEvent(worker=0, step=1, text="Two.", token_ids=(4,)),
    TokenEvent(worker=1, step=1, text="é", token_ids=(5, 6)),
    StepEndEvent(worker=0, step=1, text="**Alice [1]:** Two."),
    InsertedEvent(worker=0, step=2, text="**Alice [2]:** ", token_ids=(7,), reason="header"),
    TokenEvent(worker=0, step=2, text="\\boxed{4}", token_ids=(8,)),
    AnswerEvent(worker=0, step=2, text="4"),
    DoneEvent(usage=USAGE, finish_reasons=("stop", "length"), answer="4"),
]


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"HOGWILD_{name.upper()}", raising=False)
    return monkeypatch


def test_settings_read_hogwild_env_and_explicit_values_win(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HOGWILD_MAX_SESSIONS", "3")
    clean_env.setenv("HOGWILD_CORS_ORIGINS", "http://a.test, http://b.test")
    clean_env.setenv("HOGWILD_DEVICE", "")
    clean_env.setenv("HOGWILD_API_KEY", "secret")
    settings = Settings()
    assert settings.max_sessions == 3 and settings.device is None
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert Settings(cors_origins="*").cors_origins == ["*"]
    assert Settings(cors_origins="https://[::1]:8443").cors_origins == ["https://[::1]:8443"]
    extension_and_file_pages = "chrome-extension://abcdef,null"  # origins browsers send besides http(s)
    assert Settings(cors_origins=extension_and_file_pages).cors_origins == ["chrome-extension://abcdef", "null"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "secret"
    assert "secret" not in repr(settings)
    assert Settings(max_sessions=5).max_sessions == 5
    assert settings.max_requests == 3 + settings.max_queued
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_engine_config_carries_every_engine_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HOGWILD_CUDA_GRAPHS", "true")
    values = {  # every EngineConfig field, each away from its default
        "model": "/models/x", "device": "cpu", "dtype": "float16", "max_workers": 3, "max_tokens": 77,
        "max_sessions": 3, "cache_budget_tokens": 5000, "prefix_cache_tokens": 0,
    }
    config = Settings(**values).engine_config()
    assert dataclasses.asdict(config) == {**values, "cuda_graphs": True}
    assert all(getattr(EngineConfig(), name) != value for name, value in values.items())
    clean_env.delenv("HOGWILD_CUDA_GRAPHS")
    assert Settings().engine_config().cuda_graphs is None  # unset: the engine decides (on where graphs apply)
    clean_env.setenv("HOGWILD_CUDA_GRAPHS", "false")
    assert Settings().engine_config().cuda_graphs is False


@pytest.mark.parametrize(
    "values",
    [
        {"max_sessions": 0}, {"port": 70000}, {"dtype": "int8"}, {"max_workers": 9},
        {"cors_origins": "[1,2]"}, {"cors_origins": "http://a.test/app"}, {"cors_origins": "localhost:3000"},
    ],
)
def test_out_of_range_settings_are_refused(clean_env: pytest.MonkeyPatch, values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def test_every_setting_has_a_serve_flag_with_its_env_var_in_the_help() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    help_text = " ".join(serve.format_help().split())
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"HOGWILD_{name.upper()}" in help_text
    args = build_parser().parse_args(["serve", "--max-sessions", "3", "--cors-origins", "http://x.test"])
    assert (args.max_sessions, args.cors_origins, args.model) == ("3", "http://x.test", None)


def test_serve_with_invalid_settings_exits_2_without_a_traceback(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--max-sessions", "0"]) == 2
    error = capsys.readouterr().err
    assert "HOGWILD_MAX_SESSIONS / --max-sessions: Input should be greater than or equal to 1" in error
    assert "Traceback" not in error
    assert main(["serve", "--api-key", "s3cr\u00e9t"]) == 2
    error = capsys.readouterr().err
    assert "HOGWILD_API_KEY / --api-key: Value error, may only hold printable ASCII" in error
    assert "s3cr" not in error, "the key given is never printed"


def test_misspelt_settings_are_named_with_the_setting_they_resemble() -> None:
    environ = {
        "HOGWILD_MAX_SESSION": "1", "HOGWILD_MODEL": "x", "HOGWILD_CACHE_DIR": "/c", "HOME": "/root",
        "HOGWILD_TEMPRATURE": "0.7",  # a request field, not a setting: it resembles no setting
    }
    assert Settings.unknown_variables(environ) == [
        "HOGWILD_MAX_SESSION is not a setting and is ignored (did you mean HOGWILD_MAX_SESSIONS?)",
        "HOGWILD_TEMPRATURE is not a setting and is ignored",
    ]


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_keepalive_must_be_a_finite_positive_interval(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("HOGWILD_KEEPALIVE_SECONDS", value)
    with pytest.raises(ValidationError, match="keepalive_seconds"):
        Settings()


def test_run_with_invalid_request_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "task", "--workers", "9"]) == 2
    assert "workers" in capsys.readouterr().err


def test_validation_errors_are_400_before_the_engine_is_needed(clean_env: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(Settings()))  # lifespan not entered: no engine process
    bad = client.post("/v1/hogwild/completions", json={"prompt": "Hi", "top_k": "3"})
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {
            "message": "top_k: Input should be a valid integer",
            "type": "invalid_request_error",
            "param": "top_k",
            "code": "invalid_request",
        }
    }
    not_ready = client.post("/v1/hogwild/completions", json={"prompt": "Hi"})
    assert not_ready.status_code == 503 and not_ready.headers["Retry-After"] == "2"
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "stopped"


def test_root_says_clearly_when_the_demo_is_missing(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setattr(app_module, "demo_directory", lambda: None)
    missing = TestClient(create_app(Settings())).get("/")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "demo_missing"
    (tmp_path / "index.html").write_text("<h1>demo</h1>")
    clean_env.setattr(app_module, "demo_directory", lambda: tmp_path)
    served = TestClient(create_app(Settings())).get("/")
    assert served.status_code == 200 and served.text == "<h1>demo</h1>"


def test_the_demo_files_are_served_and_api_paths_keep_their_method_errors(clean_env: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(Settings()))  # the installed demo (clients/web)
    index = client.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert client.get("/index.html").text == index.text
    script = client.get("/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "SSEParser" in script.text
    assert client.get("/style.css").headers["content-type"].startswith("text/css")
    wrong_method = client.get("/v1/hogwild/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"] == "Method Not Allowed"
    assert client.delete("/health").status_code == 405
    unknown = client.get("/no-such-file.js")
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert client.get("/../pyproject.toml").status_code == 404


def parse_frames(frames: list[bytes]) -> list[dict | str]:
    payloads = []
    for data in frames:
        assert data.startswith(b"data: ") and data.endswith(b"\n\n") and data.count(b"\n") == 2
        text = data[len(b"data: ") : -2].decode()
        payloads.append(text if text == "[DONE]" else json.loads(text))
    return payloads


def test_chunk_writer_frames_every_event_kind() -> None:
    writer = ChunkWriter("cmpl-1", 1700000000, "m", NAMES, include_usage=True)
    chunks = parse_frames([data for event in SESSION_EVENTS for data in writer.frames(event)])
    assert writer.outcome == "ok"
    assert chunks[0] == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "text": "**Alice [1]:** ", "logprobs": None, "finish_reason": None}],
        "hogwild": {
            "worker": 0,
            "name": "Alice",
            "step": 1,
            "kind": "inserted",
            "token_ids": [1, 2],
            "reason": "header",
        },
    }
    assert chunks[3]["hogwild"] == {"worker": 1, "name": "Bob", "step": 1, "kind": "token", "token_ids": [5, 6]}
    assert chunks[4]["choices"][0]["text"] == "" and chunks[4]["hogwild"]["step_text"] == "**Alice [1]:** Two."
    assert chunks[7]["choices"][0]["text"] == "" and chunks[7]["hogwild"]["answer"] == "4"
    finishes = chunks[8:10]
    assert [(f["choices"][0]["finish_reason"], f["hogwild"]["step"]) for f in finishes] == [("stop", 2), ("length", 1)]
    assert chunks[10]["choices"] == [] and chunks[10]["usage"]["completion_tokens_per_worker"] == [2, 1]
    assert chunks[11] == "[DONE]" and len(chunks) == 12


def test_chunk_writer_reports_an_error_then_done() -> None:
    writer = ChunkWriter("cmpl-1", 0, "m", NAMES, include_usage=False)
    frames = writer.frames(ErrorEvent("engine lost", "engine_unavailable"))
    error, done = parse_frames(frames)
    assert error == {
        "error": {
            "message": "engine lost",
            "type": "service_unavailable_error",
            "param": None,
            "code": "engine_unavailable",
        }
    }
    assert frames[-1] == DONE_FRAME and done == "[DONE]"
    assert writer.outcome == "unavailable"  # counted like a non-streamed request that lost its engine
    failed = ChunkWriter("cmpl-2", 0, "m", NAMES, include_usage=False)
    failed.frames(ErrorEvent("generation failed: RuntimeError: boom"))
    assert failed.outcome == "error"


def test_collector_builds_texts_transcript_answer_and_usage() -> None:
    collector = CompletionCollector("cmpl-1", 5, "m", NAMES)
    responses = [collector.add(event) for event in SESSION_EVENTS]
    assert responses[:-1] == [None] * (len(SESSION_EVENTS) - 1)
    body = responses[-1].model_dump()
    assert [c["text"] for c in body["choices"]] == ["**Alice [1]:** Two.**Alice [2]:** \\boxed{4}", "**Bob [1]:** é"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["transcript"] == [{"worker": 0, "name": "Alice", "step": 1, "text": "**Alice [1]:** Two."}]
    assert body["answer"] == "4" and body["usage"]["total_tokens"] == 13 and body["views"] is None


@pytest.mark.parametrize(("code", "status"), [("engine_error", 500), ("engine_unavailable", 503)])
def test_collector_turns_an_error_event_into_an_api_error(code: str, status: int) -> None:
    with pytest.raises(APIError) as raised:
        CompletionCollector("cmpl-1", 5, "m", NAMES).add(ErrorEvent("boom", code))
    assert raised.value.status == status and raised.value.body()["error"]["message"] == "boom"


def test_histogram_renders_cumulative_buckets() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.render("h") == [
        'h_bucket{le="0.1"} 2',
        'h_bucket{le="1.0"} 3',
        'h_bucket{le="+Inf"} 4',
        "h_sum 3.65",
        "h_count 4",
    ]


def test_metrics_text_is_valid_exposition() -> None:
    metrics = Metrics()
    metrics.count_request("ok")
    metrics.count_request("ok")
    metrics.count_request("queue_full")
    metrics.generated_tokens = 42
    text = metrics.render(num_running=2, num_waiting=1, is_engine_up=True, kv_cache_bytes=4096, prefix_cache_bytes=512)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert "hogwild_sessions_running 2" in lines and "hogwild_sessions_waiting 1" in lines
    assert "hogwild_kv_cache_bytes 4096" in lines and "hogwild_prefix_cache_bytes 512" in lines
    assert 'hogwild_requests_total{outcome="ok"} 2' in lines
    assert 'hogwild_requests_total{outcome="queue_full"} 1' in lines
    assert "hogwild_generated_tokens_total 42" in lines
    for line in lines:  # every sample belongs to a family declared just before it
        if not line.startswith("#"):
            family = line.split("{")[0].split(" ")[0]
            declared = [other.split()[2] for other in lines if other.startswith("# TYPE")]
            assert any(family == name or family.startswith(f"{name}_") for name in declared), line


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_flag_means_no_key_as_the_empty_variable_does(clean_env: pytest.MonkeyPatch, key: str) -> None:
    """`hogwild serve --api-key ""` turned auth on with an empty key, which an empty bearer token opened."""
    assert Settings(api_key=key).api_key is None
    clean_env.setenv("HOGWILD_API_KEY", key)
    assert Settings().api_key is None


def test_the_api_key_is_kept_as_clients_send_it(clean_env: pytest.MonkeyPatch) -> None:
    """Clients trim the key and send it in a header: a key with a trailing newline would refuse them all."""
    clean_env.setenv("HOGWILD_API_KEY", "s3cret\n")
    settings = Settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    client = TestClient(create_app(settings))
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code != 401
    for unsendable in ("cl\u00e9", "two words"):
        with pytest.raises(ValidationError, match="printable ASCII"):
            Settings(api_key=unsendable)


def test_cors_preflight_passes_and_refusals_carry_cors_headers(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(cors_origins=["http://demo.test"], api_key="k")
    client = TestClient(create_app(settings))
    preflight = client.options(
        "/v1/hogwild/completions",
        headers={
            "Origin": "http://demo.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://demo.test"
    refused = client.post("/v1/hogwild/completions", json={"prompt": "Hi"}, headers={"Origin": "http://demo.test"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://demo.test"
    other = client.options(
        "/v1/hogwild/completions", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_session_counts_tokens_that_printed_nothing() -> None:
    """usage counts an end-of-sequence token that no TokenEvent carried; the metric adds it at the end."""
    session = SessionHandle("r1", 2, release=lambda _: None)
    session.deliver(TokenEvent(0, 1, "Hi", (5, 6)))
    session.deliver(TokenEvent(1, 1, "!", (7,)))
    assert session.silent_tokens(Usage(3, (2, 2), (1, 1))) == 1  # worker 1 then sampled its end of sequence
    assert session.silent_tokens(Usage(3, (2, 1), (1, 1))) == 0


@pytest.mark.parametrize(
    ("exit_code", "description"),
    [(None, "stopped"), (1, "exited with code 1"), (-9, "was killed by SIGKILL"), (-11, "was killed by SIGSEGV")],
)
def test_an_engine_exit_is_described_as_it_happened(exit_code: int | None, description: str) -> None:
    assert exit_description(exit_code) == description


class SentCommands:
    """An engine process stand-in that records the commands it is sent."""

    pid = None

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, command: object) -> None:
        self.sent.append(command)


def test_after_abort_all_no_session_opens() -> None:
    """Shutdown aborts every session; a request that reaches the bridge after that (its body was still arriving)
    must not start a generation the server would then wait for."""
    bridge = EngineBridge(Settings(), Metrics())
    bridge.state, bridge._process = EngineState.READY, SentCommands()  # type: ignore[assignment]
    bridge.abort_all()
    with pytest.raises(APIError) as raised:
        asyncio.run(asyncio.wait_for(bridge.open_session(SessionRequest(prompt="Hi")), 5))
    assert raised.value.status == 503 and "shutting down" in raised.value.message
    assert bridge._process.sent == []  # type: ignore[union-attr]


def test_an_engine_that_cannot_be_restarted_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the new process there is nothing to wait for: the server says so instead of loading forever."""
    fatal: list[str] = []
    bridge = EngineBridge(Settings(), Metrics(), on_fatal=fatal.append)

    async def no_process() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(bridge, "_spawn", no_process)
    monkeypatch.setattr(bridge_module, "RESTART_DELAY_SECONDS", 0.0)
    asyncio.run(bridge._restart(asyncio.sleep(0)))
    assert bridge.state is EngineState.FAILED
    assert fatal and "could not start" in fatal[0] and "Too many open files" in fatal[0]


async def exit_engine(bridge: EngineBridge) -> None:
    """The bridge's engine process exits; runs what that sets off (stopping it, restarting) to its end."""
    bridge._on_exit(bridge._process)  # type: ignore[arg-type]
    while bridge._tasks:
        await asyncio.wait_for(asyncio.gather(*bridge._tasks), 5)


def test_a_client_that_leaves_before_its_request_is_accepted_cancels_it_in_the_engine() -> None:
    bridge = EngineBridge(Settings(), Metrics())
    bridge.state, bridge._process = EngineState.READY, SentCommands()  # type: ignore[assignment]

    async def leave_while_waiting() -> None:
        opening = asyncio.ensure_future(bridge.open_session(SessionRequest(prompt="Hi")))
        while not bridge._process.sent:  # type: ignore[union-attr]
            await asyncio.sleep(0)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    asyncio.run(asyncio.wait_for(leave_while_waiting(), 5))
    submit, cancel = bridge._process.sent  # type: ignore[union-attr]
    assert isinstance(submit, Submit) and cancel == Cancel(submit.request_id)
    assert bridge._sessions == {}, "nothing is left to route the engine's late reply to"


def test_an_engine_that_keeps_exiting_while_loading_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that crashes its engine process on every load (a native fault, out of memory) is not restarted
    forever: after MAX_FAILED_STARTS exits before ready the server reports a fatal error."""
    fatal: list[str] = []
    bridge = EngineBridge(Settings(), Metrics(), on_fatal=fatal.append)
    spawned: list[object] = []

    class CrashedWhileLoading:
        pid = 1

        def exit_code(self) -> int:
            return -11

        def stop(self, grace_seconds: float = 10.0) -> None:
            pass

    async def spawn() -> None:
        bridge._process, bridge.state = CrashedWhileLoading(), EngineState.LOADING  # type: ignore[assignment]
        spawned.append(bridge._process)

    async def crash_on_every_load() -> None:
        await spawn()
        for _ in range(10):  # bounded: a server that never gives up fails the test instead of hanging it
            if bridge.state is not EngineState.LOADING:
                break
            await exit_engine(bridge)

    monkeypatch.setattr(bridge, "_spawn", spawn)
    monkeypatch.setattr(bridge_module, "RESTART_DELAY_SECONDS", 0.0)
    asyncio.run(crash_on_every_load())
    assert bridge.state is EngineState.FAILED and len(spawned) == bridge_module.MAX_FAILED_STARTS
    assert fatal == [f"the engine process exited {bridge_module.MAX_FAILED_STARTS} times while loading the model"]
    assert bridge.metrics.engine_restarts == bridge_module.MAX_FAILED_STARTS - 1


def test_no_engine_is_respawned_once_the_server_is_shutting_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine lost just before a SIGTERM: loading a new one would only hold up the shutdown."""
    bridge = EngineBridge(Settings(), Metrics())
    spawned: list[object] = []

    async def spawn() -> None:
        spawned.append(True)

    monkeypatch.setattr(bridge, "_spawn", spawn)
    monkeypatch.setattr(bridge_module, "RESTART_DELAY_SECONDS", 0.0)
    bridge.abort_all()  # the first thing a shutdown does
    asyncio.run(bridge._restart(asyncio.sleep(0)))
    assert spawned == []


class SilentEngine:
    """A ready engine process that never answers; `kill` is recorded and, like a process stuck in the kernel,
    changes nothing."""

    pid = 1

    def __init__(self) -> None:
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1

    def send(self, command: object) -> None:
        pass


def watched_bridge(monkeypatch: pytest.MonkeyPatch, stall_seconds: float) -> tuple[EngineBridge, SessionHandle]:
    """A ready bridge with one request in flight, watched every 50 ms."""
    monkeypatch.setattr(bridge_module, "WATCH_SECONDS", 0.05)
    monkeypatch.setattr(bridge_module, "STOP_TIMEOUT_SECONDS", 0.3)
    bridge = EngineBridge(Settings(), Metrics())
    bridge.state, bridge._process, bridge._stall_seconds = EngineState.READY, SilentEngine(), stall_seconds  # type: ignore[assignment]
    session = SessionHandle("cmpl-1", 2, bridge.release)
    bridge._sessions[session.request_id] = session
    return bridge, session


def test_an_engine_that_outlives_its_kill_still_fails_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled engine is killed; if it does not exit (a hung driver call), its requests fail anyway and /health
    stops answering 200, instead of both waiting for an exit that never comes."""
    bridge, session = watched_bridge(monkeypatch, stall_seconds=0.2)

    async def watch() -> object:
        bridge._run_in_background(bridge._watch())
        message = await session.next_message(timeout=5)
        for task in list(bridge._tasks):
            task.cancel()
        return message

    message = asyncio.run(watch())
    assert isinstance(message, ErrorEvent) and message.message == bridge_module.ENGINE_STALLED_MESSAGE
    assert bridge._process.kills == 1  # type: ignore[union-attr]
    assert bridge.state is EngineState.DOWN and "did not exit" in bridge.status_message
    assert bridge._sessions == {}


def test_a_freeze_of_the_whole_server_is_not_taken_for_a_hung_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the API process was frozen too (a paused container), the engine's silence is not measured across the
    freeze: its replies may be waiting in the pipe, unread."""
    bridge, _ = watched_bridge(monkeypatch, stall_seconds=0.5)

    async def freeze_then_answer() -> None:
        bridge._run_in_background(bridge._watch())
        await asyncio.sleep(0.1)
        bridge._replied_at = time.monotonic()
        time.sleep(1.0)  # the whole process stops: the watch cannot tick either
        await asyncio.sleep(0.3)  # the watch ticks again; then the engine's pending replies are read
        bridge._replied_at = time.monotonic()
        await asyncio.sleep(0.3)
        for task in list(bridge._tasks):
            task.cancel()

    asyncio.run(freeze_then_answer())
    assert bridge._process.kills == 0  # type: ignore[union-attr]
    assert bridge.state is EngineState.READY


def test_the_stall_limit_is_off_or_longer_than_the_heartbeat() -> None:
    assert Settings(engine_stall_seconds=0).engine_stall_seconds == 0
    with pytest.raises(ValidationError, match="at least 2 seconds"):
        Settings(engine_stall_seconds=0.5)


def test_a_new_engine_starts_only_after_the_old_one_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine whose replies can no longer be read may still be alive: it is killed (not asked, it may be stuck
    on a full pipe), and the new one spawns only once it exited, so two engines never hold the model at once."""
    bridge = EngineBridge(Settings(), Metrics())
    order: list[object] = []

    class StuckEngine:
        pid = 1

        def exit_code(self) -> None:
            return None

        def stop(self, grace_seconds: float = 10.0) -> None:
            time.sleep(0.3)
            order.append(("stopped", grace_seconds))

    async def spawn() -> None:
        order.append("spawned")

    async def lose_the_engine() -> None:
        bridge._process, bridge.state = StuckEngine(), EngineState.READY  # type: ignore[assignment]
        await exit_engine(bridge)

    monkeypatch.setattr(bridge, "_spawn", spawn)
    monkeypatch.setattr(bridge_module, "RESTART_DELAY_SECONDS", 0.0)
    asyncio.run(lose_the_engine())
    assert order == [("stopped", 0.0), "spawned"]
    assert bridge.metrics.engine_restarts == 1


def test_left_out_fields_take_values_the_server_accepts() -> None:
    """workers follows worker_names, and the default max_tokens never exceeds the server's limit; what a request
    sets explicitly stays as set (and is refused if out of range)."""
    named = CompletionRequest(prompt="Hi", worker_names=["Ann", "Ben", "Cid"]).session_request()
    assert named.num_workers == 3 and named.names == ("Ann", "Ben", "Cid")
    mismatch = CompletionRequest(prompt="Hi", workers=2, worker_names=["Ann", "Ben", "Cid"]).session_request()
    assert mismatch.num_workers == 2  # refused by validate(): one name per worker
    assert CompletionRequest(prompt="Hi").session_request(max_tokens_limit=40).max_tokens == 40
    assert CompletionRequest(prompt="Hi").session_request(max_tokens_limit=4000).max_tokens == 256
    assert CompletionRequest(prompt="Hi", max_tokens=100).session_request(max_tokens_limit=40).max_tokens == 100
    assert CompletionRequest(prompt="Hi").session_request(max_workers=1).num_workers == 1
    assert CompletionRequest(prompt="Hi").session_request(max_workers=8).num_workers == 2
    assert CompletionRequest(prompt="Hi", workers=2).session_request(max_workers=1).num_workers == 2  # refused


def test_an_unexpected_error_in_a_route_is_a_500_in_the_api_error_shape(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Settings())

    async def broken() -> None:
        raise KeyError("a bug")

    app.add_api_route("/v1/broken", broken)
    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/v1/broken")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }
    assert "a bug" not in response.text and "Traceback" not in response.text  # the details go to the log only
    assert any("unhandled error on GET /v1/broken" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_openapi_document_has_one_operation_id_per_operation(clean_env: pytest.MonkeyPatch) -> None:
    """Client generators key operations by id; GET and HEAD of one path must not share one (FastAPI warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = create_app(Settings()).openapi()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert set(spec["paths"]["/health"]) == {"get"} and set(spec["paths"]["/metrics"]) == {"get"}
    client = TestClient(create_app(Settings()))
    for path in ("/health", "/metrics"):  # HEAD is still served, only left out of the document
        assert client.head(path).status_code == client.get(path).status_code


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": "\xff"}', "request body is not valid UTF-8: JSON must be sent as UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "request body is nested too deeply to parse"),
        (b'{"prompt": ', "request body is not valid JSON"),
    ],
)
def test_a_body_the_json_parser_cannot_read_is_a_400_saying_why(
    clean_env: pytest.MonkeyPatch, body: bytes, message: str
) -> None:
    client = TestClient(create_app(Settings()))
    response = client.post("/v1/hogwild/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": None, "code": "invalid_json"
    }


def test_a_client_gone_before_its_body_arrived_is_counted_as_cancelled(clean_env: pytest.MonkeyPatch) -> None:
    app = create_app(Settings())
    scope = {
        "type": "http", "method": "POST", "path": "/v1/hogwild/completions", "raw_path": b"/v1/hogwild/completions",
        "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
    }
    part = {"type": "http.request", "body": b'{"prompt": "Hi', "more_body": True}
    arrivals = iter([part, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(arrivals)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 499
    assert app.state.metrics.requests == {"cancelled": 1}, "not an invalid request: nobody sent a broken body"


def test_with_an_api_key_the_openapi_document_declares_it_on_the_protected_routes(
    clean_env: pytest.MonkeyPatch,
) -> None:
    spec = create_app(Settings(api_key="k")).openapi()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    security = {path: [op.get("security") for op in ops.values()] for path, ops in spec["paths"].items()}
    assert all(marks == [[{"bearer": []}]] for path, marks in security.items() if path.startswith("/v1/"))
    assert security["/health"] == security["/metrics"] == [None], "open routes declare no key"
    open_spec = create_app(Settings()).openapi()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert not any(op.get("security") for ops in open_spec["paths"].values() for op in ops.values())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "workers": 2}, "workers"),
        ({"prompt": "Hi", "worker_names": []}, "worker_names"),  # one worker (the capped default), no name for it
        ({"prompt": "Hi", "worker_names": ["Ann", "Ben"]}, "worker_names"),  # two names ask for two workers
    ],
)
def test_too_many_workers_blames_the_field_the_client_sent(
    clean_env: pytest.MonkeyPatch, body: dict, param: str
) -> None:
    client = TestClient(create_app(Settings(max_workers=1)))
    response = client.post("/v1/hogwild/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_request_that_leaves_out_workers_fits_a_one_worker_server(clean_env: pytest.MonkeyPatch) -> None:
    """The default of 2 workers is capped at the server's limit: past validation, to the (unloaded) engine."""
    client = TestClient(create_app(Settings(max_workers=1)))
    response = client.post("/v1/hogwild/completions", json={"prompt": "Hi"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"


def test_a_body_past_the_size_limit_is_refused_with_413(clean_env: pytest.MonkeyPatch) -> None:
    """Refused before it is read whole: by its Content-Length, or, sent in chunks, once it passes the limit."""
    client = TestClient(create_app(Settings()))
    huge = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = client.post("/v1/hogwild/completions", content=huge, headers={"Content-Type": "application/json"})
    chunks = (huge[i : i + (1 << 20)] for i in range(0, len(huge), 1 << 20))
    chunked = client.post("/v1/hogwild/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert "16 MiB" in response.json()["error"]["message"]
    small = client.post("/v1/hogwild/completions", json={"prompt": "Hi", "workers": 0})
    assert small.status_code == 400, "a body within the limit reaches the route"


def test_a_stream_whose_client_takes_no_data_ends_and_releases_its_session(caplog: pytest.LogCaptureFixture) -> None:
    """A client connected but reading nothing: the write waits `send_timeout`, then the stream ends quietly and
    its session is released (cancelled in the engine) instead of generating into server memory for as long as
    the client stays connected."""
    released: list[SessionHandle] = []
    outcomes: list[str] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/hogwild/completions", "headers": []}

    async def stalled_client() -> None:
        session = SessionHandle("r1", 1, release=released.append)
        for _ in range(3):
            session.deliver(TokenEvent(0, 1, "x", (1,)))
        events = stream_session(session, ChunkWriter("r1", 0, "m", ("Alice",), False), 0.05, outcomes.append)
        never = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                await never.wait()  # the client's window stays full: no write completes

        async def receive() -> dict:
            await never.wait()  # and it never disconnects
            return {}

        await asyncio.wait_for(SessionStream(events, ping=0, sep="\n", send_timeout=0.2)(scope, receive, send), 5)

    asyncio.run(stalled_client())
    assert len(released) == 1 and outcomes == ["cancelled"]
    assert "took no stream data for 0.2 s" in caplog.text


def close_pipe_then_exit(writer: object, linger_seconds: float) -> None:
    """An engine's way out: its reply pipe closes first, the process exits a moment later."""
    writer.close()  # type: ignore[attr-defined]
    time.sleep(linger_seconds)


def stop_an_exiting_engine() -> list[int | None]:
    """Starts a process that exits like an engine, stops it at once; returns what the reader's on_exit saw."""
    process = EngineProcess(EngineConfig())
    process.process = multiprocessing.get_context("spawn").Process(
        target=close_pipe_then_exit, args=(process._replies_writer, 0.3)
    )
    exits: list[int | None] = []
    process.start(on_reply=lambda reply: None, on_exit=lambda: exits.append(process.exit_code()))
    process.stop(grace_seconds=5.0)
    assert process.exit_code() == 0 and not process.is_alive()
    return exits


def test_stopping_while_the_reader_reaps_the_process_sees_it_exit(caplog: pytest.LogCaptureFixture) -> None:
    """The reader thread (at EOF) and the stopping thread both wait for an exiting engine. Only one can reap it;
    the other must still see it exited, not try to kill it and report it stuck. Racy by nature, so repeated."""
    with caplog.at_level(logging.WARNING, logger="hogwild.bridge"):
        for _ in range(12):
            assert stop_an_exiting_engine() == [0]
    assert not caplog.records, [record.getMessage() for record in caplog.records]
