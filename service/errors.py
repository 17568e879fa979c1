"""Every error the service answers, in the OpenAI shape {"error": {"message", "type", "param", "code"}}.

Validation never answers 422 (FastAPI's default): it is 400 with the offending field in `param`. Unexpected
exceptions are logged with their traceback and answered 500 with a generic message; a response never carries a
traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.errors import HogwildError

logger = logging.getLogger("hogwild.service")

# HTTP status for each engine error code; anything else is the server's fault.
STATUS_BY_CODE = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "model_not_found": 404,
    "capacity_exceeded": 503,
    "engine_unavailable": 503,
}
REQUEST_TOO_LARGE = "request_too_large"  # the code of a 413 (service.limits)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it
BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's detail when reading the JSON body raises
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered as-is to the client: status, OpenAI error body, optional headers (Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @classmethod
    def from_code(cls, code: str, message: str, param: str | None = None, retry_after: int = 1) -> APIError:
        """Maps an engine error code to its HTTP status; 503s tell the client when to retry."""
        status = STATUS_BY_CODE.get(code, 500)
        headers = {"Retry-After": str(retry_after)} if status == 503 else None
        return cls(status, message, code, param, headers)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error object for `status`."""
    error_type = TYPE_BY_STATUS.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def unavailable(message: str, retry_after: int) -> APIError:
    return APIError(503, message, "engine_unavailable", headers={"Retry-After": str(retry_after)})


def _parse_failure(cause: BaseException | None) -> str:
    """What went wrong when the JSON parser itself raised (FastAPI keeps the parser's error as the cause)."""
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid UTF-8: JSON must be sent as UTF-8 text"
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    return "request body could not be parsed as JSON"


def validation_error(exc: RequestValidationError) -> APIError:
    """The first validation problem of a request body as a 400, naming the field in `param`."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", "invalid_request")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", "invalid_json")
    if first.get("type") == "missing" and param is None:
        return APIError(400, "request body is missing: send a JSON object", "invalid_request")
    if first.get("type") == "model_attributes_type" and param is None:  # a body not sent as JSON, or not an object
        return APIError(400, "request body must be a JSON object sent with Content-Type: application/json",
                        "invalid_request")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return APIError(400, message, "invalid_request", param)


def outcome_of(error: APIError) -> str:
    """The `outcome` label of hogwild_requests_total for a request answered with `error`."""
    if error.status == CLIENT_CLOSED_REQUEST:
        return "cancelled"
    if error.status in (400, 405, 413):
        return "invalid_request"
    if error.status == 401:
        return "unauthorized"
    if error.status == 404:
        return "model_not_found"
    if error.status == 503:
        return "queue_full" if error.code == "queue_full" else "unavailable"
    return "error"


def install_error_handlers(
    app: FastAPI, on_error: Callable[[str, APIError], None], retry_after: int = 1
) -> None:
    """Routes every error path (ours, the engine's, FastAPI's, Starlette's, unexpected) to an OpenAI body;
    `on_error(path, error)` sees each answered error (for metrics); a 503 tells clients to retry after
    `retry_after` seconds."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        on_error(request.url.path, error)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(HogwildError)
    async def _engine_error(request: Request, exc: HogwildError) -> JSONResponse:
        return respond(request, APIError.from_code(exc.code, exc.message, exc.param, retry_after))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = None
        if exc.status_code == 400 and message == BODY_PARSE_FAILED:  # FastAPI's answer when parsing itself fails
            if isinstance(exc.__cause__, ClientDisconnect):  # gone before its body arrived: nobody reads an answer
                on_error(request.url.path, APIError(CLIENT_CLOSED_REQUEST, "the client closed the request"))
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            message, code = _parse_failure(exc.__cause__), "invalid_json"
        elif exc.status_code == 413:
            code = REQUEST_TOO_LARGE
        return respond(request, APIError(exc.status_code, message, code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return respond(request, APIError(500, "internal server error", "internal_error"))
