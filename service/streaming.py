"""Server-sent events for one streamed completion, in the OpenAI completion-chunk shape plus a `hogwild` object.

Frame order: the chunks of all workers in generation order; one "finish" chunk per worker; a usage chunk when
asked; `data: [DONE]`. An error after the stream started is one `data: {"error": ...}` frame, then `data: [DONE]`.
While no event arrives (the request waits in the queue, or a long prefill runs), a `: ping` comment goes out
every keep-alive interval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from engine.events import AnswerEvent, DoneEvent, Event, InsertedEvent, StepEndEvent, TokenEvent
from service.errors import APIError, outcome_of
from service.session import SessionHandle

DONE_FRAME = b"data: [DONE]\n\n"
PING_FRAME = b": ping\n\n"


def frame(payload: dict) -> bytes:
    """One SSE data event; JSON never contains a raw newline, so one `data:` line suffices."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChunkWriter:
    """Turns one session's engine events into SSE frames.

    Invariant: once a DoneEvent or ErrorEvent was written, `outcome` is set and no further frame is produced.
    """

    def __init__(self, completion_id: str, created: int, model: str, names: tuple[str, ...], include_usage: bool):
        self.names = names
        self.include_usage = include_usage
        self.outcome: str | None = None  # a hogwild_requests_total outcome once the session ended
        self._header = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
        self._steps = [1] * len(names)

    def frames(self, event: Event) -> list[bytes]:
        if isinstance(event, (TokenEvent, InsertedEvent, StepEndEvent, AnswerEvent)):
            self._steps[event.worker] = event.step
            return [frame(self._worker_chunk(event))]
        if isinstance(event, DoneEvent):
            self.outcome = "ok"
            return self._finish(event)
        error = APIError.from_code(event.code, event.message)
        self.outcome = outcome_of(error)  # as a non-streamed request failing the same way would be counted
        return [frame(error.body()), DONE_FRAME]

    def _worker_chunk(self, event: TokenEvent | InsertedEvent | StepEndEvent | AnswerEvent) -> dict:
        hogwild: dict = {
            "worker": event.worker,
            "name": self.names[event.worker],
            "step": event.step,
            "kind": event.kind,
        }
        text = ""
        if isinstance(event, (TokenEvent, InsertedEvent)):
            text = event.text
            hogwild["token_ids"] = list(event.token_ids)
            if isinstance(event, InsertedEvent):
                hogwild["reason"] = event.reason
        elif isinstance(event, StepEndEvent):
            hogwild["step_text"] = event.text
        else:
            hogwild["answer"] = event.text
        choice = {"index": event.worker, "text": text, "logprobs": None, "finish_reason": None}
        return {**self._header, "choices": [choice], "hogwild": hogwild}

    def _finish(self, done: DoneEvent) -> list[bytes]:
        frames = []
        for worker, reason in enumerate(done.finish_reasons):
            choice = {"index": worker, "text": "", "logprobs": None, "finish_reason": reason}
            hogwild = {"worker": worker, "name": self.names[worker], "step": self._steps[worker], "kind": "finish"}
            frames.append(frame({**self._header, "choices": [choice], "hogwild": hogwild}))
        if self.include_usage:
            frames.append(frame({**self._header, "choices": [], "usage": done.usage.to_dict()}))
        frames.append(DONE_FRAME)
        return frames


async def stream_session(
    session: SessionHandle, writer: ChunkWriter, keepalive_seconds: float, on_end: Callable[[str], None]
) -> AsyncIterator[bytes]:
    """The SSE body of one session. Frames of events that arrived together (one engine step) go out in one write.
    However the stream ends (done, error, client gone), the session is closed, which cancels the engine's work if
    any is left, and `on_end` receives the outcome ("ok", "cancelled", or the failure's, see errors.outcome_of)."""
    try:
        while writer.outcome is None:
            event = await session.next_event(keepalive_seconds)
            if event is None:
                yield PING_FRAME
                continue
            frames = writer.frames(event)
            for ready in session.ready_events():
                if writer.outcome is None:
                    frames += writer.frames(ready)
            yield b"".join(frames)
    finally:
        session.close()
        on_end(writer.outcome or "cancelled")


class SessionStream(EventSourceResponse):
    """The SSE response of one session. A client that takes no data for `send_timeout` seconds (it stopped reading
    but stays connected) ends the stream: the body's generator is closed, which cancels the session, and the
    server logs a warning instead of a traceback; the connection is then closed unfinished (which uvicorn logs
    too, as a response it was not given whole)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:  # bare, or in a task group's ExceptionGroup (sse-starlette before 3)
            logging.getLogger("hogwild.stream").warning(
                "a client took no stream data for %g s: its stream ends and its session is cancelled",
                self.send_timeout,
            )
