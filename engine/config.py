"""Validated, frozen configuration for the engine and for one session. Torch-free.

`SessionRequest.validate()` checks everything that needs no tokenizer; the engine adds the checks that
need the model (prompt length against the context) before any work starts.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

DEFAULT_WORKER_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")
MAX_WORKERS = len(DEFAULT_WORKER_NAMES)
MAX_WORKER_NAME_CHARS = 32
# Markup a name cannot hold: '*' and brackets would break the "**Name [k]:**" step headers, and a backslash or
# braces could spell a \boxed{} answer that the session would read off a header.
NAME_MARKUP = "*[]\\{}"
DEFAULT_MAX_TOKENS = 256
DEFAULT_REDUNDANCY_CHECK_EVERY = 1024
DEFAULT_PREFIX_CACHE_TOKENS = 4096
DEFAULT_MAX_SESSIONS = 8  # sessions decoded together
DEFAULT_TOKEN_LIMIT = 4096  # most tokens per worker a request may ask for
DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct, see engine.default_model
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class SamplingParams:
    """How each worker picks its next token. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be 0 (disabled) or positive", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed must be a non-negative 64-bit integer", "seed")


@dataclass(frozen=True)
class SessionRequest:
    """One task for `num_workers` workers.

    max_tokens is the budget per worker: the number of lockstep decode steps, each sampling one token per worker.
    redundancy_check_every counts generated tokens over all workers; 0 disables the check.
    final_answer turns on the finisher that forces a \\boxed{} answer when the budget ends, or a worker ends its
        turn, without one.
    """

    prompt: str
    num_workers: int = 2
    worker_names: tuple[str, ...] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    redundancy_check_every: int = DEFAULT_REDUNDANCY_CHECK_EVERY
    final_answer: bool = True
    return_views: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return self.worker_names or DEFAULT_WORKER_NAMES[: self.num_workers]

    def validate(self, max_workers: int = MAX_WORKERS, max_tokens: int | None = None) -> None:
        if not self.prompt or not self.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string", "prompt")
        if not _is_unicode_text(self.prompt):
            raise InvalidRequestError("prompt must be valid Unicode text (it holds an unpaired surrogate)", "prompt")
        if not 1 <= self.num_workers <= max_workers:
            raise InvalidRequestError(f"workers must be between 1 and {max_workers}", "workers")
        if self.worker_names is not None:
            self._validate_names()
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        if max_tokens is not None and self.max_tokens > max_tokens:
            raise InvalidRequestError(f"max_tokens must be at most {max_tokens}", "max_tokens")
        if self.redundancy_check_every < 0:
            raise InvalidRequestError("redundancy_check_every must be 0 (off) or positive", "redundancy_check_every")
        self.sampling.validate()

    def _validate_names(self) -> None:
        names = self.worker_names or ()
        if len(names) != self.num_workers:
            raise InvalidRequestError("worker_names must give one name per worker", "worker_names")
        for name in names:
            if (
                not name.strip() or name != name.strip() or len(name) > MAX_WORKER_NAME_CHARS
                or any(c in name for c in NAME_MARKUP) or not _is_unicode_text(name)
                or any(unicodedata.category(c) in _INVISIBLE for c in name)
            ):
                raise InvalidRequestError(
                    f"each worker name must be 1..{MAX_WORKER_NAME_CHARS} visible characters (inner spaces allowed) "
                    "without '*', '\\', brackets or braces",
                    "worker_names",
                )
        if len(set(names)) != len(names):
            raise InvalidRequestError("worker_names must be distinct", "worker_names")


_INVISIBLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control and format characters, surrogates, line/paragraph separators


def _is_unicode_text(text: str) -> bool:
    """False for a str that holds an unpaired surrogate (JSON can carry one; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class EngineConfig:
    """What the engine loads and how much it may hold at once.

    model: "default" (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder, or a hub id.
    device/dtype: None picks cuda + bfloat16 when a GPU is present, else cpu + float32.
    max_sessions: sessions decoded together in one batched forward (continuous batching).
    cache_budget_tokens: KV token slots all running sessions' caches may grow to together (each reserves its
        cache's most, engine.cache.held_tokens_bound); 0 means no budget.
    prefix_cache_tokens: prompt KV tokens kept across sessions for prompts that start alike
        (engine.prefix_cache), on top of the budget; 0 turns prefix caching off.
    cuda_graphs: replay decode steps from CUDA graphs (engine.decode_graphs), which needs a CUDA device and the
        Triton attention. None: wherever that holds; True: asked for (a warning where it does not hold); False: off.
    """

    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    max_workers: int = MAX_WORKERS
    max_tokens: int = DEFAULT_TOKEN_LIMIT
    max_sessions: int = DEFAULT_MAX_SESSIONS
    cache_budget_tokens: int = 0
    prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS
    cuda_graphs: bool | None = None

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}", "dtype")
        if not 1 <= self.max_workers <= MAX_WORKERS:
            raise InvalidRequestError(f"max_workers must be between 1 and {MAX_WORKERS}", "max_workers")
        if self.max_tokens < 1 or self.max_sessions < 1 or self.cache_budget_tokens < 0 or self.prefix_cache_tokens < 0:
            raise InvalidRequestError("max_tokens and max_sessions must be positive, cache sizes non-negative")

    @classmethod
    def from_env(cls, **overrides: object) -> EngineConfig:
        """Reads HOGWILD_MODEL, HOGWILD_DEVICE and HOGWILD_DTYPE; explicit non-None overrides win."""
        values: dict[str, object] = {
            "model": os.environ.get("HOGWILD_MODEL") or DEFAULT_MODEL,
            "device": os.environ.get("HOGWILD_DEVICE") or None,
            "dtype": os.environ.get("HOGWILD_DTYPE") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config
