"""The non-streamed completion: gathers one session's events into a CompletionResponse."""

from __future__ import annotations

from engine.events import AnswerEvent, DoneEvent, ErrorEvent, Event, InsertedEvent, StepEndEvent, TokenEvent
from service.errors import APIError
from service.schemas import CompletionResponse, CompletionUsage, TranscriptStep, WorkerChoice, WorkerViewBody
from service.session import SessionHandle


class CompletionCollector:
    """Accumulates each worker's text (inserted + sampled, in order), the finished steps and the answer."""

    def __init__(
        self, completion_id: str, created: int, model: str, names: tuple[str, ...], retry_after: int = 1
    ) -> None:
        self.completion_id = completion_id
        self.retry_after = retry_after  # seconds, for a 503 the session ends with
        self.created = created
        self.model = model
        self.names = names
        self._texts: list[list[str]] = [[] for _ in names]
        self._transcript: list[TranscriptStep] = []
        self._answer: str | None = None

    def add(self, event: Event) -> CompletionResponse | None:
        """Takes one event; returns the response on DoneEvent, raises APIError on ErrorEvent."""
        if isinstance(event, (TokenEvent, InsertedEvent)):
            self._texts[event.worker].append(event.text)
        elif isinstance(event, StepEndEvent):
            self._transcript.append(
                TranscriptStep(worker=event.worker, name=self.names[event.worker], step=event.step, text=event.text)
            )
        elif isinstance(event, AnswerEvent):
            self._answer = event.text
        elif isinstance(event, DoneEvent):
            return self._response(event)
        elif isinstance(event, ErrorEvent):
            raise APIError.from_code(event.code, event.message, retry_after=self.retry_after)
        return None

    async def collect(self, session: SessionHandle) -> CompletionResponse:
        """Reads the session to its end."""
        while True:
            event = await session.next_event()
            assert event is not None, "no timeout was given"
            response = self.add(event)
            if response is not None:
                return response

    def _response(self, done: DoneEvent) -> CompletionResponse:
        choices = [
            WorkerChoice(index=worker, worker=name, text="".join(self._texts[worker]), finish_reason=reason)
            for worker, (name, reason) in enumerate(zip(self.names, done.finish_reasons, strict=True))
        ]
        views = None
        if done.views is not None:
            views = [
                WorkerViewBody(worker=worker, token_ids=list(view.token_ids), is_sampled=list(view.is_sampled))
                for worker, view in enumerate(done.views)
            ]
        return CompletionResponse(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            transcript=self._transcript,
            answer=done.answer if done.answer is not None else self._answer,
            usage=CompletionUsage(**done.usage.to_dict()),
            views=views,
        )
