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


class CacheBudgetError(InvalidRequestError):
    """A session could grow past the whole KV-cache budget, so it could never be admitted."""

    def __init__(self, message: str, tokens: int, param: str | None = None) -> None:
        super().__init__(message, param)
        self.tokens = tokens  # cache token slots the session would reserve


class ConfigurationError(HogwildError):
    """The server's own settings make it unable to serve (the request is not at fault)."""

    code = "invalid_configuration"


class ModelNotFoundError(HogwildError):
    """The model path or hub id cannot be found or loaded."""

    code = "model_not_found"


class UnsupportedModelError(HogwildError):
    """The model's architecture cannot run Hogwild! attention (no RoPE, dynamic RoPE, ...)."""

    code = "unsupported_model"


class CapacityError(HogwildError):
    """The engine has no room for another session right now (cache budget or session limit)."""

    code = "capacity_exceeded"
