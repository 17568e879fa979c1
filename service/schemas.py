"""Request and response bodies of the HTTP API.

Types are checked strictly here (no "2" for 2, no 1 for true, no unknown fields); value ranges are checked once,
by `SessionRequest.validate` in the engine's torch-free config, so the service and the engine never disagree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.config import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REDUNDANCY_CHECK_EVERY,
    SamplingParams,
    SessionRequest,
)

_SAMPLING = SamplingParams()


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = Field(False, description="send a usage chunk (with empty choices) before [DONE]")


class CompletionRequest(BaseModel):
    """POST /v1/hogwild/completions: one task for several workers sharing one KV cache."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(description="the task; non-empty")
    workers: int = Field(
        2,
        description="number of workers, 1..the server's maximum (8 by default); left out: one per worker_names, "
        "else 2 (at most the server's maximum)",
    )
    worker_names: list[str] | None = Field(None, description="one distinct name per worker (default Alice, Bob, ...)")
    max_tokens: int = Field(
        DEFAULT_MAX_TOKENS, description="tokens per worker, 1..the server's maximum (left out: at most that maximum)"
    )
    temperature: float = Field(_SAMPLING.temperature, description="0..2; 0 is greedy")
    top_p: float = Field(_SAMPLING.top_p, description="(0, 1]; 1 disables nucleus sampling")
    top_k: int = Field(_SAMPLING.top_k, description=">= 0; 0 disables top-k")
    seed: int | None = Field(None, description="same seed and inputs give the same output on the same machine")
    redundancy_check_every: int = Field(
        DEFAULT_REDUNDANCY_CHECK_EVERY, description="ask 'am I doing redundant work?' every N generated tokens; 0: off"
    )
    final_answer: bool = Field(
        True, description="force a \\boxed{} answer when the budget or a worker's turn ends without one"
    )
    stream: bool = Field(False, description="stream server-sent events")
    stream_options: StreamOptions | None = None
    model: str | None = Field(None, description="if given, must equal the served model id (see /v1/models)")
    return_views: bool = Field(False, description="include each worker's final view as token ids")

    def session_request(self, max_tokens_limit: int | None = None, max_workers: int | None = None) -> SessionRequest:
        """The engine's request; call `.validate(...)` on it for the value ranges.

        Left out, `workers` is the number of `worker_names` when those are given, else its default capped at the
        server's `max_workers`, and `max_tokens` its default capped at `max_tokens_limit`: only values a request
        sets can be out of range."""
        given = self.model_fields_set
        workers = len(self.worker_names) if self.worker_names and "workers" not in given else self.workers
        if "workers" not in given and not self.worker_names and max_workers is not None:
            workers = min(workers, max_workers)
        max_tokens = self.max_tokens
        if "max_tokens" not in given and max_tokens_limit is not None:
            max_tokens = min(max_tokens, max_tokens_limit)
        return SessionRequest(
            prompt=self.prompt,
            num_workers=workers,
            worker_names=tuple(self.worker_names) if self.worker_names is not None else None,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed),
            redundancy_check_every=self.redundancy_check_every,
            final_answer=self.final_answer,
            return_views=self.return_views,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class WorkerChoice(BaseModel):
    index: int = Field(description="worker index")
    worker: str = Field(description="worker name")
    text: str = Field(description="everything in the worker's steps: inserted headers and sampled text")
    finish_reason: Literal["stop", "length", "abort"]
    logprobs: None = None


class TranscriptStep(BaseModel):
    worker: int
    name: str
    step: int
    text: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys/values came from the prefix cache")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_per_worker: list[int]
    steps_per_worker: list[int]


class WorkerViewBody(BaseModel):
    worker: int
    token_ids: list[int]
    is_sampled: list[bool]


class CompletionResponse(BaseModel):
    """The non-streamed answer: one choice per worker, the shared history, the final answer and usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[WorkerChoice]
    transcript: list[TranscriptStep] = Field(description="finished steps in the order they entered the history")
    answer: str | None
    usage: CompletionUsage
    views: list[WorkerViewBody] | None = Field(None, description="only when the request set return_views")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hogwild"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
