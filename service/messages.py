"""Messages that cross the boundary between the API process and the engine process. Torch-free, picklable.

Commands flow API -> engine over a multiprocessing queue, replies flow engine -> API over a one-way
multiprocessing pipe. For every `Submit` the engine sends exactly one `Accepted` or `Rejected` before any event of
that request, so the HTTP status of a request is known before its first stream byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import SessionRequest
from engine.events import Event


@dataclass(frozen=True)
class Submit:
    """A new request: check it at once, then queue it FIFO until the engine has room."""

    request_id: str
    request: SessionRequest


@dataclass(frozen=True)
class Cancel:
    """Stop a request: a running session is cancelled within one step, a waiting one is dropped."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Leave the engine loop and exit the process."""


Command = Submit | Cancel | Shutdown


@dataclass(frozen=True)
class LoadProgress:
    """A human-readable line about model loading."""

    message: str


@dataclass(frozen=True)
class Ready:
    """The model is loaded; the engine takes requests from now on."""

    model_name: str
    context_length: int


@dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded; the process exits after sending this. Retrying would fail the same way."""

    code: str
    message: str


@dataclass(frozen=True)
class Accepted:
    """The request passed every check that needs the model and waits for admission."""

    request_id: str
    prompt_tokens: int


@dataclass(frozen=True)
class Rejected:
    """The request failed a check before any work started; `code` is the engine error's code."""

    request_id: str
    code: str
    message: str
    param: str | None


@dataclass(frozen=True)
class StepEvents:
    """The events of one engine step, as (request_id, event) pairs in generation order."""

    events: list[tuple[str, Event]]


@dataclass(frozen=True)
class Occupancy:
    """How many sessions run inside the engine, how many accepted requests wait for admission, and the memory the
    engine's caches hold."""

    num_running: int
    num_waiting: int
    kv_cache_bytes: int = 0  # the running sessions' KV caches
    prefix_cache_bytes: int = 0


Reply = LoadProgress | Ready | LoadFailed | Accepted | Rejected | StepEvents | Occupancy
