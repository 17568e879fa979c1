"""One request's end of the engine bridge: an asyncio queue of its engine messages, plus its token timings and
usage so far. Touched on the event loop only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from engine.events import AnswerEvent, DoneEvent, Event, InsertedEvent, StepEndEvent, TokenEvent, Usage
from service.messages import Accepted, Rejected
from service.metrics import Metrics

SessionMessage = Accepted | Rejected | Event


class SessionHandle:
    """One request's end of the bridge: the service's handle on a session the engine process runs.

    The bridge delivers, in this order: exactly one Accepted or Rejected (or an ErrorEvent if the engine went
    away first), then the request's engine events, the last of which is a DoneEvent or ErrorEvent (a DoneEvent
    with finish_reason "abort" when the service stops the session, see `aborted`).
    """

    def __init__(self, request_id: str, num_workers: int, release: Callable[[SessionHandle], None]) -> None:
        self.request_id = request_id
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._release = release
        self._queue: asyncio.Queue[SessionMessage] = asyncio.Queue()
        self._prompt_tokens = 0
        self._sampled = [0] * num_workers  # tokens sampled per worker so far (what usage counts)
        self._steps = [1] * num_workers  # the step each worker is in

    def deliver(self, message: SessionMessage) -> None:
        if isinstance(message, Accepted):
            self._prompt_tokens = message.prompt_tokens
        elif isinstance(message, (TokenEvent, InsertedEvent, StepEndEvent, AnswerEvent)):
            self._steps[message.worker] = message.step
            if isinstance(message, TokenEvent):
                self._sampled[message.worker] += len(message.token_ids)
        self._queue.put_nowait(message)

    def silent_tokens(self, usage: Usage) -> int:
        """Tokens usage counts that no TokenEvent carried: an end-of-sequence token, the bytes of a character
        left unfinished when the session ended."""
        return max(0, usage.completion_tokens - sum(self._sampled))

    def aborted(self) -> DoneEvent:
        """The session's end when the service stops it: every worker finishes with "abort", usage so far."""
        usage = Usage(self._prompt_tokens, tuple(self._sampled), tuple(self._steps))
        return DoneEvent(usage=usage, finish_reasons=("abort",) * len(self._sampled), answer=None)

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next engine event of an accepted session, or None when `timeout` seconds pass without one."""
        message = await self.next_message(timeout)
        assert not isinstance(message, (Accepted, Rejected)), "a session is accepted or rejected once"
        return message

    def ready_events(self) -> list[Event]:
        """Every event already delivered and not yet read, without waiting (one engine step's worth, typically)."""
        events = []
        while not self._queue.empty():
            message = self._queue.get_nowait()
            assert not isinstance(message, (Accepted, Rejected)), "a session is accepted or rejected once"
            events.append(message)
        return events

    async def next_message(self, timeout: float | None = None) -> SessionMessage | None:
        """The next message, or None when `timeout` seconds pass without one."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        """Ends the request: if the engine still works on it, it is cancelled within one step. Idempotent."""
        self._release(self)

    def mark_tokens(self, now: float, metrics: Metrics) -> None:
        """Records that one engine step sampled tokens for this session."""
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.time_to_first_token.observe(now - self.created_at)
        elif self.last_token_at is not None:
            metrics.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now
