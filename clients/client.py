"""Python clients for a hogwild server: `HogwildClient` (blocking) and `AsyncHogwildClient` (asyncio), on httpx.

Both speak the same protocol: `complete()` returns a whole `Completion`; `stream()` returns the session's
`StreamEvent`s as they are generated. The request of a stream is sent when iteration starts; closing the stream
(leaving its `with` block, or breaking out of the loop and closing it) closes the connection, and the server
cancels the session. Errors are `HogwildAPIError` (the server said no) or `HogwildConnectionError` (no answer).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, NoReturn, Self

import httpx

from clients.errors import HogwildAPIError, HogwildClientError, HogwildConnectionError
from clients.results import Completion, StreamEvent
from clients.sse import DONE, SSEParser

COMPLETIONS_PATH = "/v1/hogwild/completions"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0  # a non-stream session on a CPU can take minutes before its first byte
CONNECT_TIMEOUT_S = 10.0
API_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # what a bearer token can hold: printable ASCII, no spaces
OPTION_NAMES = frozenset(
    {
        "workers",
        "worker_names",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "redundancy_check_every",
        "final_answer",
        "model",
        "return_views",
    }
)


class EventStream:
    """The events of one streamed session. Iterate it; close it (or use it in `with`) to stop the session early,
    from the thread that iterates it."""

    def __init__(self, events: Generator[StreamEvent, None, None]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[StreamEvent]:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEventStream:
    """The asyncio twin of `EventStream`: `async for` over it; `aclose()` or `async with` stops the session. To
    stop it from another task while one is waiting in `async for`, cancel that task (asyncio cannot close a
    generator that is running)."""

    def __init__(self, events: AsyncGenerator[StreamEvent, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class HogwildClient:
    """A blocking client. Options of `complete`/`stream` are the request fields of the protocol (workers,
    worker_names, max_tokens, temperature, top_p, top_k, seed, redundancy_check_every, final_answer, model,
    return_views); options left out or None take the server's defaults. `transport` is for tests."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=_timeout(timeout), transport=transport
        )

    def complete(self, prompt: str, **options: Any) -> Completion:
        """Runs one session to its end and returns all workers' texts, the transcript and the answer."""
        with _transport_errors(self.base_url, whole_answer=True):
            response = self._http.post(COMPLETIONS_PATH, json=request_body(prompt, options, stream=False))
        return Completion.from_json(_json_body(response))

    def stream(self, prompt: str, *, include_usage: bool = False, **options: Any) -> EventStream:
        """Streams the session's events; with include_usage the last event has kind "usage"."""
        body = request_body(prompt, options, stream=True, include_usage=include_usage)
        return EventStream(self._events(body))

    def health(self) -> dict[str, Any]:
        """GET /health; raises HogwildAPIError(503) while the model loads or the engine is down."""
        return self._get_json("/health")

    def models(self) -> list[str]:
        """The ids of the served models (one)."""
        return [m["id"] for m in self._get_json("/v1/models")["data"]]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _get_json(self, path: str) -> dict[str, Any]:
        with _transport_errors(self.base_url):
            response = self._http.get(path)
        return _json_body(response)

    def _events(self, body: dict[str, Any]) -> Generator[StreamEvent, None, None]:
        with _transport_errors(self.base_url), self._http.stream("POST", COMPLETIONS_PATH, json=body) as response:
            if not _is_event_stream(response):
                response.read()
                _raise_not_a_stream(response)
            parser = SSEParser()
            for chunk in response.iter_bytes():
                for payload in parser.feed(chunk):
                    event = decode_event(payload)
                    if event is None:
                        return
                    yield event
        raise HogwildConnectionError("the server closed the stream before data: [DONE]")


class AsyncHogwildClient:
    """The asyncio twin of `HogwildClient`, with the same options and errors."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=_timeout(timeout), transport=transport
        )

    async def complete(self, prompt: str, **options: Any) -> Completion:
        """Runs one session to its end and returns all workers' texts, the transcript and the answer."""
        with _transport_errors(self.base_url, whole_answer=True):
            response = await self._http.post(COMPLETIONS_PATH, json=request_body(prompt, options, stream=False))
        return Completion.from_json(_json_body(response))

    def stream(self, prompt: str, *, include_usage: bool = False, **options: Any) -> AsyncEventStream:
        """Streams the session's events; with include_usage the last event has kind "usage"."""
        body = request_body(prompt, options, stream=True, include_usage=include_usage)
        return AsyncEventStream(self._events(body))

    async def health(self) -> dict[str, Any]:
        """GET /health; raises HogwildAPIError(503) while the model loads or the engine is down."""
        return await self._get_json("/health")

    async def models(self) -> list[str]:
        """The ids of the served models (one)."""
        return [m["id"] for m in (await self._get_json("/v1/models"))["data"]]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _get_json(self, path: str) -> dict[str, Any]:
        with _transport_errors(self.base_url):
            response = await self._http.get(path)
        return _json_body(response)

    async def _events(self, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        with _transport_errors(self.base_url):
            async with self._http.stream("POST", COMPLETIONS_PATH, json=body) as response:
                if not _is_event_stream(response):
                    await response.aread()
                    _raise_not_a_stream(response)
                parser = SSEParser()
                async for chunk in response.aiter_bytes():
                    for payload in parser.feed(chunk):
                        event = decode_event(payload)
                        if event is None:
                            return
                        yield event
        raise HogwildConnectionError("the server closed the stream before data: [DONE]")


def request_body(prompt: str, options: dict[str, Any], *, stream: bool, include_usage: bool = False) -> dict[str, Any]:
    """The JSON body of a completion request; unknown option names are a TypeError (a typo, not a server error)."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(OPTION_NAMES))}")
    body: dict[str, Any] = {"prompt": prompt, "stream": stream}
    body.update({name: value for name, value in options.items() if value is not None})
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def decode_event(payload: str) -> StreamEvent | None:
    """The event of one SSE data payload; None for `[DONE]`. An error event raises HogwildAPIError(status None)."""
    if payload == DONE:
        return None
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise HogwildClientError(f"the server sent an event that is not JSON: {payload[:200]!r}") from exc
    if "error" in chunk:
        raise _error_from_body(None, chunk, "the server reported an error during the stream")
    return StreamEvent.from_chunk(chunk)


def _json_body(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; an error status raises HogwildAPIError, a body that is not JSON (a
    proxy's page, a wrong URL) HogwildClientError."""
    _raise_for_status(response)
    try:
        return response.json()
    except ValueError as exc:
        kind = response.headers.get("content-type", "no content type")
        raise HogwildClientError(f"the server did not answer with JSON ({kind}): {response.text[:200]!r}") from exc


def _is_event_stream(response: httpx.Response) -> bool:
    return response.status_code < 300 and response.headers.get("content-type", "").startswith("text/event-stream")


def _raise_not_a_stream(response: httpx.Response) -> NoReturn:
    """For an answer to a streamed request that is no event stream (read whole): an error status, a redirect, or a
    page from something else at that address."""
    _raise_for_status(response)
    kind = response.headers.get("content-type", "no content type")
    raise HogwildClientError(f"the server did not answer with an event stream ({kind}): {response.text[:200]!r}")


def _raise_for_status(response: httpx.Response) -> None:
    """HogwildAPIError for an error status; HogwildClientError for a redirect (the client follows none: a
    completion would be sent twice, or its body lost), naming where it points."""
    if 300 <= response.status_code < 400:
        location = response.headers.get("location", "no Location header")
        raise HogwildClientError(
            f"the server redirects this request (HTTP {response.status_code}) to {location}: use that address"
        )
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    fallback = response.text.strip()[:500] or response.reason_phrase or "request failed"
    error = _error_from_body(response.status_code, body if isinstance(body, dict) else {}, fallback)
    error.retry_after = _retry_after(response.headers.get("retry-after"))
    raise error


def _error_from_body(status: int | None, body: dict[str, Any], fallback: str) -> HogwildAPIError:
    """Reads the OpenAI error shape {"error": {...}}; FastAPI's {"detail": "..."} and plain text also work."""
    error = body.get("error")
    if isinstance(error, dict):
        return HogwildAPIError(
            status, str(error.get("message") or fallback), error.get("type"), error.get("param"), error.get("code")
        )
    message = body.get("detail", body.get("message"))  # FastAPI's shape, or /health's
    return HogwildAPIError(status, message if isinstance(message, str) and message else fallback)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@contextmanager
def _transport_errors(base_url: str, whole_answer: bool = False) -> Iterator[None]:
    """Turns httpx's transport failures (refused, timed out, cut off) into HogwildConnectionError. `whole_answer`:
    the call waits for a non-streamed completion, which says nothing until its session ends."""
    try:
        yield
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise HogwildConnectionError(f"cannot connect to {base_url} in time ({type(exc).__name__})") from exc
    except httpx.TimeoutException as exc:
        hint = "; it answers only when the session ends: stream it, or raise the timeout" if whole_answer else ""
        raise HogwildConnectionError(
            f"cannot talk to {base_url}: no answer within the client's timeout ({type(exc).__name__}){hint}"
        ) from exc
    except httpx.TransportError as exc:
        detail = str(exc) or TRANSPORT_FAILURES.get(type(exc), type(exc).__name__)  # httpx's async errors carry no text
        raise HogwildConnectionError(f"cannot talk to {base_url}: {detail}") from exc


TRANSPORT_FAILURES = {
    httpx.ConnectError: "cannot connect",
    httpx.ReadError: "the connection was cut while reading",
    httpx.WriteError: "the connection was cut while sending",
    httpx.RemoteProtocolError: "the server closed the connection mid-answer",
}


def normalized_api_key(key: str | None) -> str | None:
    """`key` as an Authorization header carries it, for the client and the server alike: trimmed (a key read from a
    file often ends in a newline), None when empty. Raises ValueError for a key no header can carry, without
    echoing it: error messages end up in logs."""
    key = (key or "").strip()
    if key and not API_KEY_CHARACTERS.fullmatch(key):
        raise ValueError("may only hold printable ASCII characters without spaces: it is sent as a header")
    return key or None


def _headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header for `api_key` (see normalized_api_key); none without a key."""
    try:
        key = normalized_api_key(api_key)
    except ValueError as exc:
        raise HogwildClientError(f"the API key {exc}") from None
    return {"Authorization": f"Bearer {key}"} if key else {}


def _timeout(seconds: float | None) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=CONNECT_TIMEOUT_S if seconds is None else min(seconds, CONNECT_TIMEOUT_S))
