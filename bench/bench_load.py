"""The server under load: N concurrent sessions over HTTP vs the same sessions one at a time.

Each session streams over SSE through the Python client; concurrent sessions are decoded together by the
engine's continuous batching. One warm-up request runs first, then each mode runs tasks of its own, so both find
the collaboration rules in the server's prefix cache and neither finds the other's prompts. Reports aggregate
tokens/s, time to first token (p50/p99), the share of prompt tokens the prefix cache supplied and errors, as a
markdown table. Bounded: a fixed number of requests to a server on 127.0.0.1, each with a fixed budget.

    .venv/bin/python bench/bench_load.py --sessions 16 --workers 2 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import running_server
from clients.client import AsyncHogwildClient
from clients.errors import HogwildClientError

MAX_SESSIONS = 64


def prompts(series: str, count: int) -> list[str]:
    """`count` tasks of one series: each mode gets its own, so neither finds the other's prompts in the server's
    prefix cache (both find the collaboration rules there, computed by the warm-up request)."""
    return [
        f"Task {series}{i}: list the prime numbers between {10 * i} and {10 * i + 40}, then add them."
        for i in range(min(count, MAX_SESSIONS))
    ]


@dataclass(frozen=True)
class Outcome:
    tokens: int
    first_token_s: float | None
    error: str | None
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class LoadResult:
    mode: str
    seconds: float
    outcomes: list[Outcome]

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outcomes)

    @property
    def cached_share(self) -> float:
        """Share of the prompt tokens the prefix cache supplied."""
        return sum(o.cached_tokens for o in self.outcomes) / max(1, sum(o.prompt_tokens for o in self.outcomes))

    def ttft(self, quantile: float) -> float:
        """Nearest-rank percentile of the time to first token."""
        values = sorted(o.first_token_s for o in self.outcomes if o.first_token_s is not None)
        if not values:
            return float("nan")
        return values[max(0, math.ceil(quantile * len(values)) - 1)]


async def one_session(client: AsyncHogwildClient, prompt: str, args: argparse.Namespace) -> Outcome:
    started, first, usage = time.perf_counter(), None, None
    try:
        async for event in client.stream(
            prompt, workers=args.workers, max_tokens=args.max_tokens, temperature=0.7, seed=0,
            redundancy_check_every=0, final_answer=False, include_usage=True,
        ):
            if event.kind == "token" and first is None:
                first = time.perf_counter() - started
            if event.kind == "usage":
                usage = event.usage
    except HogwildClientError as error:
        return Outcome(0, first, str(error))
    if usage is None:
        return Outcome(0, first, "the stream ended without usage")
    return Outcome(usage.completion_tokens, first, None, usage.prompt_tokens, usage.cached_tokens)


async def run_load(url: str, args: argparse.Namespace, concurrent: bool) -> LoadResult:
    tasks = prompts("C" if concurrent else "S", args.sessions)
    async with AsyncHogwildClient(url, timeout=None) as client:
        await one_session(client, "warm up", argparse.Namespace(workers=args.workers, max_tokens=4))
        started = time.perf_counter()
        if concurrent:
            outcomes = await asyncio.gather(*(one_session(client, p, args) for p in tasks))
        else:
            outcomes = [await one_session(client, p, args) for p in tasks]
        seconds = time.perf_counter() - started
    return LoadResult("concurrent" if concurrent else "one at a time", seconds, list(outcomes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="unset: the server's default")
    parser.add_argument("--sessions", type=int, default=16, help=f"requests per run (at most {MAX_SESSIONS})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--prefix-cache-tokens", type=int, help="the server's prefix cache in tokens (0: off; unset: its default)"
    )
    args = parser.parse_args()
    if not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions must be between 1 and {MAX_SESSIONS} (the distinct tasks this script has)")
    env = {"HOGWILD_MODEL": args.model, "HOGWILD_DEVICE": args.device, "HOGWILD_DTYPE": args.dtype or "",
           "HOGWILD_MAX_SESSIONS": str(args.sessions), "HOGWILD_MAX_QUEUED": str(args.sessions),
           "HOGWILD_PREFIX_CACHE_TOKENS": "" if args.prefix_cache_tokens is None else str(args.prefix_cache_tokens)}
    with running_server(env) as url:
        results = [asyncio.run(run_load(url, args, concurrent=mode)) for mode in (False, True)]
    print(f"\n{args.sessions} sessions x {args.workers} workers x {args.max_tokens} tokens, model {args.model} "
          f"({args.dtype or 'default dtype'}, {args.device}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| mode | seconds | tokens | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) | prompt cached | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        errors = sum(o.error is not None for o in r.outcomes)
        print(f"| {r.mode} | {r.seconds:.1f} | {r.tokens} | {r.tokens / r.seconds:.1f} | {r.ttft(0.5):.2f} | "
              f"{r.ttft(0.99):.2f} | {r.cached_share:.0%} | {errors} |")
    one_at_a_time, concurrent = (r.tokens / r.seconds for r in results)
    print(f"\nConcurrent / one at a time: {concurrent / one_at_a_time:.2f}x")


if __name__ == "__main__":
    main()
