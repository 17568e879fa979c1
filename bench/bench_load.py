"""The server under load: N concurrent sessions over HTTP vs the same sessions one at a time.

Each session streams over SSE through the Python client; concurrent sessions are decoded together by the
engine's continuous batching. Reports aggregate tokens/s, time to first token (p50/p99) and errors, as a markdown
table. Bounded: a fixed number of requests to a server on 127.0.0.1, each with a fixed budget.

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

from bench.serving import running_server  # noqa: E402
from clients.client import AsyncHogwildClient  # noqa: E402
from clients.errors import HogwildClientError  # noqa: E402

PROMPTS = [f"Task {i}: list the prime numbers between {10 * i} and {10 * i + 40}, then add them." for i in range(64)]


@dataclass(frozen=True)
class Outcome:
    tokens: int
    first_token_s: float | None
    error: str | None


@dataclass(frozen=True)
class LoadResult:
    mode: str
    seconds: float
    outcomes: list[Outcome]

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outcomes)

    def ttft(self, quantile: float) -> float:
        """Nearest-rank percentile of the time to first token."""
        values = sorted(o.first_token_s for o in self.outcomes if o.first_token_s is not None)
        if not values:
            return float("nan")
        return values[max(0, math.ceil(quantile * len(values)) - 1)]


async def one_session(client: AsyncHogwildClient, prompt: str, args: argparse.Namespace) -> Outcome:
    started, first, tokens = time.perf_counter(), None, 0
    try:
        async for event in client.stream(
            prompt, workers=args.workers, max_tokens=args.max_tokens, temperature=0.7, seed=0,
            redundancy_check_every=0, final_answer=False, include_usage=True,
        ):
            if event.kind == "token" and first is None:
                first = time.perf_counter() - started
            if event.kind == "usage" and event.usage is not None:
                tokens = event.usage.completion_tokens
    except HogwildClientError as error:
        return Outcome(tokens, first, str(error))
    return Outcome(tokens, first, None)


async def run_load(url: str, args: argparse.Namespace, concurrent: bool) -> LoadResult:
    prompts = PROMPTS[: args.sessions]
    async with AsyncHogwildClient(url, timeout=None) as client:
        await one_session(client, "warm up", argparse.Namespace(workers=args.workers, max_tokens=4))
        started = time.perf_counter()
        if concurrent:
            outcomes = await asyncio.gather(*(one_session(client, p, args) for p in prompts))
        else:
            outcomes = [await one_session(client, p, args) for p in prompts]
        seconds = time.perf_counter() - started
    return LoadResult("concurrent" if concurrent else "one at a time", seconds, list(outcomes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="unset: the server's default")
    parser.add_argument("--sessions", type=int, default=16, help="requests per run (at most 64)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    env = {"HOGWILD_MODEL": args.model, "HOGWILD_DEVICE": args.device, "HOGWILD_DTYPE": args.dtype or "",
           "HOGWILD_MAX_SESSIONS": str(args.sessions), "HOGWILD_MAX_QUEUED": str(args.sessions)}
    with running_server(env) as url:
        results = [asyncio.run(run_load(url, args, concurrent=False)), asyncio.run(run_load(url, args, concurrent=True))]
    print(f"\n{args.sessions} sessions x {args.workers} workers x {args.max_tokens} tokens, model {args.model} "
          f"({args.dtype or 'default dtype'}, {args.device}); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| mode | seconds | tokens | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        errors = sum(o.error is not None for o in r.outcomes)
        print(f"| {r.mode} | {r.seconds:.1f} | {r.tokens} | {r.tokens / r.seconds:.1f} | {r.ttft(0.5):.2f} | "
              f"{r.ttft(0.99):.2f} | {errors} |")
    print(f"\nConcurrent / one at a time: {results[1].tokens / results[1].seconds / (results[0].tokens / results[0].seconds):.2f}x")


if __name__ == "__main__":
    main()
