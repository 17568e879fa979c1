"""Clients of a hogwild server: a Python client on httpx, terminal lanes, and the browser demo (clients/web)."""

from clients.client import AsyncEventStream, AsyncHogwildClient, EventStream, HogwildClient
from clients.errors import HogwildAPIError, HogwildClientError, HogwildConnectionError
from clients.results import Completion, StreamEvent, TranscriptStep, Usage, WorkerResult, group_by_worker, worker_texts

__all__ = [
    "AsyncEventStream",
    "AsyncHogwildClient",
    "Completion",
    "EventStream",
    "HogwildAPIError",
    "HogwildClient",
    "HogwildClientError",
    "HogwildConnectionError",
    "StreamEvent",
    "TranscriptStep",
    "Usage",
    "WorkerResult",
    "group_by_worker",
    "worker_texts",
]
