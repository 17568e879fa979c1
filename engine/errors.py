"""Typed errors raised before any work starts. Each names the request field at fault, if any."""

from __future__ import annotations

LOAD_FAILED_PREFIX = "cannot load model"  # how a load failure names the model, once


class HogwildError(Exception):
    """Base of every error the engine raises on purpose; `message` is safe to show to a user."""

    code = "hogwild_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(HogwildError):
    """A request field is out of range or inconsistent (bad worker count, empty prompt, ...)."""

    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    """The longest view a session could reach does not fit the model's context."""

    code = "context_length_exceeded"


class ModelNotFoundError(HogwildError):
    """The model path or hub id cannot be found or loaded."""

    code = "model_not_found"


class UnsupportedModelError(HogwildError):
    """The model's architecture cannot run Hogwild! attention (no RoPE, dynamic RoPE, ...)."""

    code = "unsupported_model"


class CapacityError(HogwildError):
    """The engine has no room for another session right now (cache budget or session limit)."""

    code = "capacity_exceeded"
