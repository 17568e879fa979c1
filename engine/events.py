"""Events a session yields, in generation order. Torch-free, picklable, JSON-friendly via `to_dict()`.

Text in events is always complete UTF-8: a token that ends inside a multi-byte character is held back and
reported together with the token that completes it, so `token_ids` may hold more than one id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
InsertReason = Literal["header", "intervention", "finisher"]


@dataclass(frozen=True)
class TokenEvent:
    """Text the model sampled for `worker` during its step number `step` (1-based)."""

    worker: int
    step: int
    text: str
    token_ids: tuple[int, ...]
    kind: Literal["token"] = "token"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InsertedEvent:
    """Text the engine wrote into a worker's step without sampling it: a step header (with the first step's
    seed), a redundancy check question, or the finisher prompt."""

    worker: int
    step: int
    text: str
    token_ids: tuple[int, ...]
    reason: InsertReason
    kind: Literal["inserted"] = "inserted"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepEndEvent:
    """A worker finished step `step` (its text, header included); the step joins the end of the shared history
    before the worker's next forward, in the order steps finish."""

    worker: int
    step: int
    text: str
    kind: Literal["step_end"] = "step_end"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnswerEvent:
    """A final answer: the content of the first non-empty \\boxed{...} a worker (or the finisher) wrote."""

    worker: int
    step: int
    text: str
    kind: Literal["answer"] = "answer"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    """Token accounting. completion tokens count what the model sampled, the finisher's tokens included, and no
    inserted text."""

    prompt_tokens: int
    completion_tokens_per_worker: tuple[int, ...]
    steps_per_worker: tuple[int, ...]
    cached_prompt_tokens: int = 0  # prompt tokens copied from the prefix cache, not computed

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion_tokens_per_worker)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
            "completion_tokens_per_worker": list(self.completion_tokens_per_worker),
            "steps_per_worker": list(self.steps_per_worker),
        }


@dataclass(frozen=True)
class WorkerView:
    """What one worker attends to, in view order, and which of those tokens the model sampled."""

    token_ids: tuple[int, ...]
    is_sampled: tuple[bool, ...]

    def to_dict(self) -> dict:
        return {"token_ids": list(self.token_ids), "is_sampled": list(self.is_sampled)}


@dataclass(frozen=True)
class DoneEvent:
    """The session ended; its cache is already freed. views is set when the request asked for them."""

    usage: Usage
    finish_reasons: tuple[FinishReason, ...]
    answer: str | None
    views: tuple[WorkerView, ...] | None = None
    kind: Literal["done"] = "done"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "usage": self.usage.to_dict(),
            "finish_reasons": list(self.finish_reasons),
            "answer": self.answer,
            "views": None if self.views is None else [v.to_dict() for v in self.views],
        }


@dataclass(frozen=True)
class ErrorEvent:
    """The session ended in a failure: a runtime fault after it started, or, for a request still waiting for
    admission, a refusal (`code` says which); whatever cache it held is freed."""

    message: str
    code: str = "engine_error"
    kind: Literal["error"] = "error"

    def to_dict(self) -> dict:
        return asdict(self)


Event = TokenEvent | InsertedEvent | StepEndEvent | AnswerEvent | DoneEvent | ErrorEvent
