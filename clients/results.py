"""Typed results of the completion endpoint, built from its JSON. Field names follow the HTTP protocol."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

EventKind = Literal["token", "inserted", "step_end", "answer", "finish", "usage"]


@dataclass(frozen=True)
class Usage:
    """Token accounting: completion tokens count sampled tokens only, never inserted text."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_per_worker: tuple[int, ...]
    steps_per_worker: tuple[int, ...]
    cached_tokens: int = 0  # prompt tokens the server's prefix cache supplied

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(
            prompt_tokens=data["prompt_tokens"],
            completion_tokens=data["completion_tokens"],
            total_tokens=data["total_tokens"],
            completion_tokens_per_worker=tuple(data.get("completion_tokens_per_worker", ())),
            steps_per_worker=tuple(data.get("steps_per_worker", ())),
            cached_tokens=(data.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        )


@dataclass(frozen=True)
class WorkerResult:
    """One worker's full text (inserted and sampled, in order) and why it stopped."""

    index: int
    worker: str
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class TranscriptStep:
    """A finished step as it sits in the shared history."""

    worker: int
    name: str
    step: int
    text: str


@dataclass(frozen=True)
class WorkerView:
    """The token ids one worker attended to at the end, and which of them the model sampled."""

    worker: int
    token_ids: tuple[int, ...]
    is_sampled: tuple[bool, ...]


@dataclass(frozen=True)
class Completion:
    """A whole session's result. choices holds one WorkerResult per worker, in worker order; transcript is in
    history order (the order steps finished); views is set only when the request asked for them."""

    id: str
    model: str
    created: int
    choices: tuple[WorkerResult, ...]
    transcript: tuple[TranscriptStep, ...]
    answer: str | None
    usage: Usage | None
    views: tuple[WorkerView, ...] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        views = data.get("views")
        usage = data.get("usage")
        return cls(
            id=data["id"],
            model=data["model"],
            created=data["created"],
            choices=tuple(
                WorkerResult(c["index"], c.get("worker", ""), c["text"], c.get("finish_reason"))
                for c in data["choices"]
            ),
            transcript=tuple(
                TranscriptStep(s["worker"], s.get("name", ""), s["step"], s["text"]) for s in data.get("transcript", ())
            ),
            answer=data.get("answer"),
            usage=Usage.from_json(usage) if usage else None,
            views=None
            if views is None
            else tuple(WorkerView(v["worker"], tuple(v["token_ids"]), tuple(v["is_sampled"])) for v in views),
        )


@dataclass(frozen=True)
class StreamEvent:
    """One chunk of a completion stream.

    kind "token" (sampled text) and "inserted" (text the engine wrote: reason "header", "intervention" or
    "finisher") carry `text` and `token_ids`; "step_end" carries the finished step in `step_text`; "answer"
    carries `answer`; "finish" carries the worker's `finish_reason`. The last event of a stream that asked for
    usage has kind "usage", worker None and `usage` set.
    """

    kind: EventKind
    worker: int | None
    name: str | None = None
    step: int | None = None
    text: str = ""
    token_ids: tuple[int, ...] = ()
    reason: str | None = None
    step_text: str | None = None
    answer: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any]) -> StreamEvent:
        """Builds the event of one `data:` JSON chunk (an OpenAI completion chunk with a `hogwild` object)."""
        if not chunk.get("choices"):
            usage = chunk.get("usage")
            return cls(kind="usage", worker=None, usage=Usage.from_json(usage) if usage else None)
        choice = chunk["choices"][0]
        info = chunk.get("hogwild") or {}
        return cls(
            kind=info.get("kind", "token"),
            worker=info.get("worker", choice["index"]),
            name=info.get("name"),
            step=info.get("step"),
            text=choice.get("text") or "",
            token_ids=tuple(info.get("token_ids") or ()),
            reason=info.get("reason"),
            step_text=info.get("step_text"),
            answer=info.get("answer"),
            finish_reason=choice.get("finish_reason"),
        )


def group_by_worker(events: Iterable[StreamEvent]) -> dict[int, list[StreamEvent]]:
    """Each worker's events in stream order, keyed by worker index; usage events (no worker) are left out."""
    groups: dict[int, list[StreamEvent]] = {}
    for event in events:
        if event.worker is not None:
            groups.setdefault(event.worker, []).append(event)
    return groups


def worker_texts(events: Iterable[StreamEvent]) -> dict[int, str]:
    """Each worker's full text (inserted and sampled text in order), as the non-stream `choices[i].text` holds it."""
    return {
        worker: "".join(e.text for e in group if e.kind in ("token", "inserted"))
        for worker, group in group_by_worker(events).items()
    }
