"""Errors the client raises. Every message is the server's own wording when the server gave one."""

from __future__ import annotations


class HogwildClientError(Exception):
    """Base of every error this package raises; `message` is safe to show to a user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HogwildAPIError(HogwildClientError):
    """The server answered with an error: an HTTP status >= 400, or an error event inside a stream.

    status is the HTTP status, or None for an error event sent after the stream had started (the HTTP status
    was already 200 then). type, param and code come from the OpenAI-shaped body {"error": {...}}.
    retry_after is the Retry-After header in seconds (a full queue answers 503 with one), else None.
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "stream error"
        extra = f", param {self.param}" if self.param else ""
        return f"{self.message} ({where}{extra})"


class HogwildConnectionError(HogwildClientError):
    """The server could not be reached, timed out, or closed a stream before `data: [DONE]`."""
