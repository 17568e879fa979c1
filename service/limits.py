"""A cap on request bodies, as a plain ASGI middleware: a body far larger than any prompt the model could take is
refused before it is read whole, parsed, and sent on to the engine process."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import REQUEST_TOO_LARGE, APIError

MAX_BODY_BYTES = 16 * 1024 * 1024  # a prompt filling a 128k-token context is about 1 MB of text
TOO_LARGE_MESSAGE = f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB"


class BodyLimitMiddleware:
    """Answers 413 to a request whose body passes `max_bytes`: at once when its Content-Length says so, else (a
    chunked body) as soon as what arrived passes it. `on_reject(path, error)` sees each refusal made up front."""

    def __init__(
        self, app: ASGIApp, on_reject: Callable[[str, APIError], None], max_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app = app
        self._on_reject = on_reject
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self._max_bytes:
            error = APIError(413, TOO_LARGE_MESSAGE, REQUEST_TOO_LARGE)
            self._on_reject(scope["path"], error)
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:  # raised inside the body's parsing: answered by the error handlers
                    raise HTTPException(413, TOO_LARGE_MESSAGE)
            return message

        await self.app(scope, counted, send)
