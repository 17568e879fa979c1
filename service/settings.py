"""Service settings from HOGWILD_* environment variables; `hogwild serve` flags mirror every field.

Explicit values (flags) win over the environment, which wins over the defaults. Empty environment variables
count as unset.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clients.client import normalized_api_key
from engine.config import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_TOKENS,
    DEFAULT_TOKEN_LIMIT,
    MAX_WORKERS,
    EngineConfig,
)

LOG_FORMAT = "%(levelname)s:     %(name)s: %(message)s"  # uvicorn's look, in both processes

ENV_PREFIX = "HOGWILD_"
MIN_STALL_SECONDS = 2.0  # twice the busy engine's heartbeat (service.engine_process.HEARTBEAT_SECONDS)
# Variables of this prefix read elsewhere: the default model's cache folder, the client's server URL and key.
OTHER_VARIABLES = {"HOGWILD_CACHE_DIR", "HOGWILD_URL"}
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#]+")  # what a browser's Origin header holds (or "null")


class Settings(BaseSettings):
    """Everything the service needs to start: what to load, where to listen, and how much to hold at once."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid")

    model: str = Field(
        DEFAULT_MODEL, description='"default" (embedded SmolLM2-135M-Instruct), a local Hugging Face folder or a hub id'
    )
    device: str | None = Field(
        None, description="torch device for the engine, e.g. cpu or cuda:0; unset: cuda when present, else cpu"
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="weights and cache dtype; unset: bfloat16 on CUDA, float32 on CPU"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(
        None, description="when set, /v1/* requests need the header 'Authorization: Bearer <key>'"
    )
    max_workers: int = Field(MAX_WORKERS, ge=1, le=MAX_WORKERS, description="most workers one request may ask for")
    max_tokens: int = Field(DEFAULT_TOKEN_LIMIT, ge=1, description="most tokens per worker one request may ask for")
    max_sessions: int = Field(
        DEFAULT_MAX_SESSIONS, ge=1, description="sessions the engine runs at once (batched together)"
    )
    max_queued: int = Field(
        32, ge=0, description="requests in flight beyond max_sessions (running or waiting: at most the sum; then 503)"
    )
    cache_budget_tokens: int = Field(
        0, ge=0, description="KV-cache tokens all sessions' caches may grow to together (0: no budget)"
    )
    prefix_cache_tokens: int = Field(
        DEFAULT_PREFIX_CACHE_TOKENS,
        ge=0,
        description="prompt KV tokens kept for reuse by prompts that start alike, on top of the budget (0: off)",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="replay decode steps from CUDA graphs, each capture checked against an eager step (unset: on "
        "for a CUDA GPU with the Triton attention; true: warn where that does not hold; false: off)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated origins allowed by CORS, each scheme://host[:port], null or * (empty: CORS off)",
    )
    keepalive_seconds: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="interval of ': ping' comments on an idle stream"
    )
    send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="a stream whose client takes no data for this long is cancelled and its session freed",
    )
    engine_stall_seconds: float = Field(
        300.0,
        ge=0,
        allow_inf_nan=False,
        description="an engine that says nothing this long while requests are in flight is taken for hung: its "
        f"requests fail and it is restarted (0: never; else at least {MIN_STALL_SECONDS:g}, and longer than the "
        "slowest single forward: a first kernel compile, a 1024-token prompt chunk)",
    )
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After value of 503 answers")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_a_header_can_carry(cls, value: object) -> object:
        """The key as clients send it in their Authorization header (clients.client.normalized_api_key). An empty
        key (`--api-key ""`, as an empty HOGWILD_API_KEY already is) means no key, not a lock that an empty bearer
        token opens."""
        return normalized_api_key(value) if isinstance(value, str) else value

    @field_validator("engine_stall_seconds")
    @classmethod
    def _stall_longer_than_heartbeats(cls, value: float) -> float:
        """A busy engine reports about once a second and only between forwards: a shorter limit kills healthy ones."""
        if 0 < value < MIN_STALL_SECONDS:
            raise ValueError(f"must be 0 (never) or at least {MIN_STALL_SECONDS:g} seconds")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:  # a browser sends exactly this shape; anything else would never match
            if origin not in ("*", "null") and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port] (no path), null or *")
        return origins

    def engine_config(self) -> EngineConfig:
        """The engine process's configuration, validated."""
        config = EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            max_workers=self.max_workers,
            max_tokens=self.max_tokens,
            max_sessions=self.max_sessions,
            cache_budget_tokens=self.cache_budget_tokens,
            prefix_cache_tokens=self.prefix_cache_tokens,
            cuda_graphs=self.cuda_graphs,
        )
        config.validate()
        return config

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """Warnings for HOGWILD_* variables that set nothing (a misspelt setting is otherwise silently ignored),
        each with the closest setting's name."""
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields} | OTHER_VARIABLES
        warnings = []
        suffixes = sorted(variable.removeprefix(ENV_PREFIX) for variable in known)  # the shared prefix matches all
        for name in sorted(n for n in environ if n.upper().startswith(ENV_PREFIX) and n.upper() not in known):
            close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), suffixes, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.append(f"{name} is not a setting and is ignored{hint}")
        return warnings

    @property
    def max_requests(self) -> int:
        """Requests in flight at once (running + queued); one more is answered 503."""
        return self.max_sessions + self.max_queued
