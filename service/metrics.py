"""Service metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

All updates happen on the event loop thread, so no locking is needed. Gauges that describe the engine (running and
waiting sessions, engine up) are read from the bridge when /metrics is rendered.
"""

from __future__ import annotations

import bisect
from collections import Counter as TallyCounter
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Prometheus histogram. `counts[i]` counts observations in (buckets[i-1], buckets[i]]; rendering makes them
    cumulative. Observations above the last bound appear only in +Inf, `count` and `sum`."""

    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.total)}")
        lines.append(f"{name}_count {self.count}")
        return lines


@dataclass
class Metrics:
    """Counters and histograms the service updates as requests and tokens flow."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    engine_restarts: int = 0
    requests: TallyCounter[str] = field(default_factory=TallyCounter)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))

    def count_request(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def render(
        self,
        num_running: int,
        num_waiting: int,
        is_engine_up: bool,
        kv_cache_bytes: int = 0,
        prefix_cache_bytes: int = 0,
    ) -> str:
        """The exposition text; the gauges are passed in because the engine owns them."""
        blocks = [
            _block("hogwild_sessions_running", "gauge", "Sessions running in the engine.", [f"{num_running}"]),
            _block("hogwild_sessions_waiting", "gauge", "Accepted requests waiting for a session.", [f"{num_waiting}"]),
            _block(
                "hogwild_kv_cache_bytes", "gauge", "Bytes of KV cache the running sessions hold.", [f"{kv_cache_bytes}"]
            ),
            _block(
                "hogwild_prefix_cache_bytes",
                "gauge",
                "Bytes of prompt keys/values the prefix cache holds.",
                [f"{prefix_cache_bytes}"],
            ),
            _block(
                "hogwild_engine_up",
                "gauge",
                "1 when the engine process is loaded and serving.",
                [f"{int(is_engine_up)}"],
            ),
            _block(
                "hogwild_engine_restarts_total",
                "counter",
                "Engine process restarts after a crash.",
                [f"{self.engine_restarts}"],
            ),
            _block(
                "hogwild_generated_tokens_total",
                "counter",
                "Tokens sampled by all workers of all sessions, counted as they stream (an end-of-sequence "
                "token when its session ends).",
                [f"{self.generated_tokens}"],
            ),
            _block(
                "hogwild_prompt_tokens_total",
                "counter",
                "Prompt tokens of the sessions the engine finished (rules, task, labels, first step headers).",
                [f"{self.prompt_tokens}"],
            ),
            _block(
                "hogwild_prompt_cached_tokens_total",
                "counter",
                "Of those, tokens whose keys/values the prefix cache supplied instead of a forward.",
                [f"{self.cached_prompt_tokens}"],
            ),
            _block(
                "hogwild_requests_total",
                "counter",
                "Completion requests by outcome.",
                [f'{{outcome="{outcome}"}} {count}' for outcome, count in sorted(self.requests.items())],
            ),
            _histogram_block(
                "hogwild_time_to_first_token_seconds",
                "Seconds from request arrival to its first sampled token.",
                self.time_to_first_token,
            ),
            _histogram_block(
                "hogwild_inter_token_latency_seconds",
                "Seconds between consecutive engine steps that sampled tokens for a session.",
                self.inter_token_latency,
            ),
        ]
        return "".join(blocks)


def _block(name: str, kind: str, help_text: str, samples: list[str]) -> str:
    """One metric family; a sample starting with '{' carries labels and is appended to the name directly."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{sample}" if sample.startswith("{") else f"{name} {sample}" for sample in samples]
    return "\n".join(lines) + "\n"


def _histogram_block(name: str, help_text: str, histogram: Histogram) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *histogram.render(name)]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value))
