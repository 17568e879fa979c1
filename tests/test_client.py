"""The Python client: SSE parsing on split input, typed events and errors, against mock transports and a live
server with a tiny model."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, wait_for_sessions

from clients import (
    AsyncHogwildClient,
    Completion,
    HogwildAPIError,
    HogwildClient,
    HogwildClientError,
    HogwildConnectionError,
    StreamEvent,
    cli_client,
    group_by_worker,
    worker_texts,
)
from clients.cli_client import add_arguments, run_client
from clients.sse import SSEParser


def chunk(worker: int, kind: str, text: str = "", **hogwild: object) -> dict:
    """A stream chunk in the protocol's shape."""
    names = ["Alice", "Bob", "Carol"]
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": worker, "text": text, "logprobs": None, "finish_reason": hogwild.pop("finish", None)}],
        "hogwild": {"worker": worker, "name": names[worker], "step": 1, "kind": kind, **hogwild},
    }


USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "total_tokens": 8,
    "completion_tokens_per_worker": [2, 1],
    "steps_per_worker": [1, 0],
}
SESSION = [
    chunk(0, "inserted", "**Alice [1]:** ", token_ids=[1, 2], reason="header"),
    chunk(1, "inserted", "**Bob [1]:** ", token_ids=[3], reason="header"),
    chunk(0, "token", "Hé", token_ids=[4]),
    chunk(1, "token", "x", token_ids=[5]),
    chunk(0, "token", ".\n\n", token_ids=[6]),
    chunk(0, "step_end", step_text="**Alice [1]:** Hé.\n\n"),
    chunk(0, "answer", answer="42"),
    chunk(0, "finish", finish="stop"),
    chunk(1, "finish", finish="length"),
    {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny", "choices": [], "usage": USAGE},
]


def sse_bytes(chunks: list[dict], *, done: bool = True) -> bytes:
    body = ": ping\r\n\r\n" + "".join(f"data: {json.dumps(c, ensure_ascii=False)}\r\n\r\n" for c in chunks)
    return (body + ("data: [DONE]\r\n\r\n" if done else "")).encode()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_sse_parser_reassembles_events_split_anywhere() -> None:
    data = sse_bytes(SESSION)
    expected = [json.dumps(c, ensure_ascii=False) for c in SESSION] + ["[DONE]"]
    for size in (1, 2, 3, 7, 64, len(data)):
        parser = SSEParser()
        payloads = [p for piece in pieces(data, size) for p in parser.feed(piece)]
        assert payloads == expected, f"pieces of {size} bytes"


def test_sse_parser_handles_line_endings_comments_and_multiline_data() -> None:
    parser = SSEParser()
    out = parser.feed(b": keep-alive\n\nevent: x\nid: 3\ndata: a\ndata:b\r\rdata: c\r")
    assert out == ["a\nb"], "the \\r after 'data: c' may be half of a \\r\\n"
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n: only a comment\n\n") == ["c"]
    assert parser.feed(b"data: unfinished") == [], "an event is dispatched only at its blank line"


def test_sse_parser_keeps_a_multibyte_character_split_across_reads() -> None:
    data = "data: 漢\n\n".encode()
    parser = SSEParser()
    assert parser.feed(data[:7]) == []
    assert parser.feed(data[7:]) == ["漢"]


def streaming_transport(data: bytes, size: int) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(pieces(data, size)))

    return httpx.MockTransport(handler)


def test_stream_yields_typed_events_from_tiny_reads() -> None:
    client = HogwildClient("http://test", transport=streaming_transport(sse_bytes(SESSION), 5))
    events = list(client.stream("task", include_usage=True, workers=2))
    assert [e.kind for e in events] == [
        "inserted",
        "inserted",
        "token",
        "token",
        "token",
        "step_end",
        "answer",
        "finish",
        "finish",
        "usage",
    ]
    assert events[0] == StreamEvent(
        kind="inserted", worker=0, name="Alice", step=1, text="**Alice [1]:** ", token_ids=(1, 2), reason="header"
    )
    assert events[5].step_text == "**Alice [1]:** Hé.\n\n" and events[6].answer == "42"
    assert [e.finish_reason for e in events[7:9]] == ["stop", "length"]
    assert events[-1].worker is None and events[-1].usage is not None
    assert events[-1].usage.completion_tokens_per_worker == (2, 1)
    assert worker_texts(events) == {0: "**Alice [1]:** Hé.\n\n", 1: "**Bob [1]:** x"}
    assert [len(group) for group in group_by_worker(events).values()] == [6, 3]


def test_async_stream_yields_the_same_events() -> None:
    data = sse_bytes(SESSION)

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces(data, 3):
            yield piece

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    async def run() -> list[StreamEvent]:
        async with AsyncHogwildClient("http://test", transport=httpx.MockTransport(handler)) as client:
            return [event async for event in client.stream("task", include_usage=True)]

    sync_events = list(HogwildClient("http://test", transport=streaming_transport(data, 64)).stream("task"))
    assert asyncio.run(run()) == sync_events


def test_error_event_inside_the_stream_raises_a_typed_error() -> None:
    error = {"error": {"message": "engine failed", "type": "server_error", "param": None, "code": "engine_error"}}
    data = sse_bytes(SESSION[:2]).replace(b"data: [DONE]\r\n\r\n", b"") + sse_bytes([error])
    client = HogwildClient("http://test", transport=streaming_transport(data, 11))
    stream = client.stream("task")
    assert [next(stream).kind, next(stream).kind] == ["inserted", "inserted"], "events before the error arrive"
    with pytest.raises(HogwildAPIError) as raised:
        next(stream)
    assert (raised.value.status, raised.value.message, raised.value.code) == (None, "engine failed", "engine_error")


def test_a_stream_cut_before_done_is_a_connection_error() -> None:
    client = HogwildClient("http://test", transport=streaming_transport(sse_bytes(SESSION[:3], done=False), 50))
    with pytest.raises(HogwildConnectionError, match=r"before data: \[DONE\]"):
        list(client.stream("task"))


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (
            400,
            {
                "error": {
                    "message": "workers must be between 1 and 8",
                    "type": "invalid_request_error",
                    "param": "workers",
                    "code": "invalid_request",
                }
            },
            {},
            ("workers must be between 1 and 8", "workers", None),
        ),
        (
            503,
            {"error": {"message": "queue full", "type": "server_error", "param": None, "code": "queue_full"}},
            {"retry-after": "2"},
            ("queue full", None, 2.0),
        ),
        (502, "Bad Gateway from a proxy", {}, ("Bad Gateway from a proxy", None, None)),
    ],
)
def test_http_errors_carry_the_servers_message(status: int, body: object, headers: dict, expected: tuple) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, dict):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, text=str(body), headers=headers)

    client = HogwildClient("http://test", transport=httpx.MockTransport(handler))
    for call in (lambda: client.complete("task"), lambda: list(client.stream("task"))):
        with pytest.raises(HogwildAPIError) as raised:
            call()
        error = raised.value
        assert (error.status, error.message, error.param, error.retry_after) == (status, *expected)


def test_unknown_option_is_a_type_error_before_any_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request must be sent")

    client = HogwildClient("http://test", transport=httpx.MockTransport(handler))
    with pytest.raises(TypeError, match="worker"):
        client.complete("task", worker=3)


def test_unreachable_server_is_a_connection_error() -> None:
    client = HogwildClient("http://127.0.0.1:9", timeout=2)
    with pytest.raises(HogwildConnectionError, match=r"cannot talk to http://127\.0\.0\.1:9"):
        client.complete("task")


def test_request_body_sends_only_given_options_and_the_api_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=sse_bytes([]), headers={"content-type": "text/event-stream"})

    client = HogwildClient("http://test/", api_key="k1", transport=httpx.MockTransport(handler))
    assert list(client.stream("solve", include_usage=True, workers=3, seed=None, temperature=0)) == []
    body = json.loads(seen[0].content)
    assert body == {
        "prompt": "solve",
        "stream": True,
        "workers": 3,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    assert seen[0].headers["authorization"] == "Bearer k1"
    assert seen[0].url == "http://test/v1/hogwild/completions"


# ---- against a live server with the tiny model ----------------------------------------------------------------

API_KEY = "client-test-key"
GREEDY = {"workers": 2, "max_tokens": 6, "temperature": 0.0}
LONG = {"workers": 2, "max_tokens": 1000, "temperature": 0.0}  # runs until cancelled (~10 s alone)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    """One session at a time and no queue, so a second request while one runs is a 503."""
    env = {
        "HOGWILD_MODEL": str(tiny_model_dir),
        "HOGWILD_DEVICE": "cpu",
        "HOGWILD_DTYPE": "float32",
        "HOGWILD_API_KEY": API_KEY,
        "HOGWILD_MAX_SESSIONS": "1",
        "HOGWILD_MAX_QUEUED": "0",
        "HOGWILD_MAX_TOKENS": "1000",
    }
    with LiveServer(env, []) as url:
        yield url


@pytest.fixture()
def live(server: str) -> Iterator[HogwildClient]:
    """An authorized client; every test starts with an idle engine."""
    wait_for_sessions(server, running=0)
    with HogwildClient(server, api_key=API_KEY, timeout=60) as client:
        yield client


def test_live_stream_matches_the_non_stream_completion(live: HogwildClient) -> None:
    # A prompt no other test sends: only the stream before the completion stored its pages in the prefix cache.
    task = "Add 2 and 3, then multiply the sum by 4 and say whether the result is even."
    events = list(live.stream(task, include_usage=True, **GREEDY))
    completion = live.complete(task, **GREEDY)
    assert {e.worker for e in events if e.worker is not None} == {0, 1}
    for worker in (0, 1):
        kinds = [e.kind for e in group_by_worker(events)[worker]]
        assert kinds[0] == "inserted" and kinds[-1] == "finish" and "token" in kinds
    assert worker_texts(events) == {c.index: c.text for c in completion.choices}, "greedy: same text both ways"
    assert [c.worker for c in completion.choices] == ["Alice", "Bob"]
    usage = events[-1].usage
    assert events[-1].kind == "usage" and usage is not None
    alice, bob = usage.completion_tokens_per_worker
    assert bob == 6 and alice > 6  # Alice also wrote the finisher's answer, past her budget
    assert completion.usage.cached_tokens > usage.cached_tokens  # the second request copies the prompt's prefix
    assert completion.usage == dataclasses.replace(usage, cached_tokens=completion.usage.cached_tokens)
    assert [e.finish_reason for e in events if e.kind == "finish"] == [c.finish_reason for c in completion.choices]


def test_live_async_client_streams_and_completes(server: str, live: HogwildClient) -> None:
    async def run() -> tuple[list[StreamEvent], Completion]:
        async with AsyncHogwildClient(server, api_key=API_KEY, timeout=60) as client:
            assert await client.models() == live.models()
            events = [event async for event in client.stream("Add 2 and 3.", **GREEDY)]
            return events, await client.complete("Add 2 and 3.", **GREEDY)

    events, completion = asyncio.run(run())
    assert worker_texts(events) == {c.index: c.text for c in completion.choices}
    assert worker_texts(events) == {c.index: c.text for c in live.complete("Add 2 and 3.", **GREEDY).choices}


def test_live_invalid_input_is_a_400_naming_the_field(live: HogwildClient) -> None:
    for call in (lambda: live.complete("task", workers=99), lambda: list(live.stream("task", workers=99))):
        with pytest.raises(HogwildAPIError) as raised:
            call()
        assert (raised.value.status, raised.value.param) == (400, "workers")
        assert "workers" in raised.value.message


def test_live_wrong_api_key_is_a_401(server: str) -> None:
    for key in (None, "wrong"):
        with HogwildClient(server, api_key=key) as client, pytest.raises(HogwildAPIError) as raised:
            client.complete("task", max_tokens=1)
        assert raised.value.status == 401 and raised.value.message


def test_live_busy_server_is_a_503_with_retry_after_and_closing_a_stream_cancels(
    server: str, live: HogwildClient
) -> None:
    with live.stream("Count to a thousand.", **LONG) as events:
        assert next(events).worker is not None
        wait_for_sessions(server, running=1)
        with pytest.raises(HogwildAPIError) as raised:
            live.complete("task", max_tokens=1)
        assert raised.value.status == 503 and raised.value.retry_after is not None and raised.value.retry_after >= 1
    wait_for_sessions(server, running=0, timeout=5.0)  # leaving the with-block cancels the session


def test_cli_client_streams_lanes_and_exits_zero(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args(server, "--workers", "3", "--max-tokens", "5", "--temperature", "0", "--plain")
    assert run_client(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert {line.split("]")[0] + "]" for line in out if line.startswith("[")} == {"[Alice]", "[Bob]", "[Carol]"}
    assert out[-2].startswith("Answer: ")
    tokens = r"Tokens: \d+ prompt(?: \(\d+ cached\))?, (\d+) completion \(Alice (\d+), Bob 5, Carol 5\); steps: \d+;"
    summary = re.match(tokens, out[-1])
    assert summary, out[-1]
    completion, alice = (int(group) for group in summary.groups())
    assert alice > 5 and completion == alice + 10  # Alice also wrote the finisher's answer, past her budget


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "12"], "workers must be between 1 and"),
        (["--max-tokens", "5", "--api-key", "wrong"], "HTTP 401"),
    ],
)
def test_cli_client_prints_server_errors_without_traceback(
    server: str, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = cli_args(server, *extra)
    assert run_client(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_client_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_client(cli_args("http://127.0.0.1:9")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot talk to http://127.0.0.1:9") and "Traceback" not in err


def cli_args(url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    key = [] if "--api-key" in extra else ["--api-key", API_KEY]
    return parser.parse_args(["What is 2 + 3?", "--url", url, *key, *extra])


def test_cli_client_reports_a_session_the_server_aborted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server shutting down ends its sessions with finish_reason "abort": not a session that ran to its end."""
    aborted = [*SESSION[:5], chunk(0, "finish", finish="abort"), chunk(1, "finish", finish="abort"), SESSION[-1]]
    for chunks, exit_code in ((aborted, 1), (SESSION, 0)):
        transport = streaming_transport(sse_bytes(chunks), 64)
        monkeypatch.setattr(cli_client, "HogwildClient", functools.partial(HogwildClient, transport=transport))
        assert run_client(cli_args("http://test", "--plain")) == exit_code
        assert ("finish_reason abort" in capsys.readouterr().err) == (exit_code == 1)


def test_a_success_status_without_json_is_a_client_error_not_a_traceback() -> None:
    """A proxy's page or a wrong URL answering 200 with HTML."""

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>proxy login</html>")

    client = HogwildClient("http://test", transport=httpx.MockTransport(html))
    for call in (client.health, client.models, lambda: client.complete("task")):
        with pytest.raises(HogwildClientError, match="did not answer with JSON"):
            call()


def test_a_page_answering_a_stream_is_a_client_error_naming_what_came() -> None:
    """A wrong URL or a proxy answering a streamed request with 200 and HTML is reported as such, not as a stream
    the server cut short."""

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>proxy login</html>")

    client = HogwildClient("http://test", transport=httpx.MockTransport(html))
    with pytest.raises(HogwildClientError, match=r"did not answer with an event stream \(text/html\).*proxy login"):
        list(client.stream("task"))


def test_a_redirect_is_a_client_error_naming_where_it_points() -> None:
    """The client follows no redirect (a completion would be sent again, or lose its body); it says where the
    server points instead of reporting a cut stream or a body that is not JSON."""

    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"location": "https://hogwild.example/v1/hogwild/completions"})

    sync = HogwildClient("http://test", transport=httpx.MockTransport(redirect))
    expected = r"redirects this request \(HTTP 307\) to https://hogwild\.example/v1/hogwild/completions"
    for call in (lambda: list(sync.stream("task")), lambda: sync.complete("task"), sync.health):
        with pytest.raises(HogwildClientError, match=expected) as raised:
            call()
        assert not isinstance(raised.value, HogwildConnectionError)

    async def stream_async() -> None:
        async with AsyncHogwildClient("http://test", transport=httpx.MockTransport(redirect)) as client:
            async for _ in client.stream("task"):
                pass

    with pytest.raises(HogwildClientError, match=expected):
        asyncio.run(stream_async())


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (httpx.ReadTimeout(""), r"cannot talk to http://test: no answer within the client's timeout \(ReadTimeout\); "
         r"it answers only when the session ends: stream it, or raise the timeout"),
        (httpx.ConnectTimeout(""), r"cannot connect to http://test in time \(ConnectTimeout\)"),
        (httpx.ReadError(""), "cannot talk to http://test: the connection was cut while reading"),
        (httpx.RemoteProtocolError(""), "cannot talk to http://test: the server closed the connection mid-answer"),
    ],
)
def test_async_transport_failures_say_what_happened(failure: Exception, expected: str) -> None:
    """httpx's async errors carry no text; the message still says what went wrong, as the sync client's does."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    async def complete() -> None:
        async with AsyncHogwildClient("http://test", transport=httpx.MockTransport(fail)) as client:
            await client.complete("task")

    with pytest.raises(HogwildConnectionError, match=f"^{expected}$"):
        asyncio.run(complete())


def test_a_stream_that_times_out_is_not_told_to_stream() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    client = HogwildClient("http://test", transport=httpx.MockTransport(fail))
    with pytest.raises(HogwildConnectionError) as raised:
        list(client.stream("task"))
    assert "no answer within the client's timeout (ReadTimeout)" in raised.value.message
    assert "stream it" not in raised.value.message


def test_an_api_key_read_with_its_newline_is_trimmed() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    HogwildClient("http://test", api_key="s3cr3t-key\r\n", transport=httpx.MockTransport(handler)).models()
    assert seen[0].headers["authorization"] == "Bearer s3cr3t-key"


@pytest.mark.parametrize("key", ["cl\u00e9", "sekrit\u2019", "two words", "a\rb"])
def test_an_api_key_that_cannot_be_a_header_is_a_client_error_that_does_not_echo_it(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for make in (HogwildClient, AsyncHogwildClient):
        with pytest.raises(HogwildClientError, match="printable ASCII") as raised:
            make("http://127.0.0.1:9", api_key=key)
        assert key not in str(raised.value)
    assert run_client(cli_args("http://127.0.0.1:9", "--api-key", key)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the API key") and key not in err


def test_health_that_answers_503_gives_its_message() -> None:
    """/health's 503 body carries its reason in `message`, beside the status fields."""
    body = {"status": "down", "sessions_running": 0, "message": "the engine process was killed by SIGKILL; restarting"}
    client = HogwildClient("http://test", transport=httpx.MockTransport(lambda request: httpx.Response(503, json=body)))
    with pytest.raises(HogwildAPIError) as raised:
        client.health()
    assert raised.value.status == 503 and raised.value.message == body["message"]
