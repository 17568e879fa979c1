"""API-key check for /v1/* as a plain ASGI middleware, so it runs before the body is read or parsed and never
wraps a streaming response."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import APIError

PROTECTED_PREFIX = "/v1/"


class ApiKeyMiddleware:
    """Answers 401 to any /v1/* request without `Authorization: Bearer <key>`; `on_reject(path, error)` sees
    each refusal. Install it inside the CORS middleware so that preflight requests are answered first."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[str, APIError], None]) -> None:
        self.app = app
        self._expected = api_key.encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX) or self._is_authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        self._on_reject(scope["path"], error)
        await error.response()(scope, receive, send)

    def _is_authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._expected)
